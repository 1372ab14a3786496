"""`diffbank probe ...`: thin click wrappers over `probe.run` (all logic lives there).

Each command builds its `probe.options` dataclass from its flags (the API's defaults are the flags' defaults)
and makes one call into `probe.run`.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from diffbank.commands.options import (
    checked,
    cluster_options,
    device_option,
    memory_budget_option,
    one_cluster,
    quiet,
    seed_option,
    storage_option_option,
)
from diffbank.commands.remote import open_read_only
from extract.dask_client import StartingClient

# Declarations only (no torch): the options, defaults and errors shown in --help come from here.
from probe.errors import ProbeDataError, RunConflictError, UnknownFeatureError
from probe.inputs import check_features
from probe.options import (
    LOGISTIC_SOLVERS,
    POSITIONS,
    REFIT_CHOICES,
    AttentionOptions,
    DataOptions,
    FusionOptions,
    KnnOptions,
    LinearOptions,
    LogisticOptions,
    SweepOptions,
    TrainingOptions,
)
from probe.recipe import RECIPES, ProbeConfigError
from probe.report import format_table, render
from probe.sweep_cluster import sweep_cluster

SUBSET_HELP = "label subset of train: 1%, 10% (stratified) or K-shot, e.g. 5-shot (seeded)"


def _subset(value: str) -> Any:
    from probe.splits import Subset

    return Subset.parse(value)


def _common(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options every probe command takes (applied bottom-up, so listed here in reverse help order)."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.argument("store"),
        click.option(
            "--out",
            "out_dir",
            required=True,
            type=click.Path(file_okay=False),
            help="directory for results.json, weights and checkpoints (a rerun resumes)",
        ),
        click.option(
            "--feature",
            "features",
            multiple=True,
            help="feature name (repeatable); default: the paper's choice or the nearest available",
        ),
        seed_option(DataOptions.seed, "seed of splits, subsets, order, init"),
        click.option("--subset", default=None, callback=checked(_subset), help=SUBSET_HELP),
        click.option(
            "--val-fraction",
            default=DataOptions.val_fraction,
            show_default=True,
            type=float,
            help="validation fraction carved from train when the store has no validation split",
        ),
        click.option(
            "--standardize",
            type=click.Choice(["dim", "channel", "none"]),
            default=None,
            help="train-split standardisation (default: the recipe's for trained heads: diffbank = dim "
            "for linear heads, channel for attention/fusion, paper = none; dim for logistic/knn)",
        ),
        memory_budget_option(
            "features up to this size are loaded into memory, larger ones streamed (bytes, 2GiB, 25%; default 25% of RAM)"
        ),
        storage_option_option(),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _recipe_value(field: str, head: str = "linear") -> str:
    values = {f"{name}: {recipe[head][field]}" for name, recipe in RECIPES.items()}
    return (
        f"[recipe: {RECIPES['diffbank'][head][field]}]"
        if len({v.split(": ")[1] for v in values}) == 1
        else "[recipe: " + "; ".join(sorted(values)) + "]"
    )


def _training(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the trained heads. Settings left out take the recipe's value; given ones override it."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option(
            "--recipe",
            type=click.Choice(list(RECIPES)),
            default=TrainingOptions.recipe,
            show_default=True,
            help="named training recipe (probe/recipe.py): paper = the public code's protocol (raw "
            "features, last epoch kept); diffbank = the same optimiser on standardised features, "
            "best validation epoch kept; attentive = AdamW, warm-up and cosine (V-JEPA's attentive probe). "
            "Options below override single settings; the full recipe and the overrides are recorded in "
            "results.json",
        ),
        click.option("--epochs", default=None, type=click.IntRange(min=1), help=_recipe_value("epochs")),
        click.option("--batch-size", default=None, type=click.IntRange(min=1), help=_recipe_value("batch_size")),
        device_option(TrainingOptions.device, help="torch device, e.g. cuda:0"),
        click.option(
            "--momentum",
            default=None,
            type=click.FloatRange(0, 1, max_open=True),
            help="SGD momentum " + _recipe_value("momentum"),
        ),
        click.option(
            "--weight-decay",
            "weight_decay",
            multiple=True,
            type=click.FloatRange(min=0),
            help="SGD weight decay " + _recipe_value("weight_decay") + "; attention and fusion: repeat it (with "
            "--lr) to train every lr x weight decay in one pass and keep the head best on validation",
        ),
        click.option(
            "--step-size",
            default=None,
            type=click.IntRange(min=1),
            help="StepLR: epochs between lr decays " + _recipe_value("step_size"),
        ),
        click.option(
            "--gamma",
            default=None,
            type=click.FloatRange(0, 1, min_open=True),
            help="StepLR: lr factor at each decay " + _recipe_value("gamma"),
        ),
        click.option(
            "--draws",
            default=None,
            type=click.IntRange(min=1),
            help="noise draws to train on, for a store that keeps K apart (noise: {combine: separate}): epoch e "
            "reads draw e mod DRAWS; 1 = draw 0 only [default: all K]",
        ),
        click.option(
            "--eval-draws",
            type=click.Choice(["first", "mean"]),
            default=TrainingOptions.eval_draws,
            show_default=True,
            help="validation and test on draw 0 (first), or on the logits averaged over the training draws (mean)",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _transformer(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the transformer heads (attention, fusion): the paper's lr 5e-2, a size preset, positions."""
    func = click.option(
        "--preset", type=click.Choice(["tiny", "small", "paper"]), default=AttentionOptions.preset, show_default=True
    )(func)
    func = click.option(
        "--positions",
        type=click.Choice(list(POSITIONS)),
        default=AttentionOptions.positions,
        show_default=True,
        help="token positions: none (the paper's head) or a learned embedding per place",
    )(func)
    return click.option(
        "--lr",
        "lr",
        multiple=True,
        type=float,
        help="learning rate " + _recipe_value("lr", "attention") + "; repeat it to train one head per lr in one pass "
        "and keep the one best on validation",
    )(func)


