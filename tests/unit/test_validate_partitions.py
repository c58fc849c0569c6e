"""Partitioned validation: any partition size and any engine give the outputs of one pass over the corpus; a
killed run resumes at its first unfinished partition and ends byte-identical; JPEG/PNG passthrough."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from flava.config import PipelineConfig
from flava.data import validate as validation
from flava.data.engine import Engine, EngineConfig, open_engine
from flava.data.ingest import dump_row, run_prepare
from flava.data.packs import parse_ref
from flava.data.prep_config import ValidateConfig
from flava.data.stream_config import S3Config
from flava.data.synthetic import run_generate
from tests.helpers import spy_partitions, tracking_in
from tests.unit.test_synthetic import SMALL
from tests.unit.test_validate import (
    encode,
    exif_rotated_jpeg,
    pack_member,
    read_jsonl,
    ref_bytes,
    rgb,
    write_prepared,
)

# rows of the fixture manifest: 21 pairs, so 3 rows per partition gives 7 partitions, with a duplicate key and
# shared images whose first rows lie in earlier partitions than the rows that repeat them
SMALL_PARTITIONS = 3
ONE_PASS = 1000
# outputs whose bytes hold GE's batch fingerprint, which differs with the partitioning (the counts do not)
PER_PARTITIONING = ("ge", validation.PARTITIONS_DIR)


def _prepare(tmp_path: Path):
    cfg, prepared = write_prepared(tmp_path)
    # an image first decoded for a row rejected for its caption, then used by an accepted row in a later
    # partition: the file must exist, named after the first row, as in one pass
    shared = tmp_path / "src" / "shared.img"
    shared.write_bytes(encode(rgb(colour=(10, 200, 10))))
    with (prepared / "pairs.jsonl").open("a") as f:
        f.write(dump_row({"key": "shared-first", "image": str(shared), "text": ""}) + "\n")
        f.write(dump_row({"key": "shared-later", "image": str(shared), "text": "a green picture"}) + "\n")
    lines = (prepared / "pairs.jsonl").read_text().splitlines(keepends=True)
    # move the shared-first row to the front half so it and shared-later are partitions apart
    lines.insert(4, lines.pop(-2))
    (prepared / "pairs.jsonl").write_text("".join(lines))
    return cfg, prepared


def _run(cfg, prepared: Path, engine: EngineConfig) -> dict:
    return validation.validate(cfg.data.validation, cfg.data.ingest.s3, prepared, cfg.paths.validated, engine)


def _snapshot(out: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] not in skip}


def _resolved(out: Path) -> dict[str, object]:
    """The outputs that do not depend on the partitioning: every file but the packs (one per partition) and the
    per-partition bookkeeping, with each accepted row's pack reference replaced by the member it names (an image
    kept as it is keeps its source reference)."""
    snap: dict[str, object] = _snapshot(out, (*PER_PARTITIONING, "images"))
    for corpus in validation.IMAGE_CORPORA:
        snap[f"{corpus}.jsonl"] = [{**r, "image": pack_member(r["image"]) if r["image"] != r["source_image"]
                                    else r["image"]} for r in read_jsonl(out / f"{corpus}.jsonl")]
    return snap


def test_partitions_give_the_one_pass_outputs_and_counts_add_up(tmp_path):
    cfg, prepared = _prepare(tmp_path)
    out = Path(cfg.paths.validated)
    _run(cfg, prepared, EngineConfig(partition_rows=ONE_PASS))
    one_pass = _resolved(out)
    one_pass_ge = json.loads((out / "ge" / "pairs.json").read_text())
    assert [p.name for p in (out / "images" / "pairs").iterdir()] == ["00000.tar"]
    shutil.rmtree(out)

    result = _run(cfg, prepared, EngineConfig(partition_rows=SMALL_PARTITIONS))
    # rows (images as the bytes they point to), rejects, metrics, report: the same
    assert _resolved(out) == one_pass
    # at most one pack per partition, whatever the number of images: no file per image; none for a partition
    # whose accepted images were all kept as they are
    accepted = {r["key"]: r for r in read_jsonl(out / "pairs.jsonl")}
    packs = {parse_ref(r["image"]).uri for r in accepted.values() if r["image"] != r["source_image"]}
    assert sorted(p.name for p in (out / "images" / "pairs").iterdir()) == sorted(Path(p).name for p in packs)
    assert len(packs) > 1
    # an RGB PNG, kept as it is: the accepted row names the source, shared with the rejected first row
    assert accepted["shared-later"]["image"] == str(tmp_path / "src" / "shared.img")
    rejects = {r["key"]: r["reason"] for r in read_jsonl(out / "pairs.rejects.jsonl")}
    assert rejects["rgb"] == "duplicate key: 'rgb' already seen at row 0"  # a row of partition 5 -> row 0

    parts = out / validation.PARTITIONS_DIR / "pairs"
    index = json.loads((parts / "index.json").read_text())
    assert index["rows"] == 21 and len(index["partitions"]) == 7
    summaries = [json.loads((parts / f"{name}.json").read_text()) for name in index["partitions"]]
    for s in summaries:
        m = s["metrics"]
        assert m["in"] == m["accepted"] + m["rejected"] == s["rows"]
    assert sum(s["metrics"]["in"] for s in summaries) == result["pairs"]["in"] == 21
    assert sum(s["metrics"]["accepted"] for s in summaries) == result["pairs"]["accepted"] == 8
    # the aggregated GE result counts what the one-pass result counts
    ge = json.loads((out / "ge" / "pairs.json").read_text())
    assert ge["statistics"] == one_pass_ge["statistics"] and ge["success"] is one_pass_ge["success"]
    for mine, theirs in zip(ge["results"], one_pass_ge["results"]):
        for key in ("element_count", "unexpected_count", "unexpected_percent", "missing_count"):
            assert mine["result"].get(key) == pytest.approx(theirs["result"].get(key)), key
        assert mine["success"] is theirs["success"]
        assert mine["result"].get("partial_unexpected_index_list") == theirs["result"].get(
            "partial_unexpected_index_list")


@pytest.mark.slow
def test_local_dask_cluster_gives_the_serial_bytes(tmp_path):
    cfg, prepared = _prepare(tmp_path)
    out = Path(cfg.paths.validated)
    _run(cfg, prepared, EngineConfig(partition_rows=SMALL_PARTITIONS))
    serial = _snapshot(out)
    shutil.rmtree(out)
    _run(cfg, prepared, EngineConfig(kind="local", workers=2, partition_rows=SMALL_PARTITIONS))
    assert _snapshot(out) == serial


def test_killed_validate_resumes_at_the_first_unfinished_partition(tmp_path, monkeypatch):
    cfg, prepared = _prepare(tmp_path)
    out = Path(cfg.paths.validated)
    engine = EngineConfig(partition_rows=SMALL_PARTITIONS)
    _run(cfg, prepared, engine)
    uninterrupted = _snapshot(out)
    shutil.rmtree(out)

    real_summary_write = validation.write_json_atomic
    killed_at = out / validation.PARTITIONS_DIR / "pairs" / "00003.json"

    def killed(path, doc):  # partition 3 wrote its rows and images, then the process died
        if path == killed_at:
            raise KeyboardInterrupt("killed")
        real_summary_write(path, doc)

    monkeypatch.setattr(validation, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, prepared, engine)
    monkeypatch.setattr(validation, "write_json_atomic", real_summary_write)
    assert not killed_at.exists() and not (out / "pairs.jsonl").exists()
    (out / "images" / "pairs" / ".half-written.png.123.tmp").write_bytes(b"\x89PNG cut short")
    (out / validation.PARTITIONS_DIR / "pairs" / ".00004.jsonl.123.tmp").write_text('{"key": "cut')

    done = spy_partitions(monkeypatch, validation, "validate_partition")
    _run(cfg, prepared, engine)
    assert [i for corpus, i in done if corpus == "pairs"] == [3, 4, 5, 6]  # 0..2 were kept
    assert _snapshot(out) == uninterrupted

    done.clear()  # a finished run re-run does no partition again, and rewrites the same bytes
    _run(cfg, prepared, engine)
    assert done == [] and _snapshot(out) == uninterrupted

    cfg.data.validation.max_caption_words = 3  # new params: every partition again
    _run(cfg, prepared, engine)
    assert [i for corpus, i in done if corpus == "pairs"] == list(range(7))
    assert read_jsonl(out / "pairs.rejects.jsonl") != []


def test_passthrough_keeps_jpeg_and_png_bytes_unless_a_conversion_is_needed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # (compress_level 1: PIL's default re-encoding gives other bytes, so keeping them is visible)
    inputs = {"photo": encode(rgb((40, 30)), "JPEG", quality=80), "drawing": encode(rgb((30, 40)), compress_level=1),
              "grey": encode(rgb().convert("L"), "JPEG"), "exif": exif_rotated_jpeg()}
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    rows = []
    for name, data in inputs.items():
        (src / name).write_bytes(data)
        rows.append({"key": name, "image": str(src / name), "text": f"a picture called {name}"})
    (prepared / "pairs.jsonl").write_text("".join(dump_row(r) + "\n" for r in rows))
    for corpus in ("images", "text"):
        (prepared / f"{corpus}.jsonl").write_text("")
    for passthrough in (False, True):
        out = tmp_path / f"validated-{passthrough}"
        validation.validate(ValidateConfig(passthrough=passthrough), S3Config(), prepared, out)
        written = {r["key"]: r for r in read_jsonl(out / "pairs.jsonl")}
        assert set(written) == set(inputs)
        for name, row in written.items():
            kept = passthrough and name in ("photo", "drawing")  # grey: mode L; exif: to be rotated
            if kept:  # not copied: the row names the source
                assert row["image"] == str(src / name)
                data = Path(row["image"]).read_bytes()
            else:
                member, data = pack_member(row["image"])
                assert Path(member).suffix == ".png", name
            assert (data == inputs[name]) is kept, name
            assert Image.open(io.BytesIO(data)).mode == "RGB"


def test_synthetic_world_is_the_same_with_and_without_passthrough(tmp_path):
    """Why passthrough can be the default without changing the pipeline's shards: the synthetic PNGs are what
    re-encoding them would write. With passthrough they are not copied: the rows name the raw files, whose bytes
    are those of the re-encoded copies."""
    cfg = PipelineConfig.model_validate({
        "paths": {k: str(tmp_path / k) for k in ("raw", "prepared", "validated")},
        "data": {"generate": SMALL}, "tracking": tracking_in(tmp_path)})
    run_generate(cfg)
    run_prepare(cfg)
    out = Path(cfg.paths.validated)
    snapshots = []
    for passthrough in (False, True):
        shutil.rmtree(out, ignore_errors=True)
        v = cfg.data.validation.model_copy(update={"passthrough": passthrough})
        validation.validate(v, cfg.data.ingest.s3, cfg.paths.prepared, out)
        if not passthrough:
            with tarfile.open(out / "images" / "pairs" / "00000.tar") as tar:
                assert tar.getnames() and all(name.endswith(".png") for name in tar.getnames())
        snapshot = _snapshot(out, (validation.PARTITIONS_DIR, "images"))
        for corpus in validation.IMAGE_CORPORA:  # each image as the bytes it names
            snapshot[f"{corpus}.jsonl"] = [{**r, "image": ref_bytes(r["image"])}
                                           for r in read_jsonl(out / f"{corpus}.jsonl")]
        snapshots.append(snapshot)
    assert [p for p in (out / "images").rglob("*") if p.is_file()] == []  # passthrough: nothing copied
    assert snapshots[0] == snapshots[1]


def test_engines_return_results_in_partition_order():
    items = list(range(12))
    assert Engine().map(_square, items) == [i * i for i in items]
    with pytest.raises(ValueError, match="data.engine.address"):
        EngineConfig(kind="address")
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, processes=False, dashboard_address=None) as cluster:
        with open_engine(EngineConfig(kind="address", address=cluster.scheduler_address)) as engine:
            assert engine.map(_square, items) == [i * i for i in items]


def _square(x: int) -> int:
    return x * x
