"""Results for machines (JSON) and for people (aligned tables, heat maps, curves).

(The metrics themselves are `probe.metrics`.)

- `write_results` / `read_results`: a JSON file written atomically, NaN as null, numpy values as plain JSON,
  with the library versions of the run (`environment()`).
- `format_table`: a plain-text table with aligned columns; C and lr in scientific notation (`number_text`).
- `render`: what a probe command prints: candidates (a compact grid when there are many), summary, selection.
- `plot_heatmap` / `plot_accuracy_vs_t`: the paper's (timestep x block) ablation figure drawn from the cache,
  and accuracy-over-t curves per block. Matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from extract.provenance import CORE_PACKAGES, package_versions, to_jsonable

RESULTS_SCHEMA = "diffbank.probe.results/1"


# ------------------------------------------------------------------------------------------------- JSON

# Besides the store's core packages: what drew the figures.
_REPORT_PACKAGES = (*CORE_PACKAGES, "matplotlib")


def environment() -> dict[str, Any]:
    """Library versions and platform of this process: what a result was computed with."""
    return {
        "versions": package_versions(_REPORT_PACKAGES),
        "platform": platform.platform(),
        "executable": sys.executable,
    }


def write_results(path: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Write `results` as JSON atomically (a reader never sees half a file); adds schema and environment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": RESULTS_SCHEMA, **to_jsonable(results)}
    doc.setdefault("environment", environment())
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    # A plain open honours the user's umask (mkstemp makes 0600 files teammates cannot read).
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------------------------- tables


# Columns and settings that span decades (C from 1e-6 to 1e5, lr from 1e-3 to 1e-1): scientific notation, so
# that 0.0017782794100389228 reads 1.8e-03 and small values do not round to 0.0000.
SCIENTIFIC = ("C", "lr")
# Above this many candidates (logistic's 45 C values), `render` prints a compact grid instead of one row each.
COMPACT_ABOVE = 12


def scientific(value: float) -> str:
    """`value` with two significant digits in scientific notation: 0.0017782794 -> 1.8e-03."""
    return f"{float(value):.1e}"


def number_text(key: str, value: Any) -> str:
    """A setting as people read it: C and lr scientific, other floats with 4 significant digits."""
    if key in SCIENTIFIC and _is_number(value):
        return scientific(value)
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def _cell(value: Any, precision: int, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if column in SCIENTIFIC and _is_number(value):
        return scientific(value)
    if isinstance(value, (float, np.floating)):
        return "nan" if not math.isfinite(float(value)) else f"{float(value):.{precision}f}"
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    title: str | None = None,
    precision: int = 4,
    percent: Sequence[str] = (),
) -> str:
    """A plain-text table: text left-aligned, numbers right-aligned, a rule under the header.

    `percent` names columns holding fractions to show as percentages (0.6491 -> 64.91); the columns in
    `SCIENTIFIC` (C, lr) show in scientific notation (1.8e-03).
    """
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    headers = dict(headers or {})
    text_rows = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            if c in percent and isinstance(v, (int, float, np.number)) and v is not None:
                cells.append(f"{100 * float(v):.2f}")
            else:
                cells.append(_cell(v, precision, c))
        text_rows.append(cells)
    numeric = [all(_is_number(r.get(c)) for r in rows if r.get(c) is not None) for c in columns]
    names = [headers.get(c, c) for c in columns]
    widths = [max([len(n)] + [len(tr[i]) for tr in text_rows]) for i, n in enumerate(names)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(names), "  ".join("-" * w for w in widths)]
    out += [line(tr) for tr in text_rows]
    return "\n".join(out)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def summary_table(results: Mapping[str, Any]) -> str:
    """The table a command prints: one row per evaluated split (and per candidate for sweeps)."""
    rows = []
    for split in ("val", "test"):
        m = results.get("metrics", {}).get(split)
        if m:
            rows.append(
                {
                    "split": split,
                    "n": m["n"],
                    "top1": m["top1"],
                    "top5": m.get("top5"),
                    "mean/class": m.get("mean_per_class_accuracy"),
                }
            )
    title = f"{results.get('command', 'probe')}: {', '.join(results.get('features', []))}"
    return format_table(
        rows, ["split", "n", "top1", "top5", "mean/class"], title=title, percent=("top1", "top5", "mean/class")
    )


def sweep_table(results: Mapping[str, Any]) -> str:
    """The sweep's grid: per (t, block), the validation-selected pooling and lr with its accuracies."""
    rows = [
        {
            "t": g["t"],
            "block": g["block"],
            "pool": g["pool"],
            "lr": g["lr"],
            "val top1": g["val_top1"],
            "test top1": g["test_top1"],
        }
        for g in results.get("grid", [])
    ]
    sel = results.get("selected", {})
    return format_table(
        rows,
        title=f"sweep: {len(results.get('sweep', []))} heads; selected on val: {sel.get('feature')} "
        f"lr={number_text('lr', sel.get('lr'))}",
        percent=("val top1", "test top1"),
    )


