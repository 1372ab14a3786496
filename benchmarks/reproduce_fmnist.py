"""README's Fashion-MNIST figures as a sequence of `diffbank` commands, run and collected.

Stages (`--stages`, in this order; each step's command line is printed and recorded):

- extract: `diffbank extract` of cache_specs/fmnist_full.yaml (trained) and fmnist_full_random.yaml (random
  control) into --stores (a rerun resumes an interrupted store and leaves a complete one as it is);
- pixels: benchmarks/fmnist_reproduction.py's raw-pixels arm, written as a probe run (OUT/pixels) with the
  trained store's sample ids (no store holds pixels);
- logistic: `diffbank probe logistic --refit train --feature F` for each candidate feature on each store
  (OUT/logistic/STORE/F); per store the feature with the highest validation accuracy is selected (ties: the
  earliest in --features order), and its test accuracy reported;
- heads: `diffbank probe attention` on the selected trained feature's block and t as 8x8 tokens (or
  --attention-feature), `diffbank probe fusion` on --fusion-feature, once per --seeds (OUT/heads/KIND_sSEED);
  --attention-args/--fusion-args pass options through (recipe, preset, epochs, lr grid, device); a probe's
  --seed also seeds its validation carve, so seed 1's heads select on other validation images than the
  linear probes (seed 0), and every run is tested on the same test images;
- compare: `diffbank probe compare --json --out` for the named pairs (OUT/compare/NAME.json): trained vs
  random, trained vs pixels, random vs pixels, each head vs the exact linear probe, each attention head vs
  the linear probe on the same block's avg4 map (the paper's comparison), fusion vs attention per seed;
- collect: one JSON (--results, default OUT/reproduction_product.json) with, per run, its command line,
  protocol, accuracies, L-BFGS iterations and final losses, wall time, and the paired comparisons.

Each step's command line, wall time and exit status go to OUT/steps/NAME.json.

A step whose run directory already holds results.json (or whose compare JSON exists) is skipped, so a rerun
resumes. Full data on a 2-core CPU (long run: extraction 17 + 7 min, ~35 min of fits per store, heads ~1 h each):

    python benchmarks/reproduce_fmnist.py --out runs/product --stores runs/full --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = {
    "trained": ROOT / "cache_specs" / "fmnist_full.yaml",
    "random": ROOT / "cache_specs" / "fmnist_full_random.yaml",
}
STORE_NAMES = {"trained": "fmnist_full.zarr", "random": "fmnist_full_random.zarr"}
STAGES = ("extract", "pixels", "logistic", "heads", "compare", "collect")
# The t=5 linear grid of docs/results.md in the benchmark's order (t, block, pooling sorted): ties on
# validation go to the earliest, as in fmnist_reproduction.probe_grid.
FEATURES = ("t005_b10_avg4", "t005_b10_tok8", "t005_b12_avg4", "t005_b12_tok8", "t005_b13_avg4", "t005_b13_tok8")
# DifFormer's inputs in docs/results.md: blocks 10/12/13 x t 5/10/25, 4x4 maps (trained store only).
FUSION_FEATURES = tuple(f"t{t:03d}_b{b}_avg4" for t in (5, 10, 25) for b in (10, 12, 13))
RESULTS = "results.json"
SELECTION_RULE = "highest validation top-1 among the store's logistic runs; ties: the earliest in the feature order"


@dataclass
class Step:
    """One command of the reproduction, done when `done` exists (None: always run; `diffbank extract` resumes)."""

    name: str
    argv: list[str]
    done: Path | None
    env: dict[str, str] = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def diffbank(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "diffbank", *map(str, args)]


def shown(argv: list[str]) -> str:
    """A step's command line as a user types it: `diffbank ...`, `python benchmarks/...` (paths under the repo
    relative to it)."""
    words = ["diffbank", *argv[3:]] if argv[1:3] == ["-m", "diffbank"] else ["python", *argv[1:]]
    return shlex.join(w.removeprefix(f"{ROOT}{os.sep}") for w in words)


class Runner:
    """Runs steps in turn, skipping finished ones; records command line, wall time and exit status.

    Each step's record is its own file (OUT/steps/NAME.json), so two runs of this script with other --only
    prefixes (one per core) can work in one OUT.
    """

    def __init__(self, out: Path, threads: int | None, only: list[str], dry_run: bool = False):
        self.steps_dir = out / "steps"
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH")) if p)
        if threads:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.only = only
        self.dry_run = dry_run

    def records(self) -> dict[str, dict]:
        """{step name: record} of every step run in OUT so far."""
        files = sorted(self.steps_dir.glob("*.json")) if self.steps_dir.is_dir() else []
        return {(r := json.loads(f.read_text()))["name"]: r for f in files}

    def run(self, step: Step) -> None:
        if self.only and not any(step.name.startswith(prefix) for prefix in self.only):
            return
        line = shown(step.argv)
        if step.done is not None and step.done.exists():
            log(f"skip {step.name} ({step.done} exists): {line}")
            return
        log(f"run  {step.name}: {line}")
        if self.dry_run:
            return
        t0 = time.perf_counter()
        rc = subprocess.run(step.argv, cwd=ROOT, env={**self.env, **step.env}).returncode
        seconds = round(time.perf_counter() - t0, 1)
        record = {"name": step.name, "command": line, "argv": step.argv, "seconds": seconds, "returncode": rc}
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        path = self.steps_dir / (step.name.replace("/", "__") + ".json")
        earlier = json.loads(path.read_text()) if path.is_file() else None
        if earlier is not None and earlier["returncode"] == 0:  # a step without a done marker ran again: the
            earlier.setdefault("reruns", []).append(record)  # first successful run's time is the one that counts
            record = earlier
        path.write_text(json.dumps(record, indent=1))
        if rc != 0:
            raise SystemExit(f"{step.name} failed (exit {rc}): {line}")
        log(f"done {step.name} in {seconds} s")


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / RESULTS).read_text())


def val_top1(results: dict) -> float:
    return float(results["metrics"]["val"]["top1"])


def select_feature(run_dirs: dict[str, Path]) -> str:
    """The feature of the highest validation accuracy; ties go to the earliest in `run_dirs` order."""
    best = None
    for feature, run_dir in run_dirs.items():
        acc = val_top1(read_results(run_dir))
        if best is None or acc > best[1]:
            best = (feature, acc)
    if best is None:
        raise SystemExit("no logistic run to select from")
    return best[0]


def tokens_of(feature: str) -> str:
    """The 8x8-token map of a feature's t and block (t005_b10_avg4 -> t005_b10_tok8)."""
    return feature.rsplit("_", 1)[0] + "_tok8"


