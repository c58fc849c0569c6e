"""`s3://` images end to end against a moto S3 server on loopback: a manifest naming one existing and one missing
object is prepared and validated; the existing one is fetched and normalised, the missing one quarantined with
its reason. An endpoint nobody listens on is quarantined too, quickly and without crashing. A webdataset on S3 is
referenced in place from prepare to shard, and a tar rewritten after validation stops the shard stage."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket

import boto3
import pandas as pd
import pytest
from PIL import Image

from flava.config import PipelineConfig
from flava.data.ingest import run_prepare
from flava.data.packs import ChangedImageError, read_ref
from flava.data.prep_config import WebdatasetPairs
from flava.data.shards import read_tar, run_shard
from flava.data.validate import run_validate
from tests.helpers import tracking_in
from tests.unit.test_ingest_formats import img2dataset_tar, jpeg


@pytest.fixture
def aws_env(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture
def s3_endpoint(aws_env):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _raw(tmp_path, uris: list[str]):
    raw = tmp_path / "raw"
    (raw / "images" / "cls").mkdir(parents=True)
    (raw / "text").mkdir()
    (raw / "text" / "a.txt").write_text("Some text that is long enough to pass.\n")
    pd.DataFrame({"key": [f"k{i}" for i in range(len(uris))], "image": uris,
                  "caption": ["a caption of this image"] * len(uris)}).to_csv(raw / "pairs.csv", index=False)
    return raw


def _cfg(tmp_path, endpoint: str, **s3) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "paths": {k: str(tmp_path / k) for k in ("raw", "prepared", "validated")},
        "data": {"ingest": {"pairs": [{"path": "pairs.csv"}], "eval_dir": None,
                            "s3": {"endpoint_url": endpoint, **s3}},
                 "validation": {"min_accept_fraction": 0.0}},
        "tracking": tracking_in(tmp_path),
    })


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_existing_object_is_fetched_and_missing_one_quarantined(tmp_path, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="corpus")
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(buf, format="JPEG")
    s3.put_object(Bucket="corpus", Key="img/present.jpg", Body=buf.getvalue())
    _raw(tmp_path, ["s3://corpus/img/present.jpg", "s3://corpus/img/absent.jpg"])
    cfg = _cfg(tmp_path, s3_endpoint)

    prepared = run_prepare(cfg)
    assert prepared["pairs"] == {"in": 2, "accepted": 2, "rejected": 0}  # URIs are fetched lazily by validation
    result = run_validate(cfg)
    assert result["pairs"]["in"] == 2 and result["pairs"]["accepted"] == 1 and result["pairs"]["rejected"] == 1

    [accepted] = read_jsonl(tmp_path / "validated" / "pairs.jsonl")
    assert accepted["key"] == "pairs-k0"
    img = Image.open(io.BytesIO(read_ref(accepted["image"])))  # a local, normalised copy, in a pack
    assert accepted["image"].startswith(str(tmp_path / "validated" / "images" / "pairs" / "00000.tar#"))
    assert accepted["source_image"] == "s3://corpus/img/present.jpg"
    assert img.mode == "RGB" and img.size == (40, 30)
    [rejected] = read_jsonl(tmp_path / "validated" / "pairs.rejects.jsonl")
    assert rejected["key"] == "pairs-k1" and rejected["image"] == "s3://corpus/img/absent.jpg"
    assert rejected["reason"].startswith("s3 object not found:") and "absent.jpg" in rejected["reason"]
    metrics = json.loads((tmp_path / "validated" / "metrics.json").read_text())
    assert metrics["pairs"]["reasons"] == {"s3 object not found": 1}


def test_unreachable_endpoint_is_a_reject_not_a_crash(tmp_path, aws_env):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _raw(tmp_path, ["s3://gone/a.png", "s3://gone/b.png"])
    cfg = _cfg(tmp_path, f"http://127.0.0.1:{port}", max_attempts=1)
    run_prepare(cfg)
    result = run_validate(cfg)
    assert result["pairs"]["accepted"] == 0 and result["pairs"]["rejected"] == 2
    reasons = [r["reason"] for r in read_jsonl(tmp_path / "validated" / "pairs.rejects.jsonl")]
    assert all(r.startswith("s3 object unreachable:") for r in reasons)


def test_img2dataset_webdataset_on_s3_is_streamed_with_its_provenance(tmp_path, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="laion")
    samples = [("000000000", "a red thing on a table", jpeg((200, 30, 30))),
               ("000000001", "a green thing on a table", jpeg((30, 160, 40)))]
    for name, chunk in (("00000.tar", samples[:1]), ("00001.tar", samples[1:])):
        img2dataset_tar(tmp_path / "tars" / name, chunk)
        s3.upload_file(str(tmp_path / "tars" / name), "laion", f"out/{name}")
    s3.put_object(Bucket="laion", Key="out/00000_stats.json", Body=b"{}")  # img2dataset's side files: not shards
    _raw(tmp_path, [])
    cfg = _cfg(tmp_path, s3_endpoint)
    cfg.data.ingest.pairs = [WebdatasetPairs(path="s3://laion/out/", name="laion")]
    assert run_prepare(cfg)["pairs"] == {"in": 2, "accepted": 2, "rejected": 0}
    rows = read_jsonl(tmp_path / "prepared" / "pairs.jsonl")
    assert [r["key"] for r in rows] == ["laion-000000000", "laion-000000001"]
    assert rows[1]["url"] == "http://127.0.0.1/000000001.jpg" and rows[1]["sha256"] == hashlib.sha256(
        samples[1][2]).hexdigest()
    # referenced in place (a range of the S3 tar), never copied
    assert [r["image"].split("#")[0] for r in rows] == ["s3://laion/out/00000.tar", "s3://laion/out/00001.tar"]
    assert [read_ref(r["image"], cfg.data.ingest.s3) for r in rows] == [data for _, _, data in samples]
    assert list((tmp_path / "prepared" / "extracted").iterdir()) == []
    assert run_validate(cfg)["pairs"]["accepted"] == 2
    # RGB JPEGs kept as they are: the validated rows still name the ranges of the S3 tars, nothing is copied
    validated = read_jsonl(tmp_path / "validated" / "pairs.jsonl")
    assert [r["image"] for r in validated] == [r["image"] for r in rows]
    assert [p for p in (tmp_path / "validated" / "images").rglob("*") if p.is_file()] == []

    # the shard stage reads them from the bucket with data.ingest.s3 (data.shards.s3 names no endpoint here)
    cfg.paths.shards = cfg.paths.shard_index = str(tmp_path / "shards")
    cfg.data.shards.corpora = ["pairs"]
    run_shard(cfg)
    [shard] = (tmp_path / "shards" / "pairs").glob("shard-*.tar")
    sharded = {s.key: s.files for s in read_tar(shard.read_bytes())}
    assert {k: f["jpg"] for k, f in sharded.items()} == {f"laion-{name}": data for name, _, data in samples}
    assert json.loads(sharded["laion-000000000"]["json"])["image"] == rows[0]["image"]

    # an S3 source rewritten after validation: the shard stage refuses its bytes, naming the row and the reference
    samples[0] = (samples[0][0], samples[0][1], jpeg((10, 10, 250)))
    img2dataset_tar(tmp_path / "tars" / "00000.tar", samples[:1])
    s3.upload_file(str(tmp_path / "tars" / "00000.tar"), "laion", "out/00000.tar")
    shutil.rmtree(tmp_path / "shards")
    with pytest.raises(ChangedImageError, match=r"row 'laion-000000000': image s3://laion/out/00000\.tar#\d+\+\d+ "
                                                r"changed since validation") as err:
        run_shard(cfg)
    assert validated[0]["image_sha256"] in str(err.value)
    assert hashlib.sha256(samples[0][2]).hexdigest() in str(err.value)