def _lr_values(kwargs: dict[str, Any]) -> dict[str, Any]:
    """--lr given 0 times: the API default; once: lr; several times: lrs (one head per lr). Likewise
    --weight-decay: weight_decay or weight_decays (every lr x weight decay)."""
    for one, many in (("lr", "lrs"), ("weight_decay", "weight_decays")):
        values = list(dict.fromkeys(kwargs.pop(one)))
        if len(values) == 1:
            kwargs[one] = values[0]
        elif values:
            kwargs[many] = values
    return kwargs


def _one_weight_decay(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The linear commands train one weight decay: --weight-decay given at most once."""
    values = list(dict.fromkeys(kwargs.pop("weight_decay")))
    if len(values) > 1:
        raise click.BadParameter(
            "give one value (a weight-decay grid is for attention and fusion)", param_hint="'--weight-decay'"
        )
    kwargs["weight_decay"] = values[0] if values else None
    return kwargs


_OPTIONS: dict[str, type[DataOptions]] = {
    "linear": LinearOptions,
    "attention": AttentionOptions,
    "fusion": FusionOptions,
    "logistic": LogisticOptions,
    "knn": KnnOptions,
    "sweep": SweepOptions,
}


def _run(name: str, cluster: tuple[int | None, str | None] | None = None, **kwargs: Any) -> None:
    """Call `probe.run.run_<name>` with the command's options and print its table; known input problems become
    clean CLI errors. `cluster` (workers, scheduler): a sweep's dask cluster, started before the probes are
    imported.

    The table is the command's output (stdout); status goes through `logging`.
    """
    # opened here, before anything is written under --out: a bad URL, option or store fails cleanly first
    store = open_read_only(kwargs.pop("store"), kwargs.pop("storage_option"))
    out_dir = kwargs.pop("out_dir")
    kwargs["features"] = list(kwargs.get("features") or []) or None
    if kwargs.get("standardize") is None:
        kwargs.pop("standardize", None)
    if "progress" in {f.name for f in dataclasses.fields(_OPTIONS[name])}:
        kwargs["progress"] = not quiet()
    out = Path(out_dir)
    fresh = not out.exists()
    try:
        with _started_cluster(cluster, store, kwargs["features"]) as started:
            # Imported when a probe runs: importing the probes (torch, the store reader) takes ~5 s, which
            # `--help` and every other command would pay at start-up (`import probe.run` measured 4.7-8.3 s on 2
            # busy cores).
            from probe import run

            given = {} if started is None else {"cluster": started}
            results = getattr(run, f"run_{name}")(store, out_dir, _OPTIONS[name](**kwargs), **given)
    except BaseException as exc:
        # A run that fails before finishing leaves nothing behind in an --out it created, so the next run
        # there does not meet half a run's settings (an interrupted run keeps its checkpoint to resume).
        if fresh and not isinstance(exc, KeyboardInterrupt) and not (out / "checkpoint").exists():
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, UnknownFeatureError):
            raise click.BadParameter(str(exc), param_hint="'--feature'") from exc
        if isinstance(exc, RunConflictError):
            raise click.BadParameter(str(exc), param_hint="'--out'") from exc
        if isinstance(exc, (ProbeDataError, ProbeConfigError, FileNotFoundError)):
            raise click.ClickException(str(exc)) from exc
        raise
    click.echo(render(results))
    if results.get("lr_sweep"):
        rows = [
            {
                "lr": r["lr"],
                **({"weight decay": r["weight_decay"]} if results.get("grid") else {}),
                "best epoch": r["best_epoch"],
                "val top1": r["val_accuracy"],
                "test top1": r["test_accuracy"],
                "selected": "*" if r["selected"] else "",
            }
            for r in results["lr_sweep"]
        ]
        title = f"{name}: {'lr x weight decay' if results.get('grid') else 'lr'} on validation"
        click.echo("\n" + format_table(rows, title=title, percent=("val top1", "test top1")))
    click.echo(f"\nresults: {out_dir}/results.json")


@click.group("probe")
@storage_option_option()
def probe_command(storage_option: tuple[str, ...]) -> None:
    """Train and evaluate probes on a feature store (no U-Net needed).

    \b
    Selection is on the validation split, the report on test. Every command writes
    OUT/results.json (metrics, exact config, store fingerprint, seeds, split definition)
    and prints a table; training commands save weights as safetensors and resume when rerun.
    """


@probe_command.command("linear")
@_common
@_training
@click.option("--lr", default=None, type=float, help="learning rate " + _recipe_value("lr"))
@click.option("--batchnorm", is_flag=True, help="parameter-free BatchNorm before the linear layer (MAE-style)")
def linear(**kwargs: Any) -> None:
    """The paper's linear head on one feature (default t090_b24_avg2)."""
    _run("linear", **_one_weight_decay(kwargs))


@probe_command.command("attention")
@_common
@_training
@_transformer
def attention(**kwargs: Any) -> None:
    """The attention-pool head on one block map (default t090_b24_tok16)."""
    _run("attention", **_lr_values(kwargs))


@probe_command.command("fusion")
@_common
@_training
@_transformer
def fusion(**kwargs: Any) -> None:
    """DifFormer over blocks x timesteps (default blocks 19, 24, 30 x t 90, 150, 300)."""
    _run("fusion", **_lr_values(kwargs))


@probe_command.command("logistic")
@_common
@click.option(
    "--solver",
    type=click.Choice(LOGISTIC_SOLVERS),
    default=LogisticOptions.solver,
    show_default=True,
    help="torch: exact full-batch L-BFGS (CPU or --device cuda); sklearn: scikit-learn's lbfgs on the CPU",
)
@click.option(
    "--l2", "l2s", multiple=True, type=float, help="L2 strengths (repeatable; torch default 1e-2, 1e-3, 1e-4, 1e-5)"
)
@click.option(
    "--c",
    "cs",
    multiple=True,
    type=float,
    help="C values instead of --l2, C = 1/(l2 n_train) (repeatable; sklearn default DINOv2's 45 from 1e-6 to 1e5)",
)
@click.option("--max-iter", default=None, type=int, help="lbfgs iterations per fit (default torch 300, sklearn 1000)")
@click.option(
    "--refit",
    type=click.Choice(REFIT_CHOICES),
    default=LogisticOptions.refit,
    show_default=True,
    help="what the selected L2 is refit on (train: score the selected fit itself)",
)
@device_option(LogisticOptions.device, help="torch device of the L-BFGS solver (torch solver), e.g. cuda:0")
def logistic(**kwargs: Any) -> None:
    """Multinomial logistic regression, L2 selected on validation, refit on train+val; logits to logits.npz."""
    kwargs["cs"] = list(kwargs["cs"]) or None
    kwargs["l2s"] = list(kwargs["l2s"]) or None
    _run("logistic", **kwargs)


@probe_command.command("knn")
@_common
@click.option("--k", "ks", multiple=True, type=int, help="k values (repeatable; default 10, 20, 100, 200)")
@click.option("--temperature", default=KnnOptions.temperature, show_default=True, type=float)
@click.option(
    "--batch-size", default=KnnOptions.batch_size, show_default=True, type=int, help="bank rows per similarity chunk"
)
@device_option(KnnOptions.device, help="torch device of the similarity search, e.g. cuda:0")
def knn(**kwargs: Any) -> None:
    """Cosine kNN with exp(sim/T)-weighted votes, k selected on validation."""
    if not kwargs["ks"]:
        kwargs.pop("ks")
    else:
        kwargs["ks"] = list(kwargs["ks"])
    _run("knn", **kwargs)


@probe_command.command("sweep")
@_common
@_training
@click.option(
    "--lr", "lrs", multiple=True, type=float, help="learning rates (repeatable) " + _recipe_value("lrs", "sweep")
)
@cluster_options
def sweep(**kwargs: Any) -> None:
    """Linear heads for every (t, block, pooling) x lr in one pass; heat map over t x block.

    \b
    --workers N / --scheduler ADDR: the features are split across dask workers (extra
    `cluster`), each reading the store itself; the results are those of one process.
    """
    one_cluster(kwargs["workers"], kwargs["scheduler"])
    if not kwargs["lrs"]:
        kwargs.pop("lrs")
    else:
        kwargs["lrs"] = list(kwargs["lrs"])
    where = (kwargs["workers"], kwargs["scheduler"])
    _run("sweep", cluster=None if where == (None, None) else where, **_one_weight_decay(kwargs))


@contextmanager
def _started_cluster(
    where: tuple[int | None, str | None] | None, store: Any, features: list[str] | None
) -> Iterator[StartingClient | None]:
    """A sweep's dask cluster (None: none asked for), started once the store opened and the features named are
    in it, and before the probes are imported (torch: seconds), so the workers start and import them meanwhile."""
    if where is None:
        yield None
        return
    if features:
        check_features(store, features)
    with sweep_cluster(*where) as cluster:
        yield cluster


def _add_compare() -> None:
    from diffbank.commands.compare import compare_command

    probe_command.add_command(compare_command, "compare")


def _add_feedback() -> None:
    # DifFeed runs the U-Net (the one probe that does); its command module imports it only when run.
    from diffbank.commands.feedback import feedback_command

    probe_command.add_command(feedback_command, "feedback")


_add_compare()
_add_feedback()
