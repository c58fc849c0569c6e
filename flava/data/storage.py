"""Byte-level I/O on local paths and ``s3://bucket/key`` URIs, in one place.

S3 goes through boto3 with botocore's "standard" retry mode (throttling, 5xx and connection errors are retried
with back-off, ``data.shards.s3.max_attempts`` attempts in all). botocore does not retry an error that happens
while *streaming a response body*, so reads add their own retry loop around that. Large uploads are multipart
(``multipart_threshold_mb`` / ``multipart_chunk_mb``). The endpoint comes from the config, else
``$AWS_ENDPOINT_URL`` (boto3 reads that itself), so MinIO or a moto server work the same as AWS.
"""
from __future__ import annotations

import io
import os
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from flava.data.stream_config import S3Config

# boto3 and botocore are imported inside the S3 branches: they are optional (the `pipeline` extra; the served
# model's requirements leave them out), local paths work without them, and boto3 takes ~0.25 s to import in
# every spawned DataLoader worker (flava.data.loader imports this module).

S3_PREFIX = "s3://"


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_PREFIX):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def join(root: str, *parts: str) -> str:
    """Join path segments under a local root or an s3:// root."""
    if is_s3(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root, *parts))


def s3_client(s3: S3Config | None = None):
    s3 = s3 or S3Config()
    # One client per process and settings: boto3 clients must not be shared across fork (DataLoader workers).
    return _client(os.getpid(), s3.endpoint_url, s3.region, s3.max_attempts)


@lru_cache(maxsize=None)
def _client(pid: int, endpoint_url: str | None, region: str | None, max_attempts: int):
    # boto3/botocore: optional, S3 only (see the note at the imports)
    import boto3
    from botocore.config import Config

    config = Config(retries={"total_max_attempts": max_attempts, "mode": "standard"})
    kwargs = {"config": config}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if region:
        kwargs["region_name"] = region
    return boto3.session.Session().client("s3", **kwargs)


def _transfer_config(s3: S3Config):
    from boto3.s3.transfer import TransferConfig  # optional, S3 only (see the note at the imports)

    mib = 1024 * 1024
    return TransferConfig(
        multipart_threshold=s3.multipart_threshold_mb * mib, multipart_chunksize=s3.multipart_chunk_mb * mib
    )


def read_bytes(uri: str, *, s3: S3Config | None = None, byte_range: tuple[int, int] | None = None) -> bytes:
    """Whole object/file as bytes, or the ``byte_range`` (offset, size) of an S3 object (one ranged GET).
    Missing -> FileNotFoundError naming the URI; a range past the object's end -> ValueError."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {uri}")
        return path.read_bytes()
    # botocore: optional, S3 only (see the note at the imports)
    from botocore.exceptions import ClientError, ResponseStreamingError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    s3 = s3 or S3Config()
    bucket, key = split_s3(uri)
    client = s3_client(s3)
    for attempt in range(s3.max_attempts):
        try:
            if byte_range is None:
                return client.get_object(Bucket=bucket, Key=key)["Body"].read()
            offset, size = byte_range
            return client.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + size - 1}")["Body"].read()
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NoSuchBucket"):
                raise FileNotFoundError(f"no such S3 object: {uri} ({code})") from err
            if code == "InvalidRange":
                raise ValueError(f"{uri}: range {byte_range} is past the end of the object") from err
            raise
        except (ResponseStreamingError, BotoConnectionError):
            # The request succeeded but the body stream broke; botocore does not retry that.
            if attempt + 1 == s3.max_attempts:
                raise
            time.sleep(s3.retry_backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def write_bytes(uri: str, data: bytes, *, s3: S3Config | None = None) -> None:
    """Write atomically (local: temp file + rename) or upload (S3: multipart above the threshold)."""
    if not is_s3(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    s3 = s3 or S3Config()
    bucket, key = split_s3(uri)
    s3_client(s3).upload_fileobj(io.BytesIO(data), bucket, key, Config=_transfer_config(s3))


def upload_file(local_path: str | Path, uri: str, *, s3: S3Config | None = None) -> None:
    """Copy a local file to a local path or an S3 URI (multipart above the threshold)."""
    if not is_s3(uri):
        write_bytes(uri, Path(local_path).read_bytes())
        return
    s3 = s3 or S3Config()
    bucket, key = split_s3(uri)
    s3_client(s3).upload_file(str(local_path), bucket, key, Config=_transfer_config(s3))


def exists(uri: str, *, s3: S3Config | None = None) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    from botocore.exceptions import ClientError  # optional, S3 only (see the note at the imports)

    bucket, key = split_s3(uri)
    try:
        s3_client(s3).head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
