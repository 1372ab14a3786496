"""A quick look at an S3 store's endpoint, bucket and key before any work, so that every S3 failure a user
meets first reads as one line naming the bucket and key, with what to do.

Zarr opens a store by asking for several keys at once; when the endpoint is wrong those requests fail
together, botocore retries each (seconds), and the abandoned requests print tracebacks when the process
ends. One request with a short connect timeout and no retries, made here first, fails in about a second
with the cause. Later requests keep fsspec's and botocore's own retries.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from extract.store.layout import StoreError

S3_SCHEMES = ("s3", "s3a")
# Connect timeout and attempts of the check only: an unreachable endpoint fails in about a second.
CHECK_CONFIG = {"connect_timeout": 1, "read_timeout": 10, "retries": {"total_max_attempts": 1, "mode": "standard"}}
ENDPOINT_HINT = "set AWS_ENDPOINT_URL or the storage option endpoint_url=http://HOST:PORT (--storage-option)"


DEFAULT_ENDPOINT = "AWS's default endpoint (no AWS_ENDPOINT_URL set)"


def is_s3(url: str) -> bool:
    return urlsplit(str(url)).scheme in S3_SCHEMES


def bucket_and_key(url: str) -> tuple[str, str]:
    parts = urlsplit(str(url))
    return parts.netloc, parts.path.strip("/")


def endpoint_of(storage_options: dict[str, Any] | None) -> str:
    """The endpoint requests go to, as far as the options and the environment say."""
    options = storage_options or {}
    return (
        options.get("endpoint_url")
        or (options.get("client_kwargs") or {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or DEFAULT_ENDPOINT
    )


def check_s3(url: str, storage_options: dict[str, Any] | None = None, *, store_must_exist: bool = True) -> None:
    """Raise StoreError with one line if `url` (s3://bucket/key) cannot be used: endpoint unreachable, bucket
    missing, access denied, or (with `store_must_exist`) no store at the key. Other URLs pass unchecked."""
    if not is_s3(url):
        return
    import s3fs

    bucket, key = bucket_and_key(url)
    if not bucket:
        raise StoreError(f"{url}: no bucket in the URL; write s3://BUCKET/KEY")
    options = dict(storage_options or {})
    options["config_kwargs"] = {**(options.get("config_kwargs") or {}), **CHECK_CONFIG}
    options["skip_instance_cache"] = True
    fs = s3fs.S3FileSystem(**options)
    fs.retries = 1  # s3fs's own retry loop, on top of botocore's
    endpoint = endpoint_of(storage_options)
    marker = f"{key}/zarr.json" if key else "zarr.json"
    requests = [("head_bucket", {"Bucket": bucket})]
    if store_must_exist:
        requests.append(("head_object", {"Bucket": bucket, "Key": marker}))
    for operation, params in requests:
        try:
            fs.call_s3(operation, **params)
        except Exception as exc:
            line = describe_s3_failure(exc, url, bucket, params.get("Key"), endpoint)
            if endpoint == DEFAULT_ENDPOINT and ENDPOINT_HINT not in line:
                line += f"; for a store not on AWS, {ENDPOINT_HINT}"
            raise StoreError(line) from None


def describe_s3_failure(exc: BaseException, url: str, bucket: str, key: str | None, endpoint: str) -> str:
    """One line: what failed (bucket, key, endpoint) and what to do about it."""
    where = f"bucket {bucket!r}" + (f", key {key!r}" if key else "") + f" at {endpoint}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = type(exc).__name__
    if "connect" in text.lower() or name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError"):
        return f"{url}: cannot reach the S3 endpoint ({where}): {text}; {ENDPOINT_HINT}"
    if "credentials" in text.lower() or name == "NoCredentialsError":
        return f"{url}: no usable AWS credentials ({where}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
    if isinstance(exc, PermissionError):
        return f"{url}: access denied ({where}): {text}; check the credentials and the bucket's policy"
    if isinstance(exc, FileNotFoundError):
        if key is None:
            return f"{url}: bucket {bucket!r} does not exist at {endpoint}: create it first (aws s3 mb s3://{bucket}), or {ENDPOINT_HINT}"
        return f"{url}: no store here: bucket {bucket!r} has no key {key!r} at {endpoint}"
    return f"{url}: S3 request failed ({where}): {text}"
