"""Peak CPU memory of one DifFeed training step (and of its no-feedback baseline) on the embedded model.

Run each arm in its own process: ru_maxrss is a high-water mark, so the step's growth is read against the mark
after an evaluation pass has warmed up the allocator. Also prints the saved-activation estimate of
`probe.feedback.activation_bytes_per_sample`, and that estimate for the 256x256 ADM (meta device, no weights):

    python benchmarks/difffeed_step_memory.py --batch 16 --arm difffeed
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from extract.diffusion import NoiseSchedule
from extract.models.adm import ADMUNet
from extract.models.config import PRESETS as ADM_PRESETS
from extract.models.registry import build_model
from probe.feedback.images import ImageSet
from probe.feedback.network import DifFeed, activation_bytes_per_sample
from probe.feedback.training import _evaluate, train_feedback
from probe.heads import PRESETS, seeded_init
from probe.recipe import FeedbackRecipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--arm", choices=["difffeed", "attention"], default="difffeed")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--tokens", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    unet, _ = build_model("embedded:fmnist32", checkpoint="embedded:fmnist32")
    with seeded_init(0):
        model = DifFeed(unet, 10, None if args.arm == "difffeed" else (), tokens=args.tokens, **PRESETS[args.preset])
    n = args.batch
    data = ImageSet.from_array(torch.rand(n + 2, 3, 32, 32) * 2 - 1, np.arange(n + 2) % 10)
    train, val = data.subset(np.arange(n)), data.subset(np.arange(n, n + 2))
    schedule, recipe = NoiseSchedule.from_flags(), FeedbackRecipe(epochs=1, batch_size=n)
    _evaluate(model, train, schedule, recipe, n, torch.device("cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu = time.process_time()
    train_feedback(model, schedule, train, val, recipe=recipe, micro_batch=n, max_steps=1, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"{args.arm} ({args.preset} head, {args.tokens}x{args.tokens} tokens), batch {n}: peak RSS {after / 1024:.0f} MiB, "
        f"{(after - before) / 1024:.0f} MiB over the evaluation pass; saved activations "
        f"{activation_bytes_per_sample(model) * n / 2**20:.0f} MiB; {time.process_time() - cpu:.1f} s CPU (step + val)"
    )
    with torch.device("meta"):
        big = DifFeed(ADMUNet.from_flags(**ADM_PRESETS["256x256_diffusion_uncond"]), 1000)
    print(
        f"256x256 ADM, paper head: saved activations {activation_bytes_per_sample(big) / 2**30:.2f} GiB per image "
        f"(+ {sum(p.numel() for p in big.unet.parameters()) * 4 / 2**30:.2f} GiB of frozen float32 weights)"
    )


if __name__ == "__main__":
    main()
