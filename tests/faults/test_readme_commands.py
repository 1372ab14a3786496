"""Every `diffbank spec|extract|store` command in README's ```bash blocks runs as written, on cpu_small.

Lines with placeholders (SPEC, STORE, ADDR: what the reader fills in), remote stores (s3://, run against
moto's server in tests/test_s3.py) and lines marked `# long run` (a whole data set: what the README's result
sections were measured with) are left out; everything else is
run in order, in a scratch folder that sees the repository's cache_specs/, as a user would type it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from .conftest import cli

REPO = Path(__file__).resolve().parents[2]
STAGES = ("spec", "extract", "store")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_.0-9]*$")
LONG_RUN = "# long run"


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")  # a command continued over several lines is one command
        for line in block.splitlines():
            if LONG_RUN in line:
                continue
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line.startswith("diffbank "):
                continue
            words = shlex.split(line)[1:]
            stage = next((w for w in words if not w.startswith("-")), None)
            if stage not in STAGES or any(PLACEHOLDER.match(w) for w in words):
                continue
            if any("://" in w for w in words):  # remote stores: tests/test_s3.py runs these against moto
                continue
            commands.append(words)
    return commands


def test_readme_has_the_extraction_commands():
    stages = {c[next(i for i, w in enumerate(c) if not w.startswith("-"))] for c in readme_commands()}
    assert set(STAGES) <= stages


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path, monkeypatch):
    (tmp_path / "cache_specs").symlink_to(REPO / "cache_specs")
    monkeypatch.chdir(tmp_path)
    for words in readme_commands():
        result = cli(*words)
        assert result.exit_code == 0, f"diffbank {' '.join(words)}\n{result.output}"
