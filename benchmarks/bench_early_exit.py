"""Early exit: `features(blocks=[24])` against a full forward with a hook on block 24.

The public code of the paper runs all 37 blocks and reads block 24 through a hook; diffbank stops after
the deepest requested block. Both arms use the same weights and inputs, on a CPU-sized model with the
256x256 model's topology (channel_mult 1,1,2,2,4,4, two res blocks, attention at downsample 8/16/32,
resblock up/down, scale-shift norm), fewer channels and a 64x64 input. Arms are interleaved so load
changes on the machine hit both alike.

    python benchmarks/bench_early_exit.py [--channels 64] [--size 64] [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from extract.models.adm import ADMUNet
from extract.models.config import PRESETS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    scale = 256 // args.size  # keep attention at the same downsample rates as the 256 model
    flags = {
        **PRESETS["256x256_diffusion_uncond"],
        "image_size": args.size,
        "num_channels": args.channels,
        "num_head_channels": 64 if args.channels >= 64 else args.channels // 2,
        "channel_mult": "1,1,2,2,4,4",
        "attention_resolutions": ",".join(str(r // scale) for r in (32, 16, 8)),
    }
    torch.manual_seed(0)
    model = ADMUNet.from_flags(**flags).eval()
    info = model.block_info(args.block)
    x = torch.randn(args.batch, 3, args.size, args.size)
    t = torch.full((args.batch,), 90, dtype=torch.long)

    captured: dict[str, torch.Tensor] = {}
    target = dict(model.named_modules())[info.module]

    def full_with_hook() -> torch.Tensor:
        handle = target.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
        try:
            model(x, t)
        finally:
            handle.remove()
        return captured["h"]

    def early_exit() -> torch.Tensor:
        return model.features(x, t, [args.block])[args.block]

    with torch.inference_mode():
        assert torch.equal(full_with_hook(), early_exit()), "early exit must equal the hooked full forward"
        times: dict[str, list[float]] = {"full forward + hook": [], f"features(blocks=[{args.block}])": []}
        for _ in range(args.repeats):
            for name, fn in zip(times, (full_with_hook, early_exit)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    share = model.flops_to_block(args.block) / model.flops_to_block(None)
    print(
        f"model: 256x256_diffusion_uncond topology, {args.channels} channels, {args.size}x{args.size} input, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.num_blocks} blocks"
    )
    print(
        f"block {args.block} = {info.module} ({info.channels} ch, {info.resolution}x{info.resolution}); "
        f"its share of the full forward's MACs: {share:.1%}"
    )
    print(f"batch {args.batch}, {args.repeats} interleaved repeats, {torch.get_num_threads()} threads")
    print(f"{'arm':<28}{'median s/batch':>16}{'images/s':>12}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, m in med.items():
        print(f"{name:<28}{m:>16.4f}{args.batch / m:>12.1f}")
    full, early = med.values()
    print(f"speed-up of early exit: {full / early:.2f}x (FLOP bound: {1 / share:.2f}x)")


if __name__ == "__main__":
    main()
