"""S3 failures read as one line naming bucket and key, with what to do; no tracebacks at exit; one attempt."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from diffbank.cli import main
from extract.store import StoreError, save_features
from extract.store.s3check import check_s3

pytest.importorskip("s3fs")


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from diffbank.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def _store(url: str) -> None:
    rng = np.random.default_rng(0)
    save_features(url, {"t090_b24_avg2": rng.standard_normal((8, 2, 1, 1)).astype(np.float32)}, np.zeros(8, int), {})


def test_no_endpoint_is_one_line_without_teardown_tracebacks(s3_bucket):
    url = f"{s3_bucket}/small.zarr"
    _store(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    done = _cli(["store", "info", url], env)
    assert done.returncode == 1
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    bucket = s3_bucket.removeprefix("s3://")
    assert f"bucket {bucket!r}" in lines[0] and "AWS_ENDPOINT_URL" in lines[0] and "endpoint_url=" in lines[0]


def test_missing_bucket_and_missing_key_are_named(s3_endpoint):
    runner = CliRunner()
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    no_bucket = runner.invoke(main, ["store", "info", f"s3://{bucket}/x.zarr"])
    assert no_bucket.exit_code == 1
    assert no_bucket.output.count("\n") == 1, no_bucket.output
    assert f"bucket {bucket!r} does not exist at {s3_endpoint}" in no_bucket.output
    assert f"aws s3 mb s3://{bucket}" in no_bucket.output


def test_missing_key_is_named(s3_bucket):
    result = CliRunner().invoke(main, ["store", "verify", f"{s3_bucket}/nothing.zarr"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "has no key 'nothing.zarr/zarr.json'" in result.output


def test_extract_into_a_missing_bucket_stops_before_work(s3_endpoint, tmp_path):
    from test_pipeline import _images, _spec

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(_images(tmp_path / "imgs"), views={"hflip": False})))
    result = CliRunner().invoke(main, ["extract", str(spec_path), "--store", "s3://no-such-bucket-x/s.zarr"])
    assert result.exit_code == 1
    assert "bucket 'no-such-bucket-x' does not exist" in result.output


def test_unreachable_endpoint_is_tried_once():
    """An endpoint that accepts and drops every connection: the check sends one request and gives up
    (aiohttp opens a second connection once for an idempotent request dropped unanswered; s3fs's and
    botocore's default retries would make it dozens)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    accepted: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    try:
        with pytest.raises(StoreError, match="cannot reach the S3 endpoint") as raised:
            check_s3("s3://bkt/x.zarr", {"endpoint_url": endpoint, "key": "k", "secret": "s"})
    finally:
        stop.set()
        thread.join()
        server.close()
    assert 1 <= len(accepted) <= 2, accepted
    assert f"bucket 'bkt' at {endpoint}" in str(raised.value) and "\n" not in str(raised.value)


def test_abandoned_requests_print_nothing_at_exit():
    """zarr's own open against a closed port, past the check: the CLI's hook keeps exit quiet."""
    code = (
        "import sys\n"
        "from diffbank.teardown import silence_abandoned_requests\n"
        "if sys.argv[1] == 'quiet':\n"
        "    silence_abandoned_requests()\n"
        "from extract.store import open_store\n"
        "try:\n"
        "    open_store('s3://bkt/x.zarr', {'endpoint_url': 'http://127.0.0.1:1', 'key': 'k', 'secret': 's'})\n"
        "except Exception as exc:\n"
        "    print('failed', file=sys.stderr)\n"
    )
    loud, quiet = (
        subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, timeout=120)
        for how in ("loud", "quiet")
    )
    assert "Exception ignored" in loud.stderr  # what the hook is for
    assert quiet.stderr.strip() == "failed", quiet.stderr
