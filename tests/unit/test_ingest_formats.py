"""The formats people bring, each as a small fixture in its exact published layout, through prepare (and validate
where images are read): img2dataset parquet and webdataset output, Hugging Face parquet and ``save_to_disk``
Arrow, COCO captions and Karpathy splits, CC3M-style headerless TSV, ImageNet folders with a class-name map and
``.txt`` corpora. Counts add up (in = accepted + rejected), keys carry the source name, and an image's bytes are
stored once however many captions it has."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from flava.cli import main as cli_main
from flava.config import PipelineConfig
from flava.data import sources
from flava.data.ingest import run_prepare
from flava.data.packs import parse_ref, read_ref
from flava.data.prep_config import ManifestPairs, TextFiles
from flava.data.validate import run_validate
from flava.exitcodes import NON_RETRYABLE
from flava.train.stages import require_zeroshot_eval
from tests.helpers import tracking_in
from tests.unit.test_validate import pack_member

COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 220), (230, 200, 20), (120, 40, 160)]


def jpeg(colour=(200, 30, 30), size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def raw_with_other_corpora(tmp_path: Path) -> Path:
    """paths.raw with a small valid image corpus and text corpus, so each test varies the pair sources only."""
    raw = tmp_path / "raw"
    (raw / "cls" / "cat").mkdir(parents=True)
    (raw / "cls" / "cat" / "a.jpg").write_bytes(jpeg())
    (raw / "txt").mkdir()
    (raw / "txt" / "a.txt").write_text("A short text corpus with enough words in it to be one passage.\n")
    return raw


def cfg(tmp_path: Path, pairs: list[dict], **ingest) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "paths": {k: str(tmp_path / k) for k in ("raw", "prepared", "validated")},
        "data": {"ingest": {"pairs": pairs, "images": [{"path": "cls"}], "text": [{"path": "txt"}],
                            "eval_dir": None, **ingest},
                 "validation": {"min_accept_fraction": 0.0}},
        "tracking": tracking_in(tmp_path),
    })


def prepared_pairs(tmp_path: Path) -> tuple[list[dict], list[dict], dict]:
    out = tmp_path / "prepared"
    metrics = json.loads((out / "metrics.json").read_text())
    for corpus in ("pairs", "images", "text"):
        m = metrics[corpus]
        assert m["in"] == m["accepted"] + m["rejected"] and sum(m["reasons"].values()) == m["rejected"], corpus
    return read_jsonl(out / "pairs.jsonl"), read_jsonl(out / "pairs.rejects.jsonl"), metrics


def extracted_files(tmp_path: Path) -> list[str]:
    """The packs under paths.prepared/extracted, as ``<source>/<unit>.tar``."""
    root = tmp_path / "prepared" / "extracted"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ img2dataset / HF parquet
I2D_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()), ("url", pa.string()), ("jpg", pa.binary()),
                        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int64()),
                        ("height", pa.int64()), ("sha256", pa.string())])


def img2dataset_parquet(folder: Path, parts: list[list[tuple[str, str, bytes | None]]]) -> None:
    """img2dataset ``output_format=parquet``: ``00000.parquet`` (+ ``00000_stats.json``) per part, the image bytes
    in ``jpg``, failed downloads with a null ``jpg``, status and error message."""
    folder.mkdir(parents=True)
    for n, rows in enumerate(parts):
        table = pa.table({
            "key": [k for k, _, _ in rows], "caption": [c for _, c, _ in rows],
            "url": [f"http://127.0.0.1/img/{k}.jpg" for k, _, _ in rows], "jpg": [b for _, _, b in rows],
            "status": ["success" if b else "failed_to_download" for _, _, b in rows],
            "error_message": [None if b else "HTTP Error 404: Not Found" for _, _, b in rows],
            "width": [40 if b else None for _, _, b in rows], "height": [32 if b else None for _, _, b in rows],
            "sha256": [hashlib.sha256(b).hexdigest() if b else None for _, _, b in rows],
        }, schema=I2D_SCHEMA)
        pq.write_table(table, folder / f"{n:05d}.parquet", row_group_size=2)
        (folder / f"{n:05d}_stats.json").write_text(json.dumps({"count": len(rows)}))


def test_img2dataset_parquet_images_come_from_the_bytes_and_are_stored_once(tmp_path):
    raw = raw_with_other_corpora(tmp_path)
    same = jpeg(COLOURS[0])
    img2dataset_parquet(raw / "laion", [
        [("000000000", "a red square on white", same), ("000000001", "the same photo again", same),
         ("000000002", "a photo that failed", None)],
        [("000010000", "a green field", jpeg(COLOURS[1])), ("000010001", "a blue sky", jpeg(COLOURS[2]))],
    ])
    c = cfg(tmp_path, [{"path": "laion", "image_column": "jpg"}])
    assert run_prepare(c)["pairs"] == {"in": 5, "accepted": 4, "rejected": 1}
    rows, rejects, _ = prepared_pairs(tmp_path)
    assert [r["key"] for r in rows] == ["laion-000000000", "laion-000000001", "laion-000010000", "laion-000010001"]
    assert [r["text"] for r in rows][2:] == ["a green field", "a blue sky"]
    assert rows[0]["image"] == rows[1]["image"]  # identical bytes: one member, two references
    # one pack per parquet part (a prepare partition), not a file per image
    assert extracted_files(tmp_path) == ["laion/00000.tar", "laion/00001.tar"]
    member, data = pack_member(rows[0]["image"])
    assert data == same and member.endswith(".jpg")
    with tarfile.open(tmp_path / "prepared" / "extracted" / "laion" / "00000.tar") as tar:
        assert len(tar.getmembers()) == 1  # the two rows' identical bytes, once
    # the manifest holds references, never the bytes (nor their text as a path)
    assert (tmp_path / "prepared" / "pairs.jsonl").stat().st_size < 2000
    [reject] = rejects
    assert reject["reason"] == ("no image reference (img2dataset status failed_to_download: "
                                "HTTP Error 404: Not Found)")
    assert reject["row"]["key"] == "000000002" and reject["row"]["jpg"] is None

    result = run_validate(c)
    assert result["pairs"] == {"in": 4, "accepted": 4, "rejected": 0, "reject_rate": 0.0}
    validated = read_jsonl(tmp_path / "validated" / "pairs.jsonl")
    # RGB JPEGs kept as they are: the rows still point into prepare's packs, validation copies nothing
    assert list((tmp_path / "validated" / "images" / "pairs").iterdir()) == []
    assert [r["image"] for r in validated] == [r["image"] for r in rows]
    assert len({r["image"] for r in validated}) == 3
    assert {parse_ref(r["image"]).uri for r in validated} == {
        str(tmp_path / "prepared" / "extracted" / "laion" / name) for name in ("00000.tar", "00001.tar")}
    green = Image.open(io.BytesIO(read_ref(validated[2]["image"])))
    assert green.getpixel((5, 5))[1] > 120  # the green one, decoded from its bytes


def test_bytes_in_a_path_column_are_a_reject_not_a_crash(tmp_path):
    """Pointing image_column at bytes is fine; pointing it at a long non-path string is quarantined by validate
    ("missing file"), never an uncaught OSError."""
    raw = raw_with_other_corpora(tmp_path)
    (raw / "p").mkdir()
    pq.write_table(pa.table({"key": ["a"], "caption": ["a caption here"], "image": ["x" * 5000]}),
                   raw / "p" / "m.parquet")
    c = cfg(tmp_path, [{"path": "p/m.parquet"}])
    run_prepare(c)
    result = run_validate(c)
    assert result["pairs"]["rejected"] == 1
    [reject] = read_jsonl(tmp_path / "validated" / "pairs.rejects.jsonl")
    assert reject["reason"].startswith("missing file:") and len(reject["reason"]) < 600


HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_hf_parquet_image_structs_with_bytes_embedded_or_null(tmp_path):
    """A Hugging Face dataset's parquet export (``data/train-0000x-of-0000n.parquet``), ``image`` an ``Image``
    feature: ``{bytes, path}`` with the bytes embedded, or null bytes and a path."""
    raw = raw_with_other_corpora(tmp_path)
    (raw / "hf" / "data").mkdir(parents=True)
    (raw / "hf" / "data" / "local.jpg").write_bytes(jpeg(COLOURS[3]))
    parts = [
        [{"bytes": jpeg(COLOURS[0]), "path": "0001.jpg"}, {"bytes": None, "path": "local.jpg"}],
        [{"bytes": None, "path": None}, {"bytes": jpeg(COLOURS[1]), "path": None}],
    ]
    for n, images in enumerate(parts):
        table = pa.table({"image": pa.array(images, type=HF_IMAGE),
                          "text": [f"caption {n}-{i} of an image" for i in range(len(images))]})
        pq.write_table(table, raw / "hf" / "data" / f"train-{n:05d}-of-00002.parquet")
    c = cfg(tmp_path, [{"path": "hf/data", "name": "hf", "key_column": None, "caption_column": "text"}])
    assert run_prepare(c)["pairs"] == {"in": 4, "accepted": 3, "rejected": 1}
    rows, rejects, _ = prepared_pairs(tmp_path)
    assert [r["key"] for r in rows] == ["hf-00000000", "hf-00000001", "hf-00000003"]
    assert extracted_files(tmp_path) == ["hf/00000.tar", "hf/00001.tar"]
    assert pack_member(rows[0]["image"])[1] == parts[0][0]["bytes"]
    assert rows[1]["image"] == str(raw / "hf" / "data" / "local.jpg")  # null bytes: the path, resolved
    assert rejects[0]["reason"] == "no image reference"
    assert rejects[0]["row"]["image"] == {"bytes": None, "path": None}
    assert run_validate(c)["pairs"]["accepted"] == 3


def _write_arrow_dataset(folder: Path, table: pa.Table) -> None:
    """The layout ``datasets.Dataset.save_to_disk`` writes: Arrow IPC stream files + state.json + dataset_info."""
    folder.mkdir(parents=True)
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}], "_fingerprint": "0",
                                                   "_format_columns": None, "_format_type": None,
                                                   "_split": folder.name}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"image": {"_type": "Image"},
                                                                       "caption": {"_type": "Value"}}}))


def test_hf_save_to_disk_arrow_dataset_dict(tmp_path):
    raw = raw_with_other_corpora(tmp_path)
    (raw / "ds").mkdir()
    (raw / "ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    for split, n in (("train", 3), ("test", 2)):
        images = [{"bytes": jpeg(COLOURS[i]), "path": None} for i in range(n)]
        _write_arrow_dataset(raw / "ds" / split, pa.table({
            "image": pa.array(images, type=HF_IMAGE), "caption": [f"{split} caption number {i}" for i in range(n)],
            "id": [f"{split}{i}" for i in range(n)]}))
    c = cfg(tmp_path, [{"path": "ds", "split": "train", "key_column": "id"}])
    assert run_prepare(c)["pairs"] == {"in": 3, "accepted": 3, "rejected": 0}
    rows, _, _ = prepared_pairs(tmp_path)
    assert [r["key"] for r in rows] == ["ds-train0", "ds-train1", "ds-train2"]
    assert [read_ref(r["image"]) for r in rows] == [jpeg(COLOURS[i]) for i in range(3)]
    assert run_validate(c)["pairs"]["accepted"] == 3
    # every split of the DatasetDict; a split it does not have is a readable error
    assert run_prepare(cfg(tmp_path, [{"path": "ds", "key_column": "id"}]))["pairs"]["accepted"] == 5
    with pytest.raises(ValueError, match="split 'validation' is not in the saved DatasetDict"):
        run_prepare(cfg(tmp_path, [{"path": "ds", "split": "validation"}]))


# ----------------------------------------------------------- Karpathy JSON (COCO: test_ingest_captions.py)
def test_karpathy_splits_flickr30k_and_coco_layouts(tmp_path):
    raw = raw_with_other_corpora(tmp_path)
    (raw / "flickr30k-images").mkdir()
    (raw / "coco" / "val2014").mkdir(parents=True)
    flickr, coco = [], []
    for i, split in enumerate(["train", "train", "val", "test"]):
        (raw / "flickr30k-images" / f"{1000 + i}.jpg").write_bytes(jpeg(COLOURS[i]))
        flickr.append({"filename": f"{1000 + i}.jpg", "imgid": i, "split": split,
                       "sentids": [5 * i + k for k in range(5)],
                       "sentences": [{"raw": f"Sentence {k} about picture {i}.", "tokens": ["sentence"],
                                      "imgid": i, "sentid": 5 * i + k} for k in range(5)]})
    (raw / "coco" / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(jpeg(COLOURS[4]))
    coco.append({"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "imgid": 0, "cocoid": 42,
                 "split": "restval", "sentences": [{"raw": "A man riding a horse.", "sentid": 0},
                                                   {"raw": "A horse with a rider.", "sentid": 1}]})
    (raw / "dataset_flickr30k.json").write_text(json.dumps({"images": flickr, "dataset": "flickr30k"}))
    (raw / "dataset_coco.json").write_text(json.dumps({"images": coco, "dataset": "coco"}))
    c = cfg(tmp_path, [{"kind": "karpathy", "path": "dataset_flickr30k.json", "images_dir": "flickr30k-images"},
                       {"kind": "karpathy", "path": "dataset_coco.json", "images_dir": "coco"}])
    assert run_prepare(c)["pairs"] == {"in": 5, "accepted": 3, "rejected": 2}  # counted in images
    rows, rejects, metrics = prepared_pairs(tmp_path)
    assert metrics["pairs"]["sources"] == {"dataset_flickr30k": {"accepted": 2, "in": 4, "rejected": 2},
                                           "dataset_coco": {"accepted": 1, "in": 1}}
    assert rows[0]["key"] == "dataset_flickr30k-0" and "text" not in rows[0]
    assert rows[0]["captions"] == [f"Sentence {k} about picture 0." for k in range(5)]
    assert rows[-1] == {"key": "dataset_coco-0", "source": "dataset_coco",
                        "image": str(raw / "coco" / "val2014" / "COCO_val2014_000000000042.jpg"),
                        "captions": ["A man riding a horse.", "A horse with a rider."]}
    assert {r["reason"] for r in rejects} == {"split 'val' not in splits ['train', 'restval']",
                                              "split 'test' not in splits ['train', 'restval']"}
    assert run_validate(c)["pairs"]["accepted"] == 3
    # RGB JPEGs kept as they are: read from the raw tree, not copied
    assert list((tmp_path / "validated" / "images" / "pairs").iterdir()) == []
    validated = read_jsonl(tmp_path / "validated" / "pairs.jsonl")
    assert all(r["image"] == r["source_image"] and r["image"].startswith(str(raw)) for r in validated)


def test_a_captions_json_given_as_a_manifest_says_which_kind_to_use(tmp_path):
    raw = raw_with_other_corpora(tmp_path)
    (raw / "captions_val2017.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="use kind: coco"):
        run_prepare(cfg(tmp_path, [{"path": "captions_val2017.json"}]))


# ------------------------------------------------------------------------------ CC3M / CC12M TSV
def test_cc3m_tsv_without_header(tmp_path):
    raw = raw_with_other_corpora(tmp_path)
    (raw / "cc3m" / "img").mkdir(parents=True)
    for i in range(3):
        (raw / "cc3m" / "img" / f"{i}.jpg").write_bytes(jpeg(COLOURS[i]))
    # as distributed: caption<TAB>url, no header; captions may hold bare quotes
    (raw / "cc3m" / "Train_GCC-training.tsv").write_text(
        'a "vintage" car parked on the street\timg/0.jpg\n'
        "actor attends the premiere of the film\timg/1.jpg\n"
        "a dog runs across the field\timg/2.jpg\n"
        "a web-only image\thttp://example.com/x.jpg\n")
    src = {"path": "cc3m/Train_GCC-training.tsv", "header": False, "column_names": ["caption", "url"],
           "image_column": "url", "key_column": None}
    assert run_prepare(cfg(tmp_path, [src]))["pairs"] == {"in": 4, "accepted": 3, "rejected": 1}
    rows, rejects, _ = prepared_pairs(tmp_path)
    assert rows[0] == {"key": "Train_GCC-training-00000000", "image": str(raw / "cc3m" / "img" / "0.jpg"),
                       "text": 'a "vintage" car parked on the street', "source": "Train_GCC-training"}
    assert rejects[0]["reason"].startswith("unsupported image URI scheme: http://")
    # CC12M's column order, by name
    (raw / "cc3m" / "cc12m.tsv").write_text("img/0.jpg\ta caption first\n")
    run_prepare(cfg(tmp_path, [{**src, "path": "cc3m/cc12m.tsv", "column_names": ["url", "caption"]}]))
    assert prepared_pairs(tmp_path)[0][0]["text"] == "a caption first"
    with pytest.raises(ValueError, match="header: false needs column_names"):
        ManifestPairs(path="x.tsv", header=False)


# ------------------------------------------------------------------------------ img2dataset webdataset
def img2dataset_tar(path: Path, samples: list[tuple[str, str, bytes]]) -> None:
    """img2dataset ``output_format=webdataset``: per sample ``<key>.jpg``, ``<key>.txt``, ``<key>.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, caption, data in samples:
            meta = {"url": f"http://127.0.0.1/{key}.jpg", "key": key, "status": "success", "caption": caption,
                    "width": 40, "height": 32, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for ext, payload in (("jpg", data), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_compressed_webdataset_shards_go_into_one_pack_per_shard(tmp_path):
    """A gzipped shard's member offsets are those of the decompressed stream, which no ranged read reaches: its
    images are copied into the source's pack; an uncompressed shard's are referenced in place."""
    raw = raw_with_other_corpora(tmp_path)
    img2dataset_tar(tmp_path / "plain.tar", [(f"00000000{i}", f"a thing number {i} here", jpeg(COLOURS[i]))
                                             for i in range(3)])
    (raw / "gz").mkdir()
    (raw / "gz" / "00000.tar.gz").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    c = cfg(tmp_path, [{"kind": "webdataset", "path": "gz", "pattern": "*.tar.gz"}])
    assert run_prepare(c)["pairs"] == {"in": 3, "accepted": 3, "rejected": 0}
    rows, _, _ = prepared_pairs(tmp_path)
    assert extracted_files(tmp_path) == ["gz/00000.tar"]
    assert [pack_member(r["image"])[1] for r in rows] == [jpeg(COLOURS[i]) for i in range(3)]
    assert run_validate(c)["pairs"]["accepted"] == 3


def test_several_img2dataset_corpora_in_one_run_never_collide(tmp_path):
    raw = raw_with_other_corpora(tmp_path)
    img2dataset_tar(raw / "cc3m" / "00000.tar", [("000000000", "a red thing here", jpeg(COLOURS[0])),
                                                 ("000000001", "a green thing here", jpeg(COLOURS[1]))])
    img2dataset_tar(raw / "cc12m" / "00000.tar", [("000000000", "a blue thing here", jpeg(COLOURS[2]))])
    c = cfg(tmp_path, [{"kind": "webdataset", "path": "cc3m"}, {"kind": "webdataset", "path": "cc12m"}])
    assert run_prepare(c)["pairs"] == {"in": 3, "accepted": 3, "rejected": 0}
    rows, _, _ = prepared_pairs(tmp_path)
    assert [r["key"] for r in rows] == ["cc3m-000000000", "cc3m-000000001", "cc12m-000000000"]
    # the per-sample json's provenance is kept
    assert rows[2]["url"] == "http://127.0.0.1/000000000.jpg"
    assert rows[2]["sha256"] == hashlib.sha256(jpeg(COLOURS[2])).hexdigest()
    assert rows[2]["size"] == len(jpeg(COLOURS[2]))
    result = run_validate(c)
    assert result["pairs"] == {"in": 3, "accepted": 3, "rejected": 0, "reject_rate": 0.0}
    assert read_jsonl(tmp_path / "validated" / "pairs.jsonl")[2]["url"] == "http://127.0.0.1/000000000.jpg"
    # two sources that would name their keys alike are a config error, not a collision
    img2dataset_tar(raw / "other" / "cc3m" / "00000.tar", [("000000000", "a thing here", jpeg())])
    with pytest.raises(ValueError, match=r"several sources are named \['cc3m'\]"):
        run_prepare(cfg(tmp_path, [{"kind": "webdataset", "path": "cc3m"},
                                   {"kind": "webdataset", "path": "other/cc3m"}]))


# ------------------------------------------------------------------------------ ImageNet folders + class names
def test_imagenet_synset_folders_with_a_class_name_map(tmp_path):
    raw = raw_with_other_corpora(tmp_path)
    for synset in ("n01440764", "n01443537", "n99999999"):
        (raw / "train" / synset).mkdir(parents=True)
        (raw / "train" / synset / f"{synset}_10026.JPEG").write_bytes(jpeg())
    (raw / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    (raw / "pairs.jsonl").write_text(json.dumps({"key": "k", "image": "cls/cat/a.jpg", "caption": "a cat"}) + "\n")
    c = cfg(tmp_path, [{"path": "pairs.jsonl"}], images=[{"path": "train", "class_names": "LOC_synset_mapping.txt"}])
    assert run_prepare(c)["images"] == {"in": 3, "accepted": 2, "rejected": 1}
    rows = read_jsonl(tmp_path / "prepared" / "images.jsonl")
    assert [(r["label"], r["synset"]) for r in rows] == [("tench, Tinca tinca", "n01440764"),
                                                         ("goldfish, Carassius auratus", "n01443537")]
    [reject] = read_jsonl(tmp_path / "prepared" / "images.rejects.jsonl")
    assert "'n99999999' is not in the class-name map" in reject["reason"]
    # Keras' imagenet_class_index.json and a plain {synset: name} object read the same
    (raw / "idx.json").write_text(json.dumps({"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}))
    (raw / "plain.json").write_text(json.dumps({"n01440764": "tench", "n01443537": "goldfish"}))
    assert sources.load_class_names(raw / "idx.json") == sources.load_class_names(raw / "plain.json") == {
        "n01440764": "tench", "n01443537": "goldfish"}


# ------------------------------------------------------------------------------ .txt corpora
def test_txt_paragraphs_merge_up_to_a_minimum_length(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("CHAPTER ONE\n\nIt was a dark night.\n\nThe rain fell on the quiet town and nobody\nwas out.\n\n"
                    "\n\nYes.\n\nNo.\n\nThe end of the story came quickly after that long and rainy night.\n\nFin.\n")
    docs = list(sources._txt_documents(path, min_words=8))
    assert [d[0] for d in docs] == [
        "CHAPTER ONE It was a dark night. The rain fell on the quiet town and nobody was out.",
        "Yes. No. The end of the story came quickly after that long and rainy night.",
        "Fin.",  # the file's short tail
    ]
    assert [(d[1], d[2]) for d in docs] == [(1, 6), (10, 14), (16, 16)]
    assert " ".join(d[0] for d in docs).split() == path.read_text().split()  # nothing lost, order kept
    # min_document_words: 1 keeps every paragraph a document
    assert len(list(sources._txt_documents(path, min_words=1))) == 7


def test_txt_corpus_is_streamed_not_read_whole(tmp_path):
    path = tmp_path / "big.txt"
    paragraph = " ".join(["word"] * 60)
    with path.open("w") as f:
        for _ in range(40_000):  # ~12 MB
            f.write(paragraph + "\n\n")
    src = TextFiles(path=str(path))
    tracemalloc.start()
    try:
        count = sum(1 for _ in sources.read_text_documents(src, tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 40_000
    assert peak < path.stat().st_size / 20, peak


# ------------------------------------------------------------------------------ failing loudly
def test_a_source_with_every_row_rejected_fails_prepare_with_exit_code_2(tmp_path, monkeypatch, capsys):
    raw = raw_with_other_corpora(tmp_path)
    (raw / "cc3m.tsv").write_text("a caption here\timg/0.jpg\nanother caption\timg/1.jpg\n")
    good = raw / "good.jsonl"
    good.write_text(json.dumps({"key": "k", "image": "cls/cat/a.jpg", "caption": "a cat"}) + "\n")
    # the TSV read with its first row as the header: every row lacks the configured columns
    pairs = [{"path": "good.jsonl"}, {"path": "cc3m.tsv", "key_column": None, "image_column": "url"}]
    with pytest.raises(ValueError) as err:
        run_prepare(cfg(tmp_path, pairs))
    message = str(err.value)
    assert "pairs source 'cc3m': all 1 rows rejected" in message and "missing column(s) ['url', 'caption']" in message
    assert "good" not in message
    assert (tmp_path / "prepared" / "pairs.rejects.jsonl").is_file()  # written for inspection first
    # through the CLI: exit code NON_RETRYABLE (2), the message on stderr
    monkeypatch.chdir(tmp_path)
    params = cfg(tmp_path, pairs).model_dump(mode="json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli_main(["data", "prepare", "--params", str(tmp_path / "params.yaml")]) == NON_RETRYABLE == 2
    assert "all 1 rows rejected" in capsys.readouterr().err


def test_joint_without_a_zeroshot_eval_set_says_how_to_make_one(tmp_path):
    with pytest.raises(ValueError) as err:
        require_zeroshot_eval(tmp_path / "prepared" / "eval")
    message = str(err.value)
    assert "['classes.json', 'val.jsonl'] do not exist" in message
    assert "classnames" in message and "templates" in message and "class_names" in message
    (tmp_path / "zs" / "zeroshot").mkdir(parents=True)
    (tmp_path / "zs" / "zeroshot" / "classes.json").write_text("{}")
    with pytest.raises(ValueError, match=r"\['val.jsonl'\] do not exist"):
        require_zeroshot_eval(tmp_path / "zs")
    (tmp_path / "zs" / "zeroshot" / "val.jsonl").write_text("")
    require_zeroshot_eval(tmp_path / "zs")


def test_readme_bring_your_own_data_example_is_a_valid_config():
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## Bring your own data"):]
    example = yaml.safe_load(section[section.index("```yaml") + 7:section.index("```", section.index("```yaml") + 7)])
    ingest = PipelineConfig.model_validate(example).data.ingest
    assert [type(s).__name__ for s in ingest.pairs] == ["WebdatasetPairs"] * 2 + ["ManifestPairs"] * 3 + [
        "CocoPairs", "KarpathyPairs", "ManifestPairs"]
    assert ingest.images[0].class_names == "LOC_synset_mapping.txt"
