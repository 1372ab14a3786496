"""Is a difference between probe runs real? Paired comparison of runs from their results.json + logits.npz.

Two runs are compared image by image on one split (test by default): both accuracies, the difference A - B
with a 95% interval (`probe.significance.INTERVAL_METHOD`), the discordant counts (images only A gets right,
only B gets right) and the exact two-sided McNemar p (`scipy.stats.binomtest`). Several runs give every pair,
each with its Holm-adjusted p as well (the family is all pairs of this comparison).

Images are paired by sample id when both runs saved ids and scored the same set of them (another order, or
another store holding the same samples, is fine); runs without ids are paired by store row when they read the
same store (equal fingerprints) and scored the same rows. Anything else is refused with one line that says
why: the runs were not scored on the same images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from probe.logits import LOGITS_FILE, RESULTS_FILE, SplitScores, read_logits
from probe.options import COMPARE_SPLITS
from probe.significance import INTERVAL_METHOD, holm, mcnemar, paired_difference_interval

__all__ = ["CompareError", "RunScores", "load_run", "compare_runs"]


class CompareError(ValueError):
    """Runs that cannot be compared (missing files, other images); the message is one line."""


@dataclass(frozen=True)
class RunScores:
    """One run's scores on one split, with what identifies the images they belong to."""

    name: str
    path: Path
    command: str | None
    features: list[str]
    fingerprint: str | None
    scores: SplitScores


def load_run(path: str | Path, split: str = "test", name: str | None = None) -> RunScores:
    """A run directory's scores on `split` (results.json and logits.npz); CompareError if it cannot be used."""
    if split not in COMPARE_SPLITS:
        raise CompareError(f"split must be one of {', '.join(COMPARE_SPLITS)}, got {split!r}")
    path = Path(path)
    label = name or path.name or str(path)
    if not (path / RESULTS_FILE).is_file():
        raise CompareError(f"{path}: no {RESULTS_FILE} (not a finished probe run)")
    if not (path / LOGITS_FILE).is_file():
        raise CompareError(f"{path}: no {LOGITS_FILE}; rerun the probe with this diffbank to save its per-image scores")
    results = json.loads((path / RESULTS_FILE).read_text())
    scores, fingerprint = read_logits(path / LOGITS_FILE)
    if split not in scores:
        raise CompareError(f"{path}: {LOGITS_FILE} holds no {split} scores (it has {', '.join(sorted(scores))})")
    if scores[split].labels is None:
        raise CompareError(f"{path}: {LOGITS_FILE} holds no labels; rerun the probe with this diffbank")
    store = results.get("store") or {}
    return RunScores(
        name=label,
        path=path,
        command=results.get("command"),
        features=list(results.get("features") or []),
        fingerprint=fingerprint or store.get("fingerprint"),
        scores=scores[split],
    )


def _aligned(a: RunScores, b: RunScores, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(A's correctness, B's correctness on the same images in A's order, how they were paired).

    Sample ids, where both runs saved them, decide which images are the same (stores written from arrays may
    share a fingerprint while holding their rows in another order); without them, one store's rows do.
    """
    sa, sb = a.scores, b.scores
    assert sa.labels is not None and sb.labels is not None  # load_run refuses scores without labels
    same_rows = a.fingerprint is not None and a.fingerprint == b.fingerprint and np.array_equal(sa.rows, sb.rows)
    if sa.ids is None or sb.ids is None:
        if not same_rows:
            where = "one store" if a.fingerprint == b.fingerprint else "other stores"
            raise CompareError(
                f"{a.name} and {b.name} scored other {split} rows ({len(sa.rows)} vs {len(sb.rows)}, {where}) "
                "and do not name their samples, so they cannot be paired"
            )
        order = np.arange(len(sb.rows))
    else:
        ids_a, ids_b = sa.ids.astype(str), sb.ids.astype(str)
        if len(set(ids_a)) != len(ids_a) or len(set(ids_b)) != len(ids_b):
            raise CompareError(f"{a.name} and {b.name}: sample ids repeat within a run, so images cannot be paired")
        if set(ids_a) != set(ids_b):
            shared = len(set(ids_a) & set(ids_b))
            raise CompareError(
                f"{a.name} and {b.name} scored other {split} images ({len(ids_a)} vs {len(ids_b)}, {shared} "
                "sample ids shared: another store, split or subset)"
            )
        position = {i: k for k, i in enumerate(ids_b)}
        order = np.array([position[i] for i in ids_a], dtype=np.int64)
        same_rows = same_rows and np.array_equal(ids_a, ids_b)
    if not np.array_equal(sa.labels, sb.labels[order]):
        raise CompareError(f"{a.name} and {b.name}: the same {split} images carry other labels in the two runs")
    return sa.correct, sb.correct[order], "store rows" if same_rows else "sample ids"


def _pair(a: RunScores, b: RunScores, split: str) -> dict[str, Any]:
    correct_a, correct_b, matched_by = _aligned(a, b, split)
    test = mcnemar(correct_a, correct_b)
    n = int(len(correct_a))
    both = int(np.sum(correct_a & correct_b))
    only_a, only_b = int(test["only_a"]), int(test["only_b"])
    low, high = paired_difference_interval(both, only_a, only_b, n - both - only_a - only_b)
    return {
        "a": a.name,
        "b": b.name,
        "n": n,
        "matched_by": matched_by,
        "accuracy_a": float(correct_a.mean()),
        "accuracy_b": float(correct_b.mean()),
        "difference": float(correct_a.mean() - correct_b.mean()),
        "ci95": [low, high],
        "both_correct": both,
        "only_a": only_a,
        "only_b": only_b,
        "both_wrong": n - both - only_a - only_b,
        "mcnemar_p": float(test["p_value"]),
    }


def compare_runs(paths: Sequence[str | Path], split: str = "test") -> dict[str, Any]:
    """Every pair of the runs in `paths` (at least two), compared on `split`. Returns the JSON-able report."""
    if len(paths) < 2:
        raise CompareError(f"compare needs at least two runs, got {len(paths)}")
    names = [Path(p).name or str(p) for p in paths]
    if len(set(names)) != len(names):  # two runs named alike (runs/a/final, runs/b/final) go by their paths
        names = [str(p) for p in paths]
    runs = [load_run(p, split, name) for p, name in zip(paths, names)]
    pairs = [_pair(a, b, split) for a, b in combinations(runs, 2)]
    for pair, adjusted in zip(pairs, holm([p["mcnemar_p"] for p in pairs])):
        pair["holm_p"] = adjusted
    report: dict[str, Any] = {
        "split": split,
        "runs": [
            {
                "name": r.name,
                "path": str(r.path),
                "command": r.command,
                "features": r.features,
                "store_fingerprint": r.fingerprint,
                "n": int(len(r.scores.rows)),
                "accuracy": float(r.scores.correct.mean()),
            }
            for r in runs
        ],
        "pairs": pairs,
        "difference": "accuracy_a - accuracy_b (fractions)",
        "interval": INTERVAL_METHOD,
        "test": "exact two-sided McNemar (binomial test on the discordant counts only_a, only_b)",
    }
    if len(pairs) > 1:
        report["multiple_comparisons"] = (
            f"{len(pairs)} pairs tested: holm_p is the Holm-adjusted p over all of them; "
            "the unadjusted mcnemar_p and ci95 hold for one pair chosen in advance"
        )
    return report
