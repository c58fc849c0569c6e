"""Ingestion: every source kind into manifests, rejects with reasons, counts that add up, eval sets resolved."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from flava.config import PipelineConfig
from flava.data import sources
from flava.data.ingest import run_prepare
from flava.data.packs import read_ref
from flava.data.prep_config import CaptionFilterConfig
from flava.data.synthetic import run_generate
from tests.helpers import tracking_in
from tests.unit.test_synthetic import SMALL


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def png_bytes(colour=(200, 30, 30), size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def cfg_for(tmp_path: Path, ingest: dict | None = None) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "paths": {"raw": str(tmp_path / "raw"), "prepared": str(tmp_path / "prepared")},
        "data": {"generate": SMALL, "ingest": ingest or {}},
        "tracking": tracking_in(tmp_path),
    })


def assert_counts_add_up(metrics: dict) -> None:
    for corpus in ("pairs", "images", "text"):
        m = metrics[corpus]
        assert m["in"] == m["accepted"] + m["rejected"], corpus
        assert sum(m["reasons"].values()) == m["rejected"], corpus


def test_default_sources_read_the_generated_layout(tmp_path):
    cfg = cfg_for(tmp_path)
    run_generate(cfg)
    result = run_prepare(cfg)
    assert result["pairs"] == {"in": 24, "accepted": 24, "rejected": 0}
    assert result["images"] == {"in": 12, "accepted": 12, "rejected": 0}
    assert result["text"]["accepted"] == 12
    prepared = tmp_path / "prepared"
    pairs = read_jsonl(prepared / "pairs.jsonl")
    assert all(Path(r["image"]).is_file() and r["text"] for r in pairs)
    images = read_jsonl(prepared / "images.jsonl")
    assert {r["label"] for r in images} == {f"{c}_{s}" for c in SMALL["colours"] for s in SMALL["shapes"]}
    text = read_jsonl(prepared / "text.jsonl")
    assert len(text) >= 12 and all(len(r["text"].split()) <= 64 for r in text)
    metrics = json.loads((prepared / "metrics.json").read_text())
    assert_counts_add_up(metrics)
    # eval sets copied with image paths that open from the working directory
    for split in ("train", "val", "test"):
        for row in read_jsonl(prepared / "eval" / "zeroshot" / f"{split}.jsonl"):
            assert Path(row["image"]).is_file()
        for row in read_jsonl(prepared / "eval" / "vqa" / f"{split}.jsonl"):
            assert Path(row["image"]).is_file() and row["answer"]
        assert (prepared / "eval" / "text_cls" / f"{split}.tsv").read_text().startswith("sentence\tlabel\n")
    assert all(len(r["captions"]) == 5 for r in read_jsonl(prepared / "eval" / "retrieval" / "test.jsonl"))
    assert metrics["eval"]["zeroshot"] == {"train": 12, "val": 6, "test": 6}
    # re-running gives identical manifests
    before = {p.name: p.read_bytes() for p in prepared.glob("*.jsonl")}
    run_prepare(cfg)
    assert before == {p.name: p.read_bytes() for p in prepared.glob("*.jsonl")}


def _minimal_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    (raw / "cls" / "cat").mkdir(parents=True)
    (raw / "cls" / "cat" / "a.png").write_bytes(png_bytes())
    (raw / "cls" / "cat" / "notes.txt").write_text("not an image")
    (raw / "txt").mkdir()
    (raw / "txt" / "docs.jsonl").write_text('{"text": "One sentence here. Another one there."}\n{broken\n{"body": "x"}\n')
    return raw


def test_csv_and_parquet_manifests_with_local_and_s3_images(tmp_path):
    raw = _minimal_raw(tmp_path)
    (raw / "m" / "imgs").mkdir(parents=True)
    (raw / "m" / "imgs" / "x.png").write_bytes(png_bytes())
    pd.DataFrame({
        "id": ["a", "b.1", "c", "d"],
        "url": ["imgs/x.png", "s3://bucket/path/y.jpg", "", "imgs/missing.png"],
        "text": ["a red square", "a blue dot", "no image here", ""],
    }).to_csv(raw / "m" / "pairs.csv", index=False)
    pd.DataFrame({"path": [str(raw / "m" / "imgs" / "x.png")], "cap": ["absolute path row"]}).to_parquet(
        raw / "m" / "more.parquet")
    cfg = cfg_for(tmp_path, {
        "pairs": [
            {"kind": "manifest", "path": "m/pairs.csv", "key_column": "id", "image_column": "url",
             "caption_column": "text"},
            {"kind": "manifest", "path": "m/more.parquet", "key_column": None, "image_column": "path",
             "caption_column": "cap", "name": "extra"},
        ],
        "images": [{"path": "cls"}], "text": [{"path": "txt"}], "eval_dir": None,
    })
    result = run_prepare(cfg)
    prepared = tmp_path / "prepared"
    rows = {r["key"]: r for r in read_jsonl(prepared / "pairs.jsonl")}
    assert rows["pairs-a"]["image"] == str(raw / "m" / "imgs" / "x.png")
    assert rows["pairs-b_1"]["image"] == "s3://bucket/path/y.jpg"  # kept as a URI; validation fetches it
    assert rows["pairs-d"]["text"] == ""  # empty captions are validation's to quarantine, with their reason
    assert rows["extra-00000000"]["image"] == str(raw / "m" / "imgs" / "x.png")
    rejects = read_jsonl(prepared / "pairs.rejects.jsonl")
    assert [r["reason"] for r in rejects] == ["no image reference"] and rejects[0]["row"]["id"] == "c"
    assert result["pairs"] == {"in": 5, "accepted": 4, "rejected": 1}
    # class folders: the stray .txt is a reject; text: the broken line and the missing field are rejects
    assert result["images"] == {"in": 2, "accepted": 1, "rejected": 1}
    assert "unsupported file extension" in read_jsonl(prepared / "images.rejects.jsonl")[0]["reason"]
    assert result["text"] == {"in": 3, "accepted": 1, "rejected": 2}
    reasons = sorted(r["reason"] for r in read_jsonl(prepared / "text.rejects.jsonl"))
    assert reasons[0].startswith("invalid JSON on line 2") and reasons[1] == "no string field 'text'"
    assert_counts_add_up(json.loads((prepared / "metrics.json").read_text()))


def test_malformed_csv_rows_and_http_urls_are_rejects(tmp_path):
    raw = _minimal_raw(tmp_path)
    (raw / "x.png").write_bytes(png_bytes())
    (raw / "pairs.csv").write_text(
        "key,image,caption\n"
        "ok,x.png,a fine row\n"
        "extra,x.png,a caption,with a stray field\n"
        "web,https://example.com/cat.jpg,a cat from the web\n"
        '"quoted","x.png","a caption, with a comma"\n')
    cfg = cfg_for(tmp_path, {"pairs": [{"path": "pairs.csv"}], "images": [{"path": "cls"}],
                             "text": [{"path": "txt"}], "eval_dir": None})
    result = run_prepare(cfg)
    assert result["pairs"] == {"in": 4, "accepted": 2, "rejected": 2}
    rows = read_jsonl(tmp_path / "prepared" / "pairs.jsonl")
    assert [r["text"] for r in rows] == ["a fine row", "a caption, with a comma"]
    reasons = sorted(r["reason"] for r in read_jsonl(tmp_path / "prepared" / "pairs.rejects.jsonl"))
    assert reasons[0] == "malformed CSV row: 4 fields, expected 3"
    assert reasons[1].startswith("unsupported image URI scheme: https://")


def test_non_utf8_bytes_survive_ingestion_as_escapes(tmp_path):
    raw = _minimal_raw(tmp_path)
    (raw / "p").mkdir()
    (raw / "p" / "x.png").write_bytes(png_bytes())
    (raw / "p" / "captions.jsonl").write_bytes(
        b'{"key": "k1", "image": "x.png", "caption": "caf\xe9 latte"}\n'
        b'{"key": "k2", "image": "x.png", "caption": "fine"}\n')
    cfg = cfg_for(tmp_path, {"pairs": [{"path": "p/captions.jsonl"}], "images": [{"path": "cls"}],
                             "text": [{"path": "txt"}], "eval_dir": None})
    run_prepare(cfg)
    rows = read_jsonl(tmp_path / "prepared" / "pairs.jsonl")
    assert rows[0]["text"] == "caf\udce9 latte" and rows[1]["text"] == "fine"


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_images_are_referenced_in_place_and_incomplete_samples_rejected(tmp_path):
    raw = _minimal_raw(tmp_path)
    (raw / "wds").mkdir()
    _tar(raw / "wds" / "shard-000000.tar", {
        "000001.jpg": png_bytes(), "000001.txt": b"a dog on a beach",
        "000002.jpg": png_bytes(), "000002.json": b"{}",  # no caption
        "000003.txt": b"a caption without an image",
    })
    _tar(raw / "wds" / "shard-000001.tar", {"sub/000004.png": png_bytes(), "sub/000004.txt": b"a cat"})
    cfg = cfg_for(tmp_path, {"pairs": [{"kind": "webdataset", "path": "wds"}], "images": [{"path": "cls"}],
                             "text": [{"path": "txt"}], "eval_dir": None})
    result = run_prepare(cfg)
    assert result["pairs"] == {"in": 4, "accepted": 2, "rejected": 2}
    rows = read_jsonl(tmp_path / "prepared" / "pairs.jsonl")
    assert [r["key"] for r in rows] == ["wds-000001", "wds-sub_000004"]
    for row, shard, member in zip(rows, ("shard-000000.tar", "shard-000001.tar"), ("000001.jpg", "sub/000004.png")):
        with tarfile.open(raw / "wds" / shard) as tar:  # a range of the source tar: its member's data
            info = tar.getmember(member)
        assert row["image"] == f"{raw / 'wds' / shard}#{info.offset_data}+{info.size}"
        assert Image.open(io.BytesIO(read_ref(row["image"]))).size == (24, 24)
    assert list((tmp_path / "prepared" / "extracted").iterdir()) == []  # nothing copied
    reasons = sorted(r["reason"] for r in read_jsonl(tmp_path / "prepared" / "pairs.rejects.jsonl"))
    assert reasons == ["no image member (one of ['jpg', 'jpeg', 'png', 'webp'])", "no txt member"]


def test_pmd_caption_filter_prefers_description_then_title(tmp_path):
    raw = _minimal_raw(tmp_path)
    (raw / "y").mkdir()
    (raw / "y" / "x.png").write_bytes(png_bytes())
    pd.DataFrame({
        "key": ["desc", "title", "none", "foreign"],
        "image": ["x.png"] * 4,
        "title": ["IMG_0001", "a boat on the lake", "dsc", "un bateau sur le lac"],
        "description": ["a dog running on the grass", "nice", "", "一艘船在湖上 漂浮 着"],
    }).to_csv(raw / "y" / "yfcc.csv", index=False)
    cfg = cfg_for(tmp_path, {
        "pairs": [{"path": "y/yfcc.csv", "caption_column": None, "title_column": "title",
                   "description_column": "description", "caption_filter": True}],
        "images": [{"path": "cls"}], "text": [{"path": "txt"}], "eval_dir": None})
    result = run_prepare(cfg)
    rows = {r["key"]: r["text"] for r in read_jsonl(tmp_path / "prepared" / "pairs.jsonl")}
    assert rows == {"yfcc-desc": "a dog running on the grass", "yfcc-title": "a boat on the lake"}
    assert result["pairs"]["rejected"] == 2
    assert all(r["reason"].startswith("caption filter") for r in read_jsonl(tmp_path / "prepared" / "pairs.rejects.jsonl"))


def test_caption_filter_heuristic():
    flt = CaptionFilterConfig()
    assert sources.passes_caption_filter("a red car in the street", flt)
    assert not sources.passes_caption_filter("red car", flt)  # two words: not "more than two"
    assert not sources.passes_caption_filter("IMG 0001 DSC", flt)  # no English function word
    assert not sources.passes_caption_filter("это красная машина на улице", flt)  # not latin letters
    assert not sources.passes_caption_filter(None, flt)


def test_split_passages_respects_max_words():
    text = "One two three. Four five six seven. " + " ".join(f"w{i}" for i in range(25)) + ". End here."
    passages = sources.split_passages(text, max_words=8)
    assert all(len(p.split()) <= 8 for p in passages)
    assert " ".join(passages).split() == text.split()  # nothing lost, order kept
    assert passages[0] == "One two three. Four five six seven."


def test_missing_source_and_bad_eval_set_are_readable_errors(tmp_path):
    raw = _minimal_raw(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        run_prepare(cfg_for(tmp_path, {"pairs": [{"path": "nope.jsonl"}], "images": [{"path": "cls"}],
                                       "text": [{"path": "txt"}], "eval_dir": None}))
    (raw / "p").mkdir()
    (raw / "p" / "captions.jsonl").write_text("")
    (raw / "ev" / "zeroshot").mkdir(parents=True)
    (raw / "ev" / "zeroshot" / "classes.json").write_text(json.dumps({"classnames": ["a"], "templates": ["{}"]}))
    (raw / "ev" / "zeroshot" / "test.jsonl").write_text(json.dumps({"image": "gone.png", "label": 0}) + "\n")
    with pytest.raises(ValueError, match="gone.png does not exist"):
        run_prepare(cfg_for(tmp_path, {"pairs": [{"path": "p/captions.jsonl"}], "images": [{"path": "cls"}],
                                       "text": [{"path": "txt"}], "eval_dir": "ev"}))
