"""The project's text speaks of the project, never of how it was made.

Every tracked text file outside tests/ (README, docs, code, comments, docstrings, JSON results, configs) is
read and searched for wording about the work that produced it: work sessions and rounds, a brief, issue
numbers, "this VM", helpers. A figure states its machine ("a 2-core AVX-512 Xeon"), not the occasion.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Case-insensitive. Each pattern names the occasion, so that plain words stay free: `requests.Session`,
# "round trip", "paired rounds", "store helpers" and "a helper function" do not match.
FORBIDDEN = [
    r"\b(?:this|previous|last|earlier|prior|next|later|first)\s+(?:session|round)s?\b",
    r"\b(?:these|those|past|both)\s+(?:sessions|rounds)\b",
    r"\bthe\s+session's\b",
    r"\b(?:work|working|coding|agent)\s+sessions?\b",
    r"\brounds?\s+of\s+(?:work|development|review)\b",
    r"\bthe\s+brief\b",
    r"\b(?:issue|ticket)\s*#?\d+\b",
    r"\bthis\s+(?:VM|virtual\s+machine)\b",
    r"\bhelper\b(?!\s+(?:function|method|class|module|script|thread|process)s?\b)",
]
PATTERN = re.compile("|".join(f"(?:{p})" for p in FORBIDDEN), re.IGNORECASE)

BINARY_SUFFIXES = {".npz", ".npy", ".png", ".jpg", ".jpeg", ".safetensors", ".pt", ".h5", ".whl", ".gz", ".zip"}


def tracked_text_files() -> list[Path]:
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in filter(None, listing.split("\0")):
        path = REPO / name
        if name.startswith("tests/") or path.suffix.lower() in BINARY_SUFFIXES or not path.is_file():
            continue
        files.append(path)
    return files


def offending_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return []  # binary
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return []
    rel = path.relative_to(REPO)
    return [
        f"{rel}:{number}: {match.group(0)!r}"
        for number, line in enumerate(text.splitlines(), 1)
        for match in PATTERN.finditer(line)
    ]


@pytest.mark.parametrize(
    "phrase",
    [
        "the previous session's run",
        "this round",
        "the brief's measurement",
        "see issue 12",
        "on this VM",
        "a helper wrote it",
        "Issue #7",
    ],
)
def test_the_patterns_catch_wording_about_the_making(phrase):
    assert PATTERN.search(phrase)


@pytest.mark.parametrize(
    "phrase",
    [
        "requests.Session()",
        "a PIL round trip",
        "7 paired rounds",
        "store helpers",
        "a helper function",
        "boto3 session",
        "round(x, 2)",
        "the issue is",
        "_helper_fn",
    ],
)
def test_the_patterns_leave_plain_words_alone(phrase):
    assert not PATTERN.search(phrase)


def test_tracked_text_speaks_of_the_project_only():
    hits = [hit for path in tracked_text_files() for hit in offending_lines(path)]
    assert not hits, "wording about how the project was made:\n" + "\n".join(hits)


RESULT_PATH = re.compile(r"docs/results/[\w.\-/]*\w")


def named_result_files() -> dict[str, list[str]]:
    """{docs/results path: [where it is named]} over README, docs/*.md and the embedded models' cards."""
    sources = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    sources += sorted((REPO / "extract" / "models" / "weights").glob("*.json"))
    named: dict[str, list[str]] = {}
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in RESULT_PATH.finditer(line):
                named.setdefault(match.group(0), []).append(f"{path.relative_to(REPO)}:{number}")
    return named


def test_every_results_file_named_in_docs_and_cards_exists():
    named = named_result_files()
    assert "docs/results/reproduction_cpu_full.json" in named  # the scan reads the files it should
    missing = {p: where for p, where in named.items() if not (REPO / p).exists()}
    assert not missing, f"docs/results paths named but absent: {missing}"