def render(results: Mapping[str, Any]) -> str:
    """What a command prints for people: the sweep grid (for sweeps) and the val/test summary."""
    parts = []
    if results.get("command") == "sweep":
        parts.append(sweep_table(results))
    elif results.get("sweep"):
        parts.append(candidates_table(results))
    parts.append(summary_table(results))
    sel = {k: v for k, v in (results.get("selected") or {}).items()}
    if sel:
        parts.append("selected on val: " + ", ".join(f"{k}={number_text(k, v)}" for k, v in sel.items()))
    draws = results.get("noise_draws") or {}
    if draws.get("store_draws", 1) > 1:
        parts.append(f"noise draws: trained on {draws['train']}; evaluated on {draws['eval']}")
    return "\n\n".join(parts)


def candidates_table(results: Mapping[str, Any], per_line: int = 5) -> str:
    """Logistic's C values or kNN's k values on validation, the selected one marked `*`.

    Up to `COMPACT_ABOVE` candidates: one row each. More (logistic's default 45): the selected row, then a
    compact grid of `per_line` (value, val top1) pairs a line.
    """
    key = "C" if results.get("command") == "logistic" else "k"
    chosen = (results.get("selected") or {}).get(key)
    rows = [
        {key: r[key], "val top1": r["val_top1"], "selected": "*" if r[key] == chosen else ""} for r in results["sweep"]
    ]
    title = f"{results.get('command')}: {key} on validation"
    if len(rows) <= COMPACT_ABOVE:
        return format_table(rows, title=title, percent=("val top1",))
    picked = [r for r in rows if r["selected"]]
    head = format_table(picked, [key, "val top1"], title=f"{title}: {len(rows)} values, selected", percent=("val top1",))
    pairs = [(_cell(r[key], 4, key), f"{100 * float(r['val top1']):.2f}{r['selected'] or ' '}") for r in rows]
    width_key = max(len(k) for k, _ in pairs)
    width_val = max(len(v) for _, v in pairs)
    lines = [
        "   ".join(f"{k.rjust(width_key)} {v.rjust(width_val)}" for k, v in pairs[i : i + per_line]).rstrip()
        for i in range(0, len(pairs), per_line)
    ]
    return "\n".join([head, "", f"all {len(rows)} ({key}, val top1), * selected:", *lines])


