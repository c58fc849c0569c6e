"""Partitioned prepare: one partition per source unit (tar shard, parquet part, text file...), the outputs of one
pass over every source on any engine, counts that add up per partition, source and corpus, and a killed run
that resumes at its first unfinished partition and ends byte-identical."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from flava.data import ingest, sources
from flava.data.engine import EngineConfig
from flava.data.packs import read_ref
from flava.data.prep_config import IngestConfig
from tests.helpers import spy_partitions
from tests.unit.test_ingest import _tar, png_bytes, read_jsonl

RED, GREEN, BLUE = png_bytes((200, 30, 30)), png_bytes((30, 200, 30)), png_bytes((30, 30, 200))
# pairs: 3 webdataset shards, a JSONL manifest, a parquet source of 2 parts without a key column
PAIR_UNITS = ["shard-0.tar", "shard-1.tar", "shard-2.tar", "captions.jsonl", "part-0.parquet", "part-1.parquet"]


def _raw(tmp_path: Path) -> Path:
    """Several sources per corpus, several units per source, rejects in most of them, and an image embedded in
    two shards (so two partitions extract the same bytes)."""
    raw = tmp_path / "raw"
    (raw / "wds").mkdir(parents=True)
    _tar(raw / "wds" / "shard-0.tar", {"a.jpg": RED, "a.txt": b"a red square", "b.jpg": GREEN,
                                       "b.txt": b"a green square"})
    _tar(raw / "wds" / "shard-1.tar", {"c.jpg": RED, "c.txt": b"the red square again", "d.txt": b"no image"})
    _tar(raw / "wds" / "shard-2.tar", {"e.png": BLUE, "e.txt": b"a blue square"})
    (raw / "m" / "imgs").mkdir(parents=True)
    (raw / "m" / "imgs" / "x.png").write_bytes(RED)
    (raw / "m" / "captions.jsonl").write_text(
        '{"key": "k1", "image": "imgs/x.png", "caption": "a local red square"}\n{broken\n'
        '{"key": "k2", "image": "", "caption": "no image"}\n')
    (raw / "pq").mkdir()
    for n, rows in enumerate([[(GREEN, "first part")], [(BLUE, "second part"), (b"", "empty bytes")]]):
        pd.DataFrame({"jpg": [b for b, _ in rows], "caption": [c for _, c in rows]}).to_parquet(
            raw / "pq" / f"part-{n}.parquet")
    (raw / "cls" / "cat").mkdir(parents=True)
    (raw / "cls" / "cat" / "a.png").write_bytes(RED)
    (raw / "cls" / "cat" / "notes.txt").write_text("not an image")
    (raw / "txt").mkdir()
    (raw / "txt" / "a.txt").write_text("One sentence about a cat here. Another one about a dog there.\n")
    (raw / "txt" / "b.txt").write_text("A third document with enough words to be one document alone.\n")
    (raw / "txt" / "docs.jsonl").write_text('{"text": "A jsonl document with words in it."}\n{broken\n')
    return raw


def _ingest(**changes) -> IngestConfig:
    return IngestConfig.model_validate({
        "pairs": [{"kind": "webdataset", "path": "wds"},
                  {"path": "m/captions.jsonl"},
                  {"path": "pq", "image_column": "jpg", "key_column": None}],
        "images": [{"path": "cls"}], "text": [{"path": "txt"}], "eval_dir": None, **changes})


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_one_partition_per_source_unit_and_the_counts_add_up(tmp_path):
    raw, out = _raw(tmp_path), tmp_path / "prepared"
    result = ingest.prepare(_ingest(), raw, out)
    assert result["pairs"] == {"in": 11, "accepted": 7, "rejected": 4}

    parts = out / ingest.PARTITIONS_DIR
    index = json.loads((parts / "pairs" / "index.json").read_text())
    assert [Path(p["unit"]).name for p in index["partitions"]] == PAIR_UNITS
    assert [p["source"] for p in index["partitions"]] == ["wds"] * 3 + ["captions", "pq", "pq"]
    assert [Path(p["unit"]).name for p in json.loads((parts / "text" / "index.json").read_text())["partitions"]] \
        == ["a.txt", "b.txt", "docs.jsonl"]

    metrics = json.loads((out / "metrics.json").read_text())
    for corpus in ingest.CORPORA:
        summaries = [json.loads(p.read_text()) for p in sorted((parts / corpus).glob("0*.json"))]
        m = metrics[corpus]
        for s in summaries:
            assert s["in"] == s["accepted"] + s["rejected"]
        assert m["in"] == m["accepted"] + m["rejected"] == sum(s["in"] for s in summaries)
        assert sum(m["reasons"].values()) == m["rejected"]
        for name, counts in m["sources"].items():
            assert counts["in"] == counts.get("accepted", 0) + counts.get("rejected", 0), (corpus, name)
        assert sum(c["in"] for c in m["sources"].values()) == m["in"]
        # the manifest is the partitions' rows in partition order
        rows = [r for p in sorted((parts / corpus).glob("0*.jsonl")) if ".rejects" not in p.name
                for r in read_jsonl(p)]
        assert read_jsonl(out / f"{corpus}.jsonl") == rows
    assert metrics["pairs"]["sources"]["wds"] == {"in": 5, "accepted": 4, "rejected": 1}
    assert metrics["text"]["passages"] == len(read_jsonl(out / "text.jsonl"))

    pairs = {r["key"]: r for r in read_jsonl(out / "pairs.jsonl")}
    # keys numbered by row across the parquet parts, as reading the whole source numbers them
    whole = [item.row["key"] for item in sources.read_manifest(_ingest().pairs[2], raw, _ingest().caption_filter,
                                                               tmp_path / "whole") if item.row]
    assert [k for k in pairs if k.startswith("pq-")] == whole == ["pq-00000000", "pq-00000001"]
    # images of uncompressed shards are referenced in place; embedded bytes go into a pack per unit
    assert pairs["wds-a"]["image"].startswith(str(raw / "wds" / "shard-0.tar") + "#")
    assert pairs["wds-c"]["image"].startswith(str(raw / "wds" / "shard-1.tar") + "#")
    assert read_ref(pairs["wds-a"]["image"]) == read_ref(pairs["wds-c"]["image"]) == RED
    assert pairs["pq-00000000"]["image"].startswith(str(out / ingest.EXTRACTED / "pq" / "00000.tar") + "#")
    assert pairs["pq-00000001"]["image"].startswith(str(out / ingest.EXTRACTED / "pq" / "00001.tar") + "#")
    assert read_ref(pairs["pq-00000000"]["image"]) == GREEN and read_ref(pairs["pq-00000001"]["image"]) == BLUE
    assert sorted(p.name for p in (out / ingest.EXTRACTED).rglob("*") if p.is_file()) == ["00000.tar", "00001.tar"]

def test_a_source_rejected_in_every_partition_still_fails_the_stage(tmp_path):
    raw, out = _raw(tmp_path), tmp_path / "prepared"
    (raw / "bad").mkdir()
    for n in range(2):
        _tar(raw / "bad" / f"s{n}.tar", {f"{n}.txt": b"a caption without its image"})
    ing = _ingest(pairs=[{"kind": "webdataset", "path": "wds"}, {"kind": "webdataset", "path": "bad"}])
    with pytest.raises(ValueError) as err:
        ingest.prepare(ing, raw, out)
    assert "pairs source 'bad': all 2 rows rejected, first reasons: " in str(err.value)
    assert str(err.value).count("no image member") == 2  # the first reasons of both partitions
    assert "'wds'" not in str(err.value)
    assert len(read_jsonl(out / "pairs.rejects.jsonl")) == 3  # the outputs are written for inspection


@pytest.mark.slow
def test_local_dask_cluster_gives_the_serial_bytes(tmp_path):
    raw, out = _raw(tmp_path), tmp_path / "prepared"
    ingest.prepare(_ingest(), raw, out)
    serial = _snapshot(out)
    shutil.rmtree(out)
    ingest.prepare(_ingest(), raw, out, EngineConfig(kind="local", workers=2))
    assert _snapshot(out) == serial


def test_the_same_data_in_another_clone_gives_the_same_bytes(tmp_path, monkeypatch):
    """Partition summaries are stage outputs (DVC hashes them): their fingerprints know inputs by content, so a
    second clone -- the same files written at another time -- writes the same bytes; an input rewritten with the
    same size and its old modification time is still a new input."""
    clones = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        raw = _raw(Path("."))
        for file in raw.rglob("*"):  # written "at another time"
            os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + len(clones) * 7_000_000_000))
        ingest.prepare(_ingest(), raw, Path("prepared"))
        clones.append(_snapshot(Path("prepared")))
    assert clones[0] == clones[1]
    assert any(name.startswith("partitions/") for name in clones[0])

    text_file = Path("raw") / "txt" / "b.txt"
    stat = text_file.stat()
    text_file.write_text(text_file.read_text().replace("third", "THIRD"))  # same size, other bytes
    os.utime(text_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert text_file.stat().st_size == stat.st_size
    done = spy_partitions(monkeypatch, ingest, "prepare_partition")
    ingest.prepare(_ingest(), Path("raw"), Path("prepared"))
    assert done == [("text", 0), ("text", 1), ("text", 2)]
    assert "THIRD" in Path("prepared/text.jsonl").read_text()


def test_killed_prepare_resumes_at_the_first_unfinished_partition(tmp_path, monkeypatch):
    raw, out = _raw(tmp_path), tmp_path / "prepared"
    ingest.prepare(_ingest(), raw, out)
    uninterrupted = _snapshot(out)
    shutil.rmtree(out)

    real_summary_write = ingest.write_json_atomic
    killed_at = out / ingest.PARTITIONS_DIR / "pairs" / "00002.json"

    def killed(path, doc):  # partition 2 (shard-2.tar) wrote its rows and images, then the process died
        if path == killed_at:
            raise KeyboardInterrupt("killed")
        real_summary_write(path, doc)

    monkeypatch.setattr(ingest, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest.prepare(_ingest(), raw, out)
    monkeypatch.setattr(ingest, "write_json_atomic", real_summary_write)
    assert not killed_at.exists() and not (out / "pairs.jsonl").exists()
    (out / ingest.PARTITIONS_DIR / "pairs" / ".00003.jsonl.123.tmp").write_text('{"key": "cut')
    (out / ingest.EXTRACTED / "pq").mkdir(parents=True)
    (out / ingest.EXTRACTED / "pq" / "00001.tar").write_bytes(b"a pack cut short")  # its partition is unfinished
    (out / ingest.EXTRACTED / "pq" / ".00001.tar.123.tmp").write_bytes(b"a pack's temporary")
    finished_mtime = (out / ingest.PARTITIONS_DIR / "pairs" / "00000.jsonl").stat().st_mtime_ns

    done = spy_partitions(monkeypatch, ingest, "prepare_partition")
    ingest.prepare(_ingest(), raw, out)
    assert done == [("pairs", 2), ("pairs", 3), ("pairs", 4), ("pairs", 5), ("images", 0),
                    ("text", 0), ("text", 1), ("text", 2)]  # pairs 0 and 1 were kept
    assert (out / ingest.PARTITIONS_DIR / "pairs" / "00000.jsonl").stat().st_mtime_ns == finished_mtime
    assert _snapshot(out) == uninterrupted  # no temporary or cut-short file left either

    done.clear()  # a finished run re-run does no partition again, and rewrites the same bytes
    ingest.prepare(_ingest(), raw, out)
    assert done == [] and _snapshot(out) == uninterrupted

    # a pairs param: every pairs partition again, the other corpora kept
    ingest.prepare(_ingest(caption_filter={"min_words": 4}), raw, out)
    assert done == [("pairs", i) for i in range(len(PAIR_UNITS))]
    done.clear()
    text_file = raw / "txt" / "b.txt"  # a changed input: its corpus again
    text_file.write_text(text_file.read_text() + "A new paragraph.\n")
    os.utime(text_file, ns=(text_file.stat().st_atime_ns, text_file.stat().st_mtime_ns + 1_000_000_000))
    ingest.prepare(_ingest(caption_filter={"min_words": 4}), raw, out)
    assert done == [("text", 0), ("text", 1), ("text", 2)]