def avg4_of(feature: str) -> str:
    return feature.rsplit("_", 1)[0] + "_avg4"


def run_summary(name: str, run_dir: Path, steps: dict[str, dict]) -> dict:
    """What the collected JSON says about one run: command, protocol, accuracies, fits, wall time."""
    r = read_results(run_dir)
    splits = (r.get("split_definition") or {}).get("splits", {})
    sizes = {s: splits[s]["n"] for s in ("train", "val", "test") if s in splits}
    out: dict = {
        "run": str(run_dir),
        "command_line": (steps.get(name) or {}).get("command"),
        "wall_seconds": (steps.get(name) or {}).get("seconds"),
        "probe": r.get("method") or r.get("command"),
        "features": r.get("features"),
        "store_fingerprint": (r.get("store") or {}).get("fingerprint"),
        "protocol": {
            "sizes": sizes,
            "split_seed": (r.get("seeds") or {}).get("split"),
            "validation": (r.get("split_definition") or {}).get("source", {}).get("val"),
        },
        "val_top1": val_top1(r),
        "test_top1": float(r["metrics"]["test"]["top1"]),
        "selected": r.get("selected"),
    }
    if "sweep" in r:  # logistic fits: L-BFGS iterations and final loss per L2
        out["protocol"]["selected_on_val"] = "L2"
        out["refit_on"] = r.get("refit_on")
        out["fits"] = [
            {k: row.get(k) for k in ("l2", "val_top1", "iterations", "loss", "hit_max_iter")} for row in r["sweep"]
        ]
    else:  # trained heads
        out["protocol"]["selected_on_val"] = "epoch" + (" and grid head (lr x weight decay)" if r.get("grid") else "")
        out["recipe"] = r.get("recipe")
        out["training"] = r.get("training")
    if "timings" in r:
        out["probe_seconds"] = r["timings"].get("total_s")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="run directories, compare JSONs, step records")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--stores", type=Path, default=Path("runs/full"), help="folder of the two stores")
    ap.add_argument("--trained-store", default=None, help="trained store path (default: STORES/fmnist_full.zarr)")
    ap.add_argument("--random-store", default=None, help="random store path (default: STORES/fmnist_full_random.zarr)")
    ap.add_argument("--trained-spec", type=Path, default=SPECS["trained"])
    ap.add_argument("--random-spec", type=Path, default=SPECS["random"])
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the probe commands")
    ap.add_argument("--features", default=",".join(FEATURES), help="candidate features of the linear selection")
    ap.add_argument("--attention-feature", default=None, help="default: the selected trained feature's tok8 map")
    ap.add_argument("--fusion-feature", action="append", default=None, help=f"repeatable; default {FUSION_FEATURES}")
    ap.add_argument("--seeds", default="0,1", help="head seeds")
    ap.add_argument("--heads", default="attention,fusion", help="head kinds to train")
    ap.add_argument("--extract-args", default="", help="extra options of diffbank extract (quoted)")
    ap.add_argument("--pixels-args", default="", help="extra options of fmnist_reproduction.py's pixels stage")
    ap.add_argument("--logistic-args", default="", help="extra options of probe logistic, e.g. '--device cuda'")
    ap.add_argument("--attention-args", default="", help="extra options of probe attention, e.g. '--recipe attentive'")
    ap.add_argument("--fusion-args", default="", help="extra options of probe fusion")
    ap.add_argument("--results", type=Path, default=None, help="collected JSON (default OUT/reproduction_product.json)")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PREFIX",
        help="run only steps whose name starts with PREFIX (repeatable), e.g. logistic/random: a second process",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the command lines without running them")
    args = ap.parse_args(argv)
    stages = args.stages.split(",")
    if set(stages) - set(STAGES):
        raise SystemExit(f"--stages: unknown {sorted(set(stages) - set(STAGES))}; choose from {', '.join(STAGES)}")
    features = args.features.split(",")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    kinds = [k for k in args.heads.split(",") if k]
    if set(kinds) - {"attention", "fusion"}:
        raise SystemExit(f"--heads: choose from attention, fusion (got {args.heads})")
    stores = {
        "trained": args.trained_store or str(args.stores / STORE_NAMES["trained"]),
        "random": args.random_store or str(args.stores / STORE_NAMES["random"]),
    }
    specs = {"trained": args.trained_spec, "random": args.random_spec}
    out: Path = args.out
    runner = Runner(out, args.threads, args.only, args.dry_run)
    logistic_dir = {s: {f: out / "logistic" / s / f for f in features} for s in stores}
    pixels_dir = out / "pixels"

    if "extract" in stages:
        for name in ("trained", "random"):
            argv_ = diffbank("extract", specs[name], "--store", stores[name], "--no-progress")
            runner.run(Step(f"extract/{name}", argv_ + shlex.split(args.extract_args), None))

    if "pixels" in stages:
        argv_ = [sys.executable, str(ROOT / "benchmarks" / "fmnist_reproduction.py"), "--stages", "pixels"]
        argv_ += ["--out", str(out / "pixels_benchmark"), "--pixels-run", str(pixels_dir)]
        argv_ += ["--ids-store", stores["trained"]]
        if args.threads:
            argv_ += ["--threads", str(args.threads)]
        runner.run(Step("pixels", argv_ + shlex.split(args.pixels_args), pixels_dir / RESULTS))

    if "logistic" in stages:
        for name in ("trained", "random"):
            for feature, run_dir in logistic_dir[name].items():
                argv_ = diffbank("probe", "logistic", stores[name], "--out", run_dir, "--refit", "train")
                argv_ += ["--feature", feature, "-q"] + shlex.split(args.logistic_args)
                runner.run(Step(f"logistic/{name}/{feature}", argv_, run_dir / RESULTS))

    def selected(name: str) -> str:
        return select_feature({f: d for f, d in logistic_dir[name].items() if (d / RESULTS).is_file()})

    head_dirs = {(k, s): out / "heads" / f"{k}_s{s}" for k in kinds for s in seeds}
    attention_feature = args.attention_feature
    if "heads" in stages:
        if attention_feature is None and "attention" in kinds:
            finished = any((d / RESULTS).is_file() for d in logistic_dir["trained"].values())
            # a dry run before the logistic runs exist names the map by its rule
            attention_feature = tokens_of(selected("trained")) if finished or not args.dry_run else "SELECTED_tok8"
        for (kind, seed), run_dir in head_dirs.items():
            feats = [attention_feature] if kind == "attention" else (args.fusion_feature or list(FUSION_FEATURES))
            argv_ = diffbank("probe", kind, stores["trained"], "--out", run_dir, "--seed", str(seed), "-q")
            for f in feats:
                argv_ += ["--feature", str(f)]
            argv_ += shlex.split(args.attention_args if kind == "attention" else args.fusion_args)
            runner.run(Step(f"heads/{kind}_s{seed}", argv_, run_dir / RESULTS))

    compare_dir = out / "compare"
    if "compare" in stages or "collect" in stages:
        pairs = named_pairs(logistic_dir, selected, pixels_dir, head_dirs, seeds)
    if "compare" in stages:
        if not args.dry_run:
            compare_dir.mkdir(parents=True, exist_ok=True)
        for name, (a, b) in pairs.items():
            target = compare_dir / f"{name}.json"
            argv_ = diffbank("probe", "compare", a, b, "--json", "--out", target)
            runner.run(Step(f"compare/{name}", argv_, target))

    if "collect" in stages and not args.dry_run:
        collected = collect(out, stores, logistic_dir, selected, pixels_dir, head_dirs, pairs, runner.records())
        target = args.results or out / "reproduction_product.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(collected, indent=1))
        log(f"collected: {target}")


