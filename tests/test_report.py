"""probe/report.py: JSON round trip, tables, figures."""

import json

import numpy as np

from probe.report import format_table, plot_accuracy_vs_t, plot_heatmap, read_results, render, write_results


def test_json_round_trip(tmp_path):
    results = {
        "metrics": {"top1": np.float32(0.5), "nan": float("nan"), "cm": np.eye(2, dtype=np.int64)},
        "seed": np.int64(3),
        "shape": (1, 2),
        "path": tmp_path,
    }
    path = write_results(tmp_path / "r" / "results.json", results)
    back = read_results(path)
    assert back["metrics"] == {"top1": 0.5, "nan": None, "cm": [[1, 0], [0, 1]]}
    assert back["seed"] == 3 and back["shape"] == [1, 2] and back["path"] == str(tmp_path)
    assert back["environment"]["versions"]["numpy"] == np.__version__
    json.loads(path.read_text())  # strict JSON: no NaN literals
    assert not list(path.parent.glob("*.tmp"))


def test_table_is_aligned():
    text = format_table([{"name": "a", "top1": 0.5}, {"name": "longer", "top1": 0.91234}], percent=("top1",), title="T")
    lines = text.splitlines()
    assert lines[0] == "T" and lines[3].startswith("a ") and lines[4].startswith("longer")
    assert len({len(line) for line in lines[1:]}) == 1  # numbers right-aligned to one column edge
    assert lines[4].endswith("91.23")
    summary = render(
        {
            "command": "linear",
            "features": ["f"],
            "metrics": {"test": {"n": 4, "top1": 0.5, "top5": 1.0, "mean_per_class_accuracy": 0.5}},
        }
    )
    assert "test" in summary and "50.00" in summary


def test_heatmap_and_curves_are_written(tmp_path):
    values = {(t, b): 0.1 * i for i, (t, b) in enumerate((t, b) for t in (50, 90, 150) for b in (19, 24))}
    for path in (
        plot_heatmap(values, tmp_path / "h.png", labels={(90, 24): "avg2"}, best=(90, 24)),
        plot_accuracy_vs_t(values, tmp_path / "c.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_results_are_created_with_the_users_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = write_results(tmp_path / "results.json", {"top1": 0.5})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by teammates, as any file the user creates
    assert not list(tmp_path.glob("*.tmp"))


def test_c_and_lr_read_in_scientific_notation():
    text = format_table([{"C": 1e-6, "lr": 0.05, "top1": 0.5}, {"C": 0.0017782794100389228, "lr": 0.001, "top1": 0.25}])
    assert "1.0e-06" in text and "1.8e-03" in text and "5.0e-02" in text and "1.0e-03" in text
    assert "0.0000" not in text and "0.0018" not in text
    assert "0.5000" in text  # other floats keep their fixed precision


def _logistic_results(n: int) -> dict:
    from probe.baselines import c_grid

    cs = c_grid(n)
    best = n // 3
    return {
        "command": "logistic",
        "features": ["f"],
        "sweep": [{"C": c, "val_top1": 0.9 if i == best else 0.5} for i, c in enumerate(cs)],
        "selected": {"C": cs[best], "val_top1": 0.9},
        "metrics": {"test": {"n": 4, "top1": 0.5, "top5": 1.0, "mean_per_class_accuracy": 0.5}},
    }


def test_logistic_table_shows_the_selected_row_and_a_compact_grid():
    results = _logistic_results(45)
    chosen = f"{results['selected']['C']:.1e}"
    text = render(results)
    table = text.split("\n\n")
    assert len(text.splitlines()) < 30  # not a line per C value (45)
    assert chosen in table[0] and "90.00" in table[0]  # the selected row comes first
    grid = table[1].splitlines()[1:]
    assert len(grid) == 9 and sum(line.count("*") for line in grid) == 1 and f"{chosen} 90.00*" in table[1]
    assert "1.0e-06" in grid[0] and "1.0e+05" in grid[-1]
    assert f"selected on val: C={chosen}, val_top1=0.9" in text
    assert str(results["selected"]["C"]) not in text  # no 17-digit floats


def test_few_candidates_keep_one_row_each():
    text = render(_logistic_results(4))
    assert "all 4" not in text and text.count("*") == 1
