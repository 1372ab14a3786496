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
