"""Partitioned sharding: every accepted sample exactly once whatever the partitioning; one partition gives the bytes
of one shuffle of the whole corpus; a local Dask cluster gives the serial bytes; a killed run resumes at its first
unfinished partition and ends byte-identical."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest

from flava.data import shards as sharding
from flava.data.partitions import PARTITIONS_DIR
from flava.data.shards import build_samples, read_tar, run_shard, write_tar
from tests.helpers import spy_partitions
from tests.unit.shard_fixtures import config, make_validated

# 23 pairs in partitions of 7 rows (7, 7, 7, 2) and shards of 5: each partition's last shard is short
N_PAIRS, N_IMAGES, N_TEXT = 23, 11, 17
PARTITION_ROWS = 7
CORPORA = {"pairs": N_PAIRS, "images": N_IMAGES, "text": N_TEXT}


def _cfg(root: Path, partition_rows: int = PARTITION_ROWS, **engine):
    return config(root, engine={"partition_rows": partition_rows, **engine})


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _manifest_keys(validated: Path, corpus: str) -> list[str]:
    return [json.loads(line)["key"] for line in (validated / f"{corpus}.jsonl").read_text().splitlines()]


def _shard_keys(out: Path, corpus: str, entries: list[dict]) -> list[str]:
    return [s.key for e in entries for s in read_tar((out / corpus / e["name"]).read_bytes())]


def test_partitions_give_every_sample_once_within_its_partition(tmp_path):
    validated = make_validated(tmp_path, n_pairs=N_PAIRS, n_images=N_IMAGES, n_text=N_TEXT)
    out = tmp_path / "shards"
    metrics = run_shard(_cfg(tmp_path))
    assert {c: m["num_samples"] for c, m in metrics["corpora"].items()} == CORPORA
    for corpus, n in CORPORA.items():
        index = json.loads((out / corpus / "index.json").read_text())
        sizes = [PARTITION_ROWS] * (n // PARTITION_ROWS) + ([n % PARTITION_ROWS] if n % PARTITION_ROWS else [])
        per_part = [[5] * (rows // 5) + ([rows % 5] if rows % 5 else []) for rows in sizes]
        assert [e["samples"] for e in index["shards"]] == [k for part in per_part for k in part]
        assert [e["name"] for e in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(index["num_shards"])]
        assert index["num_samples"] == sum(e["samples"] for e in index["shards"]) == n
        for e in index["shards"]:
            data = (out / corpus / e["name"]).read_bytes()
            assert e["bytes"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
        keys = _manifest_keys(validated, corpus)
        assert sorted(_shard_keys(out, corpus, index["shards"])) == sorted(keys)  # every sample exactly once
        # a partition's shards hold its own rows: samples do not cross partition boundaries
        state = out / PARTITIONS_DIR / corpus
        assert json.loads((state / "index.json").read_text())["partitions"] == [f"{i:05d}" for i in range(len(sizes))]
        for i in range(len(sizes)):
            summary = json.loads((state / f"{i:05d}.json").read_text())
            assert sorted(_shard_keys(out, corpus, summary["shards"])) == sorted(
                keys[i * PARTITION_ROWS:(i + 1) * PARTITION_ROWS])

    # one partition: the same samples (contents per key), only grouped and ordered otherwise
    run_shard(config(tmp_path, out=str(tmp_path / "one")))
    for corpus in CORPORA:
        def contents(root: Path) -> dict[str, dict[str, bytes]]:
            index = json.loads((root / corpus / "index.json").read_text())
            return {s.key: s.files for e in index["shards"] for s in read_tar((root / corpus / e["name"]).read_bytes())}
        assert contents(out) == contents(tmp_path / "one")


def test_keys_colliding_across_partitions_are_refused(tmp_path):
    validated = make_validated(tmp_path, n_pairs=N_PAIRS)
    lines = (validated / "pairs.jsonl").read_text().splitlines()
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    first["key"], last["key"] = "a.b", "a/b"  # rows 0 and 22: partitions 0 and 3
    lines[0], lines[-1] = json.dumps(first), json.dumps(last)
    (validated / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="'a.b' and 'a/b' collide as shard key 'a_b'"):
        run_shard(_cfg(tmp_path))


def test_one_partition_gives_the_bytes_of_one_shuffle_of_the_whole_corpus(tmp_path):
    """The default (partition_rows above the corpus) is what the stage wrote before it had partitions: the rows of
    the whole manifest shuffled by (seed, corpus), packed in order into shards of samples_per_shard."""
    validated = make_validated(tmp_path, n_pairs=N_PAIRS, n_images=N_IMAGES, n_text=N_TEXT)
    cfg = config(tmp_path)
    assert cfg.data.engine.partition_rows > max(CORPORA.values())
    run_shard(cfg)
    for corpus in CORPORA:
        rows = [json.loads(line) for line in (validated / f"{corpus}.jsonl").read_text().splitlines()]
        random.Random(f"{cfg.seed}:{corpus}").shuffle(rows)
        samples = list(build_samples(rows, corpus, validated, cfg.data.shards))
        expected = []
        for n, start in enumerate(range(0, len(samples), cfg.data.shards.samples_per_shard)):
            path = tmp_path / f"expected-{corpus}-{n}.tar"
            write_tar(samples[start:start + cfg.data.shards.samples_per_shard], path)
            expected.append((f"shard-{n:06d}.tar", path.read_bytes()))
        index = json.loads((tmp_path / "shards" / corpus / "index.json").read_text())
        assert [(e["name"], (tmp_path / "shards" / corpus / e["name"]).read_bytes()) for e in index["shards"]] \
            == expected
        assert list(index) == ["corpus", "kind", "num_samples", "num_shards", "bytes", "shards"]
        assert all(list(e) == ["name", "samples", "bytes", "sha256"] for e in index["shards"])


def test_local_dask_cluster_gives_the_serial_bytes(tmp_path):
    make_validated(tmp_path, n_pairs=N_PAIRS, n_images=N_IMAGES, n_text=N_TEXT)
    out = tmp_path / "shards"
    run_shard(_cfg(tmp_path))
    serial = _snapshot(out)
    shutil.rmtree(out)
    run_shard(_cfg(tmp_path, kind="local", workers=2))
    assert _snapshot(out) == serial


def test_killed_shard_stage_resumes_at_the_first_unfinished_partition(tmp_path, monkeypatch):
    make_validated(tmp_path, n_pairs=N_PAIRS, n_images=N_IMAGES, n_text=N_TEXT)
    out = tmp_path / "shards"
    cfg = _cfg(tmp_path)
    run_shard(cfg)
    uninterrupted = _snapshot(out)
    shutil.rmtree(out)

    state = out / PARTITIONS_DIR / "pairs"
    killed_at = state / "00002.json"
    real_write = sharding.write_json_atomic

    def killed(path, doc):  # partition 2 wrote its shards, then the process died before its summary
        if path == killed_at:
            raise KeyboardInterrupt("killed")
        real_write(path, doc)

    monkeypatch.setattr(sharding, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        run_shard(cfg)
    monkeypatch.setattr(sharding, "write_json_atomic", real_write)
    assert (out / "pairs" / "shard-000005.tar").is_file()  # partition 2 wrote its shards 4 and 5
    assert not killed_at.exists() and not (out / "pairs" / "index.json").exists()
    (out / "pairs" / ".shard-000007.tar.cut").write_bytes(b"half a tar")
    (state / ".00003.json.123.tmp").write_text('{"finger')

    done = spy_partitions(monkeypatch, sharding, "shard_partition")
    run_shard(cfg)
    assert [i for corpus, i in done if corpus == "pairs"] == [2, 3]  # 0 and 1 were kept
    assert _snapshot(out) == uninterrupted

    done.clear()  # a finished run re-run does no partition again, and rewrites the same bytes
    run_shard(cfg)
    assert done == [] and _snapshot(out) == uninterrupted

    (out / "text" / "shard-000003.tar").unlink()  # a shard gone behind the summary's back: its partition again
    run_shard(cfg)
    assert done == [("text", 1)] and _snapshot(out) == uninterrupted

    done.clear()  # new params: every partition again, and no shard of the old layout is left
    cfg.data.shards.samples_per_shard = 7
    run_shard(cfg)
    assert [i for corpus, i in done if corpus == "pairs"] == [0, 1, 2, 3]
    index = json.loads((out / "pairs" / "index.json").read_text())
    assert sorted(p.name for p in (out / "pairs").glob("shard-*.tar")) == [e["name"] for e in index["shards"]]
    assert [e["samples"] for e in index["shards"]] == [7, 7, 7, 2]
