"""`diffbank spec check` on hostile spec files, beside a valid spec for reference.

Files (written to a temporary folder): the billion-laughs bomb (9 levels of 10 aliases), a 50 MB
spec listing 8.7 million timesteps, 100k-deep flow nesting, a 900 KB `name:`, and
cache_specs/cpu_small.yaml as the reference. For each: the exit status, the wall time of the whole
command in a fresh process (interpreter start and imports included; best of --repeat) and of
`load_spec` alone in this process (best of --repeat), and the size of the answer. `diffbank --version`
and the import of the spec package are timed the same way: the start-up every `spec check` pays (a refusal
before resolution imports no torch; resolving a spec does).

    python benchmarks/bench_spec_limits.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extract.spec import SpecError, load_spec  # noqa: E402

BASE = yaml.safe_dump(
    {
        "name": "bench",
        "model": {"flags": {"image_size": 32, "num_channels": 32}},
        "dataset": {"kind": "digits"},
        "features": {"timesteps": [10], "blocks": [2], "pooling": [1]},
    }
)


def bomb() -> str:
    lines = ['lol0: &lol0 "lol"']
    lines += [f"lol{i}: &lol{i} [" + ", ".join([f"*lol{i - 1}"] * 10) + "]" for i in range(1, 10)]  # 10**9 strings
    return "\n".join(lines) + "\n" + BASE.replace("num_channels: 32", "num_channels: 32\n    x: *lol9")


def cases(folder: Path) -> dict[str, Path]:
    files = {
        "billion laughs": bomb(),
        "100k-deep nesting": BASE.replace(
            "num_channels: 32", "num_channels: 32\n    x: " + "[" * 100_000 + "]" * 100_000
        ),
        "900 KB name": BASE.replace("name: bench", "name: " + "n" * 900_000),
    }
    out = {"reference (cpu_small.yaml)": ROOT / "cache_specs" / "cpu_small.yaml"}
    for label, text in files.items():
        path = folder / (label.replace(" ", "_") + ".yaml")
        path.write_text(text)
        out[label] = path
    big = folder / "50mb.yaml"
    with big.open("w") as f:
        f.write(BASE.replace("- 10\n", "- 10\n" + "  - 1\n" * 8_700_000))
    out["50 MB, 8.7M timesteps"] = big
    return out


def best(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        version = [sys.executable, "-m", "diffbank", "--version"]
        start_s, _ = best(lambda: subprocess.run(version, capture_output=True, cwd=ROOT), args.repeat)
        rows.append(("start-up (diffbank --version)", 0, 0, start_s, 0.0, 0, ""))
        imports = [sys.executable, "-c", "import diffbank.cli, extract.spec"]
        import_s, _ = best(lambda: subprocess.run(imports, capture_output=True, cwd=ROOT), args.repeat)
        rows.append(("start-up + import extract.spec", 0, 0, import_s, 0.0, 0, ""))
        for label, path in cases(Path(tmp)).items():
            cmd = [sys.executable, "-m", "diffbank", "spec", "check", "--no-files", str(path)]
            cli_s, proc = best(lambda c=cmd: subprocess.run(c, capture_output=True, text=True, cwd=ROOT), args.repeat)

            def load(p=path):
                try:
                    load_spec(p, check_files=False)
                    return "accepted"
                except SpecError as exc:
                    return exc.problems[0].replace("\n", " ")[:70]

            load_s, first = best(load, args.repeat)
            answer = len(proc.stdout) + len(proc.stderr)
            rows.append((label, path.stat().st_size, proc.returncode, cli_s, load_s, answer, first))
    print(
        f"{'spec file':<28} {'bytes':>10} {'exit':>4} {'spec check s':>12} {'load_spec s':>11} {'answer':>7}  first problem"
    )
    for label, size, rc, cli_s, load_s, answer, first in rows:
        print(f"{label:<28} {size:>10} {rc:>4} {cli_s:>12.3f} {load_s:>11.4f} {answer:>7}  {first}")


if __name__ == "__main__":
    main()
