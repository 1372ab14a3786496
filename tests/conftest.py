"""Shared fixtures."""

from collections.abc import Callable

import numpy as np
import pytest

from extract.store import save_features


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> Callable[..., str]:
    """Factory for a small class-separable feature store (avg1 and tok2 maps for t 90, 150 x blocks 19, 24).

    Rows 0..n_train-1 are the train split, the rest test; `noise(t, block)` scales each cell's noise (default 1).
    """

    def make(
        *,
        n: int,
        k: int,
        dim: int,
        seed: int,
        n_train: int,
        class_names: list[str],
        noise: Callable[[int, int], float] | None = None,
    ) -> str:
        rng = np.random.default_rng(seed)
        y = np.arange(n) % k
        centres = rng.normal(size=(k, dim)) * 2
        feats = {}
        for t in (90, 150):
            for block in (19, 24):
                draw = rng.normal(size=(n, dim))
                if noise is not None:
                    draw = draw * noise(t, block)
                base = (centres[y] + draw).astype(np.float32)
                feats[f"t{t:03d}_b{block:02d}_avg1"] = base[:, :, None, None]
                feats[f"t{t:03d}_b{block:02d}_tok2"] = np.tile(base[:, :, None, None], (1, 1, 2, 2))
        path = tmp_path_factory.mktemp("store") / "s.zarr"
        save_features(
            path,
            feats,
            y,
            {"train": np.arange(n_train), "test": np.arange(n_train, n)},
            class_names=class_names,
            shard_rows=32,
        )
        return str(path)

    return make


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free loopback port (nothing beyond 127.0.0.1), with the environment that
    fsspec/s3fs (and every subprocess started from here) read their endpoint and credentials from."""
    import logging
    import os

    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _forget_s3_clients()  # s3fs caches filesystems by their arguments: one made before would lack this endpoint
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint) -> str:
    """A new, empty bucket on the moto server: 's3://<name>'."""
    import uuid

    import s3fs

    name = f"b-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


def _forget_s3_clients() -> None:
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()