def named_pairs(logistic_dir, selected, pixels_dir: Path, head_dirs: dict, seeds: list[int]) -> dict:
    """{name: (run A, run B)} of the comparisons whose two runs exist."""
    linear = {}
    for name, runs in logistic_dir.items():
        if any((d / RESULTS).is_file() for d in runs.values()):
            linear[name] = runs[selected(name)]
    pairs: dict[str, tuple[Path, Path]] = {}
    if "trained" in linear and "random" in linear:
        pairs["trained_vs_random"] = (linear["trained"], linear["random"])
    for name in ("trained", "random"):
        if name in linear:
            pairs[f"{name}_vs_pixels"] = (linear[name], pixels_dir)
    for (kind, seed), run_dir in head_dirs.items():
        if "trained" in linear:
            pairs[f"{kind}_s{seed}_vs_linear"] = (run_dir, linear["trained"])
        if kind == "attention":  # the paper's comparison: linear on the block's avg4 map vs attention on its tokens
            pooled_feature = avg4_of(read_results(run_dir)["features"][0]) if (run_dir / RESULTS).is_file() else ""
            pooled = logistic_dir["trained"].get(pooled_feature)
            if pooled is not None and pooled != linear.get("trained"):
                pairs[f"attention_s{seed}_vs_linear_{pooled_feature}"] = (run_dir, pooled)
    for seed in seeds:
        if ("fusion", seed) in head_dirs and ("attention", seed) in head_dirs:
            pairs[f"fusion_s{seed}_vs_attention_s{seed}"] = (
                head_dirs[("fusion", seed)],
                head_dirs[("attention", seed)],
            )
    return {
        name: (a, b)
        for name, (a, b) in pairs.items()
        if (Path(a) / RESULTS).is_file() and (Path(b) / RESULTS).is_file()
    }


