"""Several captions per image (COCO's five) from the raw captions JSON to the training stream: one manifest row and
one stored image per image, every caption validated on its own, and the loader giving one caption per visit,
deterministically. Also: CSV/TSV manifests are streamed, not read whole."""
from __future__ import annotations

import gc
import hashlib
import json
import tracemalloc
from pathlib import Path

from flava.data import sources
from flava.data.captions import CAPTIONS_MEMBER
from flava.data.ingest import run_prepare
from flava.data.loader import ShardDataset, SlotPlan, caption_index
from flava.data.packs import read_ref
from flava.data.prep_config import ManifestPairs
from flava.data.shards import load_index, read_tar, shard_location, write_corpus
from flava.data.validate import run_validate
from tests.unit.test_ingest_formats import COLOURS, cfg, jpeg, prepared_pairs, raw_with_other_corpora, read_jsonl


def coco_captions(raw, images, annotations):
    """``annotations/captions_train2017.json`` as published: info, licenses, images (id, file_name, size, urls,
    license, date), annotations (image_id, id, caption)."""
    (raw / "coco" / "annotations").mkdir(parents=True)
    (raw / "coco" / "train2017").mkdir()
    for n, (image_id, _) in enumerate(images):
        (raw / "coco" / "train2017" / f"{image_id:012d}.jpg").write_bytes(jpeg(COLOURS[n % len(COLOURS)]))
    doc = {
        "info": {"description": "COCO 2017 Dataset", "url": "http://cocodataset.org", "version": "1.0",
                 "year": 2017, "contributor": "COCO Consortium", "date_created": "2017/09/01"},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                      "name": "Attribution-NonCommercial-ShareAlike License"}],
        "images": [{"license": 1, "file_name": f"{image_id:012d}.jpg", "coco_url": "", "height": 32, "width": 40,
                    "date_captured": "2013-11-14 17:02:52", "flickr_url": "", "id": image_id}
                   for image_id, _ in images],
        "annotations": annotations,
    }
    (raw / "coco" / "annotations" / "captions_train2017.json").write_text(json.dumps(doc))


def test_coco_five_captions_per_image_one_sample_from_manifest_to_loader(tmp_path):
    raw = raw_with_other_corpora(tmp_path)
    good = {9: [f"a red square number {k} on a white table" for k in range(5)],
            25: ["a green square on a white table", "   ", "a green block seen from above",
                 "a small green square shape", "green paint on a square card"],
            30: ["", "  "],  # no caption survives validation: the sample is rejected
            40: ["one caption only for this blue square"]}
    annotations = [{"image_id": i, "id": 1000 * i + k, "caption": c}
                   for i, cs in good.items() for k, c in enumerate(cs)]
    annotations += [{"image_id": 77, "id": 1, "caption": "an image that is not listed"},
                    {"image_id": 9, "id": 2, "caption": None}]
    coco_captions(raw, [(i, None) for i in good], annotations)
    c = cfg(tmp_path, [{"kind": "coco", "path": "coco/annotations/captions_train2017.json",
                        "images_dir": "coco/train2017", "name": "coco"}])

    # prepare: one row per image (counted in images + unusable annotations), the image referenced once
    assert run_prepare(c)["pairs"] == {"in": 6, "accepted": 4, "rejected": 2}
    rows, rejects, _ = prepared_pairs(tmp_path)
    image9 = str(raw / "coco" / "train2017" / "000000000009.jpg")
    assert rows[0] == {"key": "coco-9", "image": image9, "captions": good[9], "source": "coco"}
    assert [r["key"] for r in rows] == ["coco-9", "coco-25", "coco-30", "coco-40"]
    assert rows[3] == {"key": "coco-40", "image": str(raw / "coco" / "train2017" / "000000000040.jpg"),
                       "text": good[40][0], "source": "coco"}  # one caption: today's single-caption row
    assert sorted(r["reason"].split(":")[1].strip() for r in rejects) == [
        "image_id 77 has no file_name in 'images'", "no string 'caption'"]

    # validate: every caption checked; a bad one dropped with its reason; a row left with none rejected
    assert run_validate(c)["pairs"] == {"in": 4, "accepted": 3, "rejected": 1, "reject_rate": 0.25}
    metrics = json.loads((tmp_path / "validated" / "metrics.json").read_text())["pairs"]
    assert metrics["captions"] == {"in": 13, "accepted": 10, "rejected": 3, "reasons": {"empty caption": 3}}
    assert metrics["reasons"] == {"no valid caption": 1}
    validated = read_jsonl(tmp_path / "validated" / "pairs.jsonl")
    assert [len(r.get("captions", [r.get("text")])) for r in validated] == [5, 4, 1]
    assert validated[1]["captions"] == [good[25][k] for k in (0, 2, 3, 4)]
    rejected = read_jsonl(tmp_path / "validated" / "pairs.rejects.jsonl")
    samples = [r for r in rejected if "caption_index" not in r]
    drops = [r for r in rejected if "caption_index" in r]
    assert [r["key"] for r in samples] == ["coco-30"] and samples[0]["captions"] == []
    assert samples[0]["reason"] == "no valid caption: all 2 captions dropped (first: empty caption: no text)"
    assert [(r["key"], r["caption_index"], r["reason"]) for r in drops] == [
        ("coco-25", 1, "empty caption: whitespace only"), ("coco-30", 0, "empty caption: no text"),
        ("coco-30", 1, "empty caption: whitespace only")]
    # the JPEGs are kept as they are: validate copies none of them (no pack, no file per image); each accepted row
    # names its source image with the content's SHA-256, which shard checks
    assert list((tmp_path / "validated" / "images" / "pairs").iterdir()) == []
    assert [r["image"] for r in validated] == [r["source_image"] for r in validated]
    assert validated[0]["image"] == image9
    assert validated[0]["image_sha256"] == hashlib.sha256(Path(image9).read_bytes()).hexdigest()
    assert (tmp_path / "validated" / "ge" / "pairs_captions.json").is_file()

    # shard: the image stored once with all its captions
    root = str(tmp_path / "shards")
    index = write_corpus(tmp_path / "validated" / "pairs.jsonl", "pairs", root, c.data.shards, seed=0)
    assert index["num_samples"] == 3
    [shard] = index["shards"]
    stored = {s.key: s.files for s in read_tar((tmp_path / "shards" / "pairs" / shard["name"]).read_bytes())}
    assert sorted(stored) == ["coco-25", "coco-40", "coco-9"]
    # the fixture's JPEGs are kept as they are (data.validation.passthrough)
    assert sorted(stored["coco-9"]) == [CAPTIONS_MEMBER, "jpg", "json"]
    assert json.loads(stored["coco-9"][CAPTIONS_MEMBER]) == good[9]
    assert "captions" not in json.loads(stored["coco-9"]["json"])
    assert sorted(stored["coco-40"]) == ["jpg", "json", "txt"]  # single caption: as before
    images_in_shard = [files["jpg"] for files in stored.values()]
    assert len(images_in_shard) == 3  # 10 captions, 3 image copies
    assert sum(map(len, images_in_shard)) == sum(len(read_ref(r["image"])) for r in validated)

    # loader: one caption per visit, from a generator seeded by (seed, corpus, key, epoch)
    def visits(seed: int, epochs: int, skip: int = 0) -> list[tuple[str, bytes]]:
        idx = load_index(root, "pairs")
        ds = ShardDataset(location=shard_location(root, "pairs", idx), corpus="pairs", index=idx, collator=None,
                          batch_size=1, rank=0, world_size=1, num_workers=0, seed=seed)
        stream = ds.samples(SlotPlan(idx["shards"], corpus="pairs", seed=seed, slot=0, slots=1), skip)
        return [(s.key, s.files["txt"]) for s in (next(stream) for _ in range(3 * epochs - skip))]

    seen = visits(seed=7, epochs=10)
    by_key: dict[str, list[bytes]] = {}
    for key, text in seen:
        by_key.setdefault(key, []).append(text)
    nine = [t.decode() for t in by_key["coco-9"]]
    assert sorted(nine[:5]) == sorted(good[9]) and sorted(nine[5:]) == sorted(good[9])  # each once per 5 epochs
    assert nine[:5] != good[9] or nine[5:] != good[9]  # a drawn order, not the stored one every round
    assert set(by_key["coco-40"]) == {good[40][0].encode()}
    assert visits(seed=7, epochs=10) == seen  # same seed: the same bytes, visit for visit
    assert visits(seed=7, epochs=10, skip=4) == seen[4:]  # resumed mid-stream: the same continuation
    assert visits(seed=8, epochs=10) != seen
    assert [caption_index(5, seed=7, corpus="pairs", key="coco-9", epoch=e) for e in range(5)] == [
        good[9].index(t) for t in nine[:5]]


