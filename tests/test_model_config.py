"""extract/models/config.py stays torch-free, so checking a spec never starts the framework."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("module", ["extract.models.config", "extract.spec"])
def test_importing_leaves_torch_unloaded(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", f"importing {module} loaded torch"


def test_a_spec_loads_without_torch():
    """Resolving a spec's flags to its block table (no files looked at) never imports torch."""
    spec = Path(__file__).resolve().parents[1] / "cache_specs" / "imagenet_linear.yaml"
    code = (
        "import sys\n"
        "from extract.spec import load_spec\n"
        f"spec = load_spec({str(spec)!r}, check_files=False)\n"
        "print(len(spec.model_block_table()), 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["37", "False"]
