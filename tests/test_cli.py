"""diffbank/cli.py and the layering it relies on: -v/-q set the status level; optional extras explain
themselves; the store loads without the spec, the model or the CLI."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from diffbank.cli import main


@pytest.mark.parametrize("flags, level", [([], logging.INFO), (["-v"], logging.DEBUG), (["-q"], logging.WARNING)])
def test_verbosity_sets_the_status_level(flags, level, tmp_path):
    result = CliRunner().invoke(main, [*flags, "spec", "schema"])
    assert result.exit_code == 0, result.output
    for name in ("diffbank", "extract", "probe"):
        assert logging.getLogger(name).level == level


def test_cluster_without_distributed_says_which_extra(monkeypatch, tmp_path):
    from extract.cluster import extract_distributed
    from extract.pipeline import ExtractionError

    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # as if the extra were not installed
    with pytest.raises(ExtractionError, match=r"pip install 'diffbank\[cluster\]'"):
        extract_distributed({}, tmp_path / "x.zarr", workers=2)


def test_the_store_imports_no_spec_model_or_cli():
    code = (
        "import sys, extract.store; bad = [m for m in sys.modules if m.startswith(('extract.spec', "
        "'extract.models', 'extract.pipeline', 'diffbank', 'torch'))]; print(bad); assert not bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_store_verify_recomputes_an_extracted_stores_fingerprint(tmp_path):
    import zarr

    reference = Path(__file__).resolve().parent / "data" / "reference" / "store.zarr"
    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    ok = CliRunner().invoke(main, ["store", "verify", str(store)])
    assert ok.exit_code == 0 and "OK" in ok.output, ok.output
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    spec = dict(root.attrs["spec"])
    spec["noise"] = {**spec["noise"], "seed": 99}  # the recorded spec no longer matches its fingerprint
    root.attrs.update({"spec": spec, "consolidated": False})
    bad = CliRunner().invoke(main, ["store", "verify", str(store)])
    assert bad.exit_code == 1 and "does not match the stored spec" in bad.output, bad.output