def test_csv_manifest_is_streamed_row_by_row_not_read_whole(tmp_path):
    path = tmp_path / "pairs.csv"
    with path.open("w", encoding="utf-8") as f:
        f.write("key,image,caption\n")
        for i in range(60_000):  # ~4 MB
            f.write(f'{i},img/{i}.jpg,"a caption, with a comma, for picture number {i} of the set"\n')
    src = ManifestPairs(path=str(path))
    gc.collect()  # earlier tests' garbage must not be freed (and re-allocated) inside the measurement
    tracemalloc.start()
    try:
        count = 0
        for row, error in sources._manifest_rows(path, src):
            count += error is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 60_000
    # Read whole, the text alone is the file's size (and its rows several times that); streamed, the peak is the
    # reader's buffer and a row: 0.1-0.3 MB here, alone or inside the full suite.
    assert peak < path.stat().st_size / 5, (peak, path.stat().st_size)


def test_csv_rows_keep_the_table_semantics(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes("\ufeffkey,image,caption\n"
                     'a,img/a.jpg,"two lines,\nquoted"\n'
                     "\n"
                     "b,img/b.jpg,x,extra\n"
                     "c,img/c.jpg\n".encode("utf-8") + b"d,img/d.jpg,caf\xe9\n")
    rows = list(sources._manifest_rows(path, ManifestPairs(path=str(path))))
    assert rows[0] == ({"key": "a", "image": "img/a.jpg", "caption": "two lines,\nquoted"}, None)
    assert rows[1] == ({"line": 5, "fields": ["b", "img/b.jpg", "x", "extra"]},
                       "malformed CSV row: 4 fields, expected 3")  # in file order
    assert rows[2] == ({"key": "c", "image": "img/c.jpg", "caption": None}, None)  # a missing cell: no value
    assert rows[3][0]["caption"] == "caf\udce9"  # undecodable byte kept for validation to quarantine
    renamed = list(sources._manifest_rows(path, ManifestPairs(path=str(path), column_names=["k", "i", "c"])))
    assert renamed[0][0] == {"k": "a", "i": "img/a.jpg", "c": "two lines,\nquoted"}
