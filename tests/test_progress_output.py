"""Progress bars only on a terminal (or with --progress); log lines always start a line of their own."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from extract.progress import FORCE_ENV, bars_wanted, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not bars_wanted() and progress_bar(total=3).disable
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert bars_wanted() and not progress_bar(total=3).disable
    assert progress_bar(total=3, enabled=False).disable  # a command's own --no-progress still wins
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv(FORCE_ENV, "1")
    assert not progress_bar(total=3).disable


@pytest.fixture(scope="module")
def store(synthetic_store) -> str:
    return synthetic_store(n=96, k=2, dim=6, seed=0, n_train=64, class_names=["a", "b"])


def _probe_stderr(store: str, out: str, *first: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != FORCE_ENV}
    cmd = [sys.executable, "-c", "from diffbank.cli import main; main()", *first, "probe", "linear", store]
    done = subprocess.run(
        [*cmd, "--out", out, "--epochs", "3", "--feature", "t090_b19_avg1"],
        capture_output=True,
        env={**env, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stderr.decode()


def _epoch_lines(stderr: str) -> list[str]:
    return [line for line in stderr.split("\n") if "| train loss" in line]


def test_output_to_a_pipe_holds_plain_lines(store, tmp_path):
    err = _probe_stderr(store, str(tmp_path / "plain"))
    assert "\r" not in err and "epoch/s" not in err
    lines = _epoch_lines(err)
    assert len(lines) == 3 and all(line.startswith("epoch ") for line in lines), err


def test_forced_bars_never_share_a_line_with_a_log_line(store, tmp_path):
    err = _probe_stderr(store, str(tmp_path / "bars"), "--progress")
    assert "\r" in err and "epoch/s" in err  # the bars were drawn
    lines = _epoch_lines(err)
    assert len(lines) == 3, err
    # What a terminal shows of each line is what follows its last carriage return: the log line alone.
    assert all(line.rsplit("\r", 1)[-1].startswith("epoch ") for line in lines), err
