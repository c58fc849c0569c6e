"""Shards on S3 (boto3 against a moto server on loopback): the same index and bytes as on disk, multipart uploads
for large shards, retries through transient 503s, and the loader streaming from the bucket."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from flava.data import storage
from flava.data.shards import run_shard
from tests.helpers import moto_s3
from tests.unit.shard_fixtures import config, make_validated

BUCKET = "flava-shards"


@pytest.fixture
def s3_endpoint(monkeypatch):
    with moto_s3(monkeypatch, BUCKET) as (endpoint, client):
        yield endpoint, client


def s3_config(tmp_path, endpoint, **shards):
    return config(tmp_path, out=f"s3://{BUCKET}/run1",
                  shards={"samples_per_shard": 5, "s3": {"endpoint_url": endpoint, "retry_backoff_s": 0}} | shards)


def test_s3_shards_match_local_ones(tmp_path, s3_endpoint):
    endpoint, client = s3_endpoint
    make_validated(tmp_path, n_pairs=9, n_images=6, n_text=7)
    run_shard(s3_config(tmp_path, endpoint))
    run_shard(config(tmp_path))
    for corpus in ("pairs", "images", "text"):
        remote = json.loads(client.get_object(Bucket=BUCKET, Key=f"run1/{corpus}/index.json")["Body"].read())
        local = json.loads((tmp_path / "shards" / corpus / "index.json").read_text())
        assert remote == local
        for entry in remote["shards"]:
            body = client.get_object(Bucket=BUCKET, Key=f"run1/{corpus}/{entry['name']}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert "run1/metrics.json" in keys


def test_large_shard_is_uploaded_multipart(tmp_path, s3_endpoint):
    endpoint, client = s3_endpoint
    validated = make_validated(tmp_path, n_pairs=2)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):  # noise PNGs of ~0.75 MB: one shard of ~9 MB > the 5 MB threshold
        path = tmp_path / f"noise-{i}.png"
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(path)
        rows.append({"key": f"n{i}", "image": str(path), "text": "noise"})
    (validated / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = s3_config(tmp_path, endpoint, samples_per_shard=100, corpora=["pairs"],
                    s3={"endpoint_url": endpoint, "multipart_threshold_mb": 5, "multipart_chunk_mb": 5})
    run_shard(cfg)
    head = client.head_object(Bucket=BUCKET, Key="run1/pairs/shard-000000.tar")
    assert head["ETag"].strip('"').endswith("-2")  # a 2-part multipart upload
    index = json.loads(client.get_object(Bucket=BUCKET, Key="run1/pairs/index.json")["Body"].read())
    body = client.get_object(Bucket=BUCKET, Key="run1/pairs/shard-000000.tar")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == index["shards"][0]["sha256"]


def test_transient_errors_are_retried(tmp_path, s3_endpoint):
    from botocore.awsrequest import AWSResponse

    endpoint, client = s3_endpoint
    make_validated(tmp_path, n_pairs=4)
    cfg = s3_config(tmp_path, endpoint, corpora=["pairs"])
    s3 = storage.s3_client(cfg.data.shards.s3)
    calls = {"n": 0}

    class Raw:
        def stream(self, **_):
            yield b"<Error><Code>SlowDown</Code><Message>try later</Message></Error>"

    def flaky(request, **_):
        calls["n"] += 1
        if calls["n"] <= 2:  # the first two PUTs get a 503 SlowDown
            return AWSResponse(request.url, 503, {}, Raw())
        return None

    s3.meta.events.register("before-send.s3.PutObject", flaky)
    try:
        run_shard(cfg)
    finally:
        s3.meta.events.unregister("before-send.s3.PutObject", flaky)
    assert calls["n"] >= 3
    index = json.loads(client.get_object(Bucket=BUCKET, Key="run1/pairs/index.json")["Body"].read())
    assert index["num_samples"] == 4

    # With a single attempt allowed the same fault surfaces as an error.
    calls["n"] = 0
    one = s3_config(tmp_path, endpoint, corpora=["pairs"],
                    s3={"endpoint_url": endpoint, "max_attempts": 1})
    s3_one = storage.s3_client(one.data.shards.s3)
    s3_one.meta.events.register("before-send.s3.PutObject", flaky)
    try:
        with pytest.raises(Exception, match="SlowDown|503"):
            run_shard(one)
    finally:
        s3_one.meta.events.unregister("before-send.s3.PutObject", flaky)


def test_loader_streams_from_s3_like_from_disk(tmp_path, s3_endpoint):
    from itertools import islice

    import torch

    from flava.data.loader import build_stream
    from flava.data.tokenizer import fit_wordpiece

    endpoint, _ = s3_endpoint
    make_validated(tmp_path, n_pairs=12)
    remote_cfg = s3_config(tmp_path, endpoint, corpora=["pairs"])
    local_cfg = config(tmp_path)
    run_shard(remote_cfg)
    run_shard(local_cfg)
    tok = fit_wordpiece([f"caption number {i}" for i in range(50)], 100, tmp_path / "tok")
    remote = build_stream(remote_cfg, "pairs", batch_size=5, rank=0, world_size=1, seed=1, tokenizer=tok)
    local = build_stream(local_cfg, "pairs", batch_size=5, rank=0, world_size=1, seed=1, tokenizer=tok)
    for a, b in zip(islice(remote, 4), islice(local, 4)):  # 20 samples: crosses an epoch boundary
        assert all(torch.equal(a[k], b[k]) for k in a if k != "kind")
    # DataLoader worker processes read from S3 too (each opens its own boto3 client after the fork).
    with_workers = s3_config(tmp_path, endpoint, corpora=["pairs"]).model_copy(deep=True)
    with_workers.data.loader.num_workers = 2
    stream = build_stream(with_workers, "pairs", batch_size=3, rank=0, world_size=1, seed=1, tokenizer=tok,
                          include_keys=True)
    got = [b["keys"] for b in islice(stream, 4)]
    stream.close()
    w0, w1 = stream.dataset.batches(0), stream.dataset.batches(1)  # the plan, read in this process
    assert got == [next(w0 if i % 2 == 0 else w1)["keys"] for i in range(4)]


def test_read_retries_a_broken_response_stream(monkeypatch):
    from botocore.exceptions import ResponseStreamingError

    from flava.data.stream_config import S3Config

    class Body:
        def __init__(self, fail):
            self.fail = fail

        def read(self):
            if self.fail:
                raise ResponseStreamingError(error="connection reset mid-body")
            return b"payload"

    class Client:
        calls = 0

        def get_object(self, Bucket, Key):
            Client.calls += 1
            return {"Body": Body(fail=Client.calls <= 2)}

    monkeypatch.setattr(storage, "s3_client", lambda s3=None: Client())
    assert storage.read_bytes("s3://b/k", s3=S3Config(retry_backoff_s=0)) == b"payload"
    assert Client.calls == 3
    Client.calls = 0
    with pytest.raises(ResponseStreamingError):
        storage.read_bytes("s3://b/k", s3=S3Config(retry_backoff_s=0, max_attempts=2))


def test_s3_shards_leave_a_local_index_that_the_loader_reads(tmp_path, s3_endpoint):
    """With `paths.shards` on S3, `paths.shard_index` (local, what DVC tracks) holds each corpus' index with the
    shards' location, the metrics and the partitions' bookkeeping; no tar is left there; the loader streams the
    bucket's shards through it and refuses a shard whose bytes no longer match the index."""
    from itertools import islice

    from flava.data.loader import build_stream
    from flava.data.tokenizer import fit_wordpiece

    endpoint, client = s3_endpoint
    make_validated(tmp_path, n_pairs=9, n_images=6, n_text=7)
    cfg = s3_config(tmp_path, endpoint)
    local_dir = tmp_path / "shard-index"
    (local_dir / "pairs").mkdir(parents=True)
    (local_dir / "pairs" / "shard-000009.tar").write_bytes(b"from a run that sharded here")
    run_shard(cfg)
    assert sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*")
                  if p.relative_to(local_dir).parts[0] != "partitions") == [
        "images", "images/index.json", "metrics.json", "pairs", "pairs/index.json", "text", "text/index.json"]
    # the partitions' bookkeeping (resume) stays local too, beside the corpora
    assert sorted(p.name for p in (local_dir / "partitions" / "pairs").iterdir()) == ["00000.json", "index.json"]
    for corpus in ("pairs", "images", "text"):
        remote = json.loads(client.get_object(Bucket=BUCKET, Key=f"run1/{corpus}/index.json")["Body"].read())
        local = json.loads((local_dir / corpus / "index.json").read_text())
        assert local == {**remote, "location": f"s3://{BUCKET}/run1/{corpus}"}
    assert json.loads((local_dir / "metrics.json").read_text())["root"] == f"s3://{BUCKET}/run1"

    tok = fit_wordpiece([f"caption number {i}" for i in range(50)], 100, tmp_path / "tok")
    batches = list(islice(build_stream(cfg, "pairs", batch_size=3, rank=0, world_size=1, seed=1, tokenizer=tok), 3))
    assert sum(len(b["input_ids"]) for b in batches) == 9
    # The bucket's shard replaced behind the index's back: the loader names the shard and stops.
    client.put_object(Bucket=BUCKET, Key="run1/pairs/shard-000000.tar", Body=b"x" * 10)
    with pytest.raises(ValueError, match="shard-000000.tar"):
        list(islice(build_stream(cfg, "pairs", batch_size=3, rank=0, world_size=1, seed=1, tokenizer=tok), 3))