def per_class_table(metrics: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    names = class_names or metrics.get("class_names") or [str(i) for i in range(len(metrics["per_class_accuracy"]))]
    rows = [
        {"class": n, "n": s, "accuracy": a} for n, s, a in zip(names, metrics["support"], metrics["per_class_accuracy"])
    ]
    return format_table(rows, ["class", "n", "accuracy"], percent=("accuracy",))


# ----------------------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(
    values: Mapping[tuple[int, int], float],
    path: str | os.PathLike,
    *,
    title: str = "top-1 accuracy",
    xlabel: str = "block",
    ylabel: str = "timestep t",
    labels: Mapping[tuple[int, int], str] | None = None,
    percent: bool = True,
    best: tuple[int, int] | None = None,
) -> Path:
    """Heat map of accuracy over (timestep, block); every cell annotated, the best one outlined.

    `values` maps (t, block) to an accuracy in [0, 1]; missing cells are left blank. `labels` adds a second
    line to a cell (e.g. the pooling that won it). `best` names the cell to outline (e.g. the one selected
    on validation); by default the highest value.
    """
    if not values:
        raise ValueError("no values to draw")
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    ts = sorted({t for t, _ in values})
    blocks = sorted({b for _, b in values})
    grid = np.full((len(ts), len(blocks)), np.nan)
    for (t, b), v in values.items():
        grid[ts.index(t), blocks.index(b)] = np.nan if v is None else float(v)
    scale = 100.0 if percent else 1.0
    fig_w = max(4.0, 0.8 * len(blocks) + 2.0)
    fig_h = max(3.0, 0.6 * len(ts) + 1.6)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    try:
        finite = grid[np.isfinite(grid)]
        im = ax.imshow(
            grid * scale,
            cmap="viridis",
            aspect="auto",
            vmin=float(finite.min()) * scale if finite.size else None,
            vmax=float(finite.max()) * scale if finite.size else None,
        )
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_yticks(range(len(ts)), [str(t) for t in ts])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        word = "best"
        if best is not None and best in values:
            best, word = (ts.index(best[0]), blocks.index(best[1])), "selected"
        elif finite.size:
            row, col = np.unravel_index(np.nanargmax(grid), grid.shape)
            best = (int(row), int(col))
        else:
            best = None
        mid = (float(finite.min()) + float(finite.max())) / 2 if finite.size else 0.0
        for i in range(len(ts)):
            for j in range(len(blocks)):
                v = grid[i, j]
                if not np.isfinite(v):
                    continue
                text = f"{v * scale:.1f}" if percent else f"{v:.3f}"
                extra = (labels or {}).get((ts[i], blocks[j]))
                if extra:
                    text += f"\n{extra}"
                is_best = best is not None and (i, j) == best
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7,
                    fontweight="bold" if is_best else "normal",
                    color="black" if v > mid else "white",
                )
        if best is not None:
            i, j = best
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
            title = f"{title}\n{word}: t={ts[i]}, block {blocks[j]}: {grid[i, j] * scale:.2f}{'%' if percent else ''}"
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, label="top-1 (%)" if percent else "top-1")
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_accuracy_vs_t(
    values: Mapping[tuple[int, int], float],
    path: str | os.PathLike,
    *,
    title: str = "top-1 accuracy over timestep",
    percent: bool = True,
    best: tuple[int, int] | None = None,
) -> Path:
    """One line per block: accuracy over t (the paper's curves); the best point (or `best`) marked with a star."""
    if not values:
        raise ValueError("no values to draw")
    plt = _pyplot()
    scale = 100.0 if percent else 1.0
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=110)
    try:
        for b in sorted({b for _, b in values}):
            pts = sorted((t, v) for (t, bb), v in values.items() if bb == b and v is not None)
            ax.plot([t for t, _ in pts], [v * scale for _, v in pts], marker="o", label=f"block {b}")
        if best is not None and values.get(best) is not None:
            (bt, bb), bv = best, values[best]
        else:
            (bt, bb), bv = max(((k, v) for k, v in values.items() if v is not None), key=lambda kv: kv[1])
        ax.plot(
            [bt],
            [bv * scale],
            marker="*",
            markersize=16,
            color="red",
            linestyle="none",
            label=f"best: t={bt}, block {bb}",
        )
        ax.set_xlabel("timestep t")
        ax.set_ylabel("top-1 (%)" if percent else "top-1")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
