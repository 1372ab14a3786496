"""`diffbank train` and `diffbank sample`: the embedded model's own training and a look at its samples."""

from __future__ import annotations

import json
from pathlib import Path

import click

from diffbank.commands.options import device_option, seed_option
from extract.idx import FASHION_MNIST_DIR


@click.command("train")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="runs/train-fmnist32",
    show_default=True,
    help="Run directory; rerunning with the same directory resumes.",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False),
    default=None,
    help=f"Folder with Fashion-MNIST's IDX files (default: Debian's {FASHION_MNIST_DIR}).",
)
@click.option("--steps", type=int, default=1500, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=6e-4, show_default=True)
@click.option("--ema-decay", type=float, default=0.995, show_default=True)
@seed_option(0, "Seed of initialisation, batches and noise.")
@click.option(
    "--autocast",
    type=click.Choice(["auto", "bfloat16", "none"]),
    default="auto",
    show_default=True,
    help="auto: bf16 where the CPU has AMX/AVX512-BF16 (faster there), else float32.",
)
@click.option("--threads", type=int, default=None, help="torch threads (default: all cores).")
@click.option("--checkpoint-every", type=int, default=100, show_default=True)
@click.option(
    "--until-step",
    type=int,
    default=None,
    help="Stop after this step (checkpointed); rerun without it to continue the same run.",
)
@click.option(
    "--max-seconds",
    type=float,
    default=None,
    help="Stop after this much wall-clock time (checkpointed); rerun to continue the same run.",
)
@click.option("--warmup-steps", type=int, default=100, show_default=True)
@click.option(
    "--weighting",
    type=click.Choice(["uniform", "min-snr"]),
    default="uniform",
    show_default=True,
    help="min-snr: epsilon-MSE weighted by min(SNR, gamma)/SNR (Hang et al., ICCV 2023).",
)
@click.option("--snr-gamma", type=float, default=5.0, show_default=True)
@device_option("cpu", help="cpu, cuda, cuda:1, ...")
@click.option("--channels-last/--no-channels-last", default=False, show_default=True)
@click.option(
    "--compile/--no-compile",
    "compile_",
    default=False,
    show_default=True,
    help="torch.compile the network for the training step.",
)
@click.option(
    "--snapshot-epochs",
    default="",
    show_default=True,
    help="Comma-separated epochs (e.g. 0.5,1,2,5) at which to keep a copy of the EMA weights.",
)
@click.option(
    "--export",
    "export_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="After training, write the EMA weights as safetensors with a JSON card beside them.",
)
def train_command(
    out_dir,
    data_dir,
    steps,
    batch_size,
    lr,
    ema_decay,
    seed,
    autocast,
    threads,
    checkpoint_every,
    until_step,
    max_seconds,
    warmup_steps,
    weighting,
    snr_gamma,
    device,
    channels_last,
    compile_,
    snapshot_epochs,
    export_path,
):
    """Train the embedded Fashion-MNIST ADM (DDPM epsilon-prediction, EMA weights); resumable."""
    from extract.models import fmnist
    from extract.models.training import TrainConfig, export_ema, train

    cfg = TrainConfig(
        flags=fmnist.FLAGS,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        ema_decay=ema_decay,
        seed=seed,
        autocast=autocast,
        threads=threads,
        checkpoint_every=checkpoint_every,
        warmup_steps=warmup_steps,
        weighting=weighting,
        snr_gamma=snr_gamma,
        device=device,
        channels_last=channels_last,
        compile=compile_,
    )
    try:
        epochs = [float(v) for v in snapshot_epochs.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"not a list of numbers: {snapshot_epochs!r}", param_hint="--snapshot-epochs"
        ) from None
    try:
        images = fmnist.training_images(data_dir or FASHION_MNIST_DIR)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"training {fmnist.NAME} on {len(images)} images -> {out_dir}", err=True)
    marks = tuple(round(e * len(images)) for e in epochs)
    record = train(images, cfg, out_dir, until_step=until_step, max_seconds=max_seconds, snapshot_images=marks)
    click.echo(json.dumps({k: v for k, v in record.items() if k != "losses"} | {"final_loss": record["losses"][-1][1]}))
    if export_path:
        export_ema(out_dir, export_path, fmnist.NAME, command=_reproduce_command(cfg, data_dir, record["step"]))
        click.echo(f"wrote {export_path}", err=True)


