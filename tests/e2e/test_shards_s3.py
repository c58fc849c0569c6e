"""The main job with `paths.shards` on S3 (a moto server on loopback), end to end: `flava pipeline run` shards into
the bucket, DVC tracks the local index (`paths.shard_index`) in place of the bucket prefix, the training stages
stream the bucket's shards, a second `dvc repro` runs nothing, and a changed shard param re-runs the shard stage
and, through the changed index, the stages that read the shards.

Its own project (not the session's main job) on a small synthetic world, so it runs in about two minutes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import dvc_status, git, make_project, run, set_params
from tests.helpers import AWS_TEST_ENV as AWS
from tests.helpers import moto_s3
from tests.unit.test_synthetic import SMALL

BUCKET = "flava-shards"
CORPORA = ("pairs", "images", "text")
READERS = {"pretrain_text", "pretrain_image", "joint"}  # the stages that depend on the shards


@pytest.fixture
def s3_endpoint(monkeypatch):
    with moto_s3(monkeypatch, BUCKET) as (endpoint, client):
        yield endpoint, client


def _keys(client) -> set[str]:
    return {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])}


@pytest.mark.slow
def test_pipeline_run_with_shards_on_s3(tmp_path: Path, s3_endpoint):
    endpoint, client = s3_endpoint
    repo = make_project(tmp_path, tmp_path / "remote")
    # A small world of our own: data.dvc records the default one, so it goes (the raw data is then untracked).
    git(repo, "rm", "-q", "data.dvc")
    set_params(repo, {
        ("paths", "shards"): f"s3://{BUCKET}/run1",
        ("data", "shards", "s3", "endpoint_url"): endpoint,
        ("data", "shards", "samples_per_shard"): 16,
        ("data", "generate"): SMALL,
        ("data", "validation", "min_accept_fraction"): 0.0,
        ("data", "tokenizer", "vocab_size"): 120,
        ("data", "codebook", "num_codes"): 8,
        ("data", "codebook", "iters"): 2,
        ("data", "codebook", "sample_images"): 16,
        # shorter still than the main job's stages, and one epoch per fine-tune: the route is under test here
        ("train", "text", "steps"): 4, ("train", "image", "steps"): 4, ("train", "joint", "steps"): 8,
        ("train", "eval_every"): 4, ("train", "checkpoint_every"): 4,
        ("eval", "text_finetune", "epochs"): 1, ("eval", "multimodal_finetune", "epochs"): 1,
    })
    git(repo, "commit", "-qam", "shards on s3")

    start = time.perf_counter()
    proc = run(repo, "flava", "pipeline", "run", "--json", extra_env=AWS)
    result = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1:])
    assert result["raw_data"] == "generated" and result["promotion"].get("version"), result
    first_run_s = time.perf_counter() - start

    # The tars are in the bucket only; DVC tracks the local index, which says where they are.
    keys = _keys(client)
    index_dir = repo / "data/shards"
    for corpus in CORPORA:
        local = json.loads((index_dir / corpus / "index.json").read_text())
        assert local["location"] == f"s3://{BUCKET}/run1/{corpus}"
        assert {f"run1/{corpus}/{s['name']}" for s in local["shards"]} <= keys
        assert not list((index_dir / corpus).glob("*.tar"))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    tracked = {e["path"] for stage in lock.values() for e in stage.get("deps", []) + stage.get("outs", [])}
    assert {f"data/shards/{c}" for c in CORPORA} <= tracked and not any("://" in p for p in tracked)
    # The training stages streamed the bucket's shards (their steps ran on what the index lists).
    assert json.loads((repo / "reports/pretrain_text.json").read_text())["steps"] == 4
    assert json.loads((repo / "reports/joint.json").read_text())["steps"] == 8

    # Up to date: a second `dvc repro` runs nothing.
    again = run(repo, "dvc", "repro", extra_env=AWS)
    assert "Running stage" not in again.stdout, again.stdout
    assert dvc_status(repo) == {}

    # A shard param changes the shards: the shard stage re-runs, its index changes, and so do the stages reading it.
    set_params(repo, {("data", "shards", "samples_per_shard"): 5})
    run(repo, "dvc", "repro", "--single-item", "params")
    assert set(dvc_status(repo)) == {"shard"}
    run(repo, "dvc", "repro", "--single-item", "shard", extra_env=AWS)
    assert set(dvc_status(repo)) == READERS
    pairs = json.loads((index_dir / "pairs" / "index.json").read_text())
    assert all(s["samples"] <= 5 for s in pairs["shards"])
    assert {f"run1/pairs/{s['name']}" for s in pairs["shards"]} <= _keys(client)

    # Another bucket prefix is another place to read from: shard (and its readers) again.
    set_params(repo, {("paths", "shards"): f"s3://{BUCKET}/run2"})
    run(repo, "dvc", "repro", "--single-item", "params")
    assert "shard" in dvc_status(repo)
    print(f"first pipeline run {first_run_s:.0f}s, all {time.perf_counter() - start:.0f}s")