def collect(out: Path, stores, logistic_dir, selected, pixels_dir, head_dirs, pairs, steps) -> dict:
    """One JSON of every run and comparison of the reproduction, from the runs' own files."""
    result: dict = {
        "what": "README's Fashion-MNIST figures through diffbank commands (benchmarks/reproduce_fmnist.py)",
        "stores": stores,
        "extract": {k: v for k, v in steps.items() if k.startswith("extract/")},
        "selection": SELECTION_RULE,
        "validation": "each run carves its own stratified 10% of train with its --seed (linear probes: seed 0); "
        "protocol.sizes and protocol.split_seed per run",
        "linear": {},
        "heads": {},
        "compare": {},
    }
    for name, runs in logistic_dir.items():
        done = {f: d for f, d in runs.items() if (d / RESULTS).is_file()}
        if not done:
            continue
        choice = selected(name)
        chosen = read_results(done[choice])
        log(f"{name}: {choice} selected on val ({val_top1(chosen):.4f}), test {chosen['metrics']['test']['top1']:.4f}")
        result["linear"][name] = {
            "candidates": list(runs),
            "selected_feature": choice,
            "selected_on": "val",
            "test_top1_of_selected": float(chosen["metrics"]["test"]["top1"]),
            "runs": {f: run_summary(f"logistic/{name}/{f}", d, steps) for f, d in done.items()},
        }
    if (pixels_dir / RESULTS).is_file():
        pixels = run_summary("pixels", pixels_dir, steps)
        pixels["protocol"]["text"] = read_results(pixels_dir).get("protocol")
        result["pixels"] = pixels
    for (kind, seed), run_dir in head_dirs.items():
        if (run_dir / RESULTS).is_file():
            result["heads"][f"{kind}_s{seed}"] = run_summary(f"heads/{kind}_s{seed}", run_dir, steps)
    for name in pairs:
        path = out / "compare" / f"{name}.json"
        if path.is_file():
            report = json.loads(path.read_text())
            result["compare"][name] = {"command_line": (steps.get(f"compare/{name}") or {}).get("command"), **report}
    return result


if __name__ == "__main__":
    main()