def _reproduce_command(cfg, data_dir, step: int) -> str:
    parts = [
        "diffbank train",
        f"--steps {cfg.steps}",
        f"--batch-size {cfg.batch_size}",
        f"--lr {cfg.lr}",
        f"--warmup-steps {cfg.warmup_steps}",
        f"--ema-decay {cfg.ema_decay}",
        f"--seed {cfg.seed}",
        f"--autocast {cfg.autocast}",
        f"--weighting {cfg.weighting}",
        f"--snr-gamma {cfg.snr_gamma}",
        f"--device {cfg.device}",
    ]
    parts += ["--channels-last"] * cfg.channels_last + ["--compile"] * cfg.compile
    if step < cfg.steps:
        parts.append(f"--until-step {step}")
    if data_dir:
        parts.append(f"--data {data_dir}")
    return " ".join(parts)


@click.command("sample")
@click.option(
    "--model",
    "model_name",
    default="embedded:fmnist32",
    show_default=True,
    help="embedded:NAME, or a checkpoint path together with --preset/--flags-json.",
)
@click.option("--flags-json", default=None, help="guided-diffusion flags as JSON, for a checkpoint path.")
@click.option("-n", "--num", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=100, show_default=True, help="DDIM steps.")
@click.option("--eta", type=float, default=0.0, show_default=True)
@seed_option(0, "Seed of the starting noise.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="samples.png", show_default=True)
def sample_command(model_name, flags_json, num, steps, eta, seed, out_path):
    """Generate a grid of images (PNG) from a diffusion model, by default the embedded one."""
    from PIL import Image

    from extract.diffusion import NoiseSchedule
    from extract.models.config import EMBEDDED_PREFIX, embedded_card
    from extract.models.registry import build_model
    from extract.models.sampling import ddim_sample, image_grid

    if model_name.startswith(EMBEDDED_PREFIX):
        card = embedded_card(model_name.removeprefix(EMBEDDED_PREFIX))
        model, _ = build_model(model_name, None, model_name)
        schedule = NoiseSchedule.from_flags(card.get("noise_schedule", "linear"), card.get("diffusion_steps", 1000))
    else:
        if not flags_json:
            raise click.UsageError("a checkpoint path needs --flags-json with the network's flags")
        flags = json.loads(flags_json)
        model, _ = build_model(None, flags, model_name)
        schedule = NoiseSchedule.from_flags(flags.get("noise_schedule", "linear"), flags.get("diffusion_steps", 1000))
    images = ddim_sample(model, schedule, num, steps=steps, eta=eta, seed=seed, progress=True)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, nrow=int(num**0.5) or 1)).save(out_path)
    click.echo(f"wrote {out_path} ({num} images, {steps} DDIM steps)")


@click.group("model")
def model_command():
    """Look at a model: its taps and what reaching each costs."""


@model_command.command("blocks")
@click.argument("spec_path", metavar="SPEC", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Instead of a spec: an ADM preset, embedded:NAME, or a local diffusers directory.",
)
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="Default: the spec's, else the model's.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def blocks_command(spec_path, model_name, image_size, as_json):
    """Every tap with its ordinal, module path, channels, map side and the share of the full forward's FLOPs
    needed to reach it (what early exit saves)."""
    from extract.models.accounting import model_tap_costs
    from extract.models.loading import section_for
    from extract.spec import load_spec

    if (spec_path is None) == (model_name is None):
        raise click.UsageError("give either a SPEC or --model")
    if spec_path is not None:
        spec = load_spec(spec_path, check_files=False)
        section, base_dir, size = spec.model.section(), spec.dataset.base_dir, image_size or spec.dataset.image_size
        label = spec_path
    else:
        section, base_dir, size, label = section_for(model_name), None, image_size, model_name
    costs, size = model_tap_costs(section, size, base_dir)
    full = costs[0].flops / costs[0].share if costs and costs[0].share else 0.0
    if as_json:
        record = {"model": label, "image_size": size, "full_forward_flops": int(full), "taps": [c.to_dict() for c in costs]}
        click.echo(json.dumps(record, indent=1))
        return
    click.echo(f"{label}: {len(costs)} taps at {size}x{size}; full forward {full / 1e9:.3g} GFLOP per image")
    width = max(len(c.module) for c in costs)
    click.echo(f"{'#':>3}  {'module':<{width}}  {'channels':>8}  {'map':>7}  {'GFLOP':>8}  {'share':>6}")
    for c in costs:
        side = f"{c.resolution}x{c.resolution}"
        click.echo(
            f"{c.number:>3}  {c.module:<{width}}  {c.channels:>8}  {side:>7}  {c.flops / 1e9:>8.3f}  {c.share:>6.1%}"
        )
