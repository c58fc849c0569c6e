"""Shards: counts and sha256 in the index match the files, byte-identical re-runs, webdataset-readable, bad input."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from flava.data.packs import IMAGE_BYTES_FIELD, IMAGE_SHA256_FIELD, ChangedImageError, PackWriter, parse_ref
from flava.data.shards import read_tar, run_shard
from flava.data.validate import run_validate
from tests.unit.shard_fixtures import config, make_validated
from tests.unit.test_validate import pack_member, write_photos


def test_index_counts_and_checksums(tmp_path):
    make_validated(tmp_path, n_pairs=12, n_images=7, n_text=10)
    metrics = run_shard(config(tmp_path))
    assert {c: m["num_samples"] for c, m in metrics["corpora"].items()} == {"pairs": 12, "images": 7, "text": 10}
    for corpus, n, exts in [("pairs", 12, {"png", "txt", "json"}), ("images", 7, {"png", "json"}),
                            ("text", 10, {"txt", "json"})]:
        d = tmp_path / "shards" / corpus
        index = json.loads((d / "index.json").read_text())
        assert index["num_samples"] == n and index["num_shards"] == -(-n // 5)
        assert [s["samples"] for s in index["shards"]] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
        keys = []
        for entry in index["shards"]:
            data = (d / entry["name"]).read_bytes()
            assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
            samples = read_tar(data)
            assert len(samples) == entry["samples"]
            assert all(set(s.files) == exts for s in samples)
            keys += [s.key for s in samples]
        assert len(set(keys)) == n  # every row exactly once
    assert json.loads((tmp_path / "shards" / "metrics.json").read_text())["corpora"]["pairs"]["num_shards"] == 3


def test_sample_contents_roundtrip(tmp_path):
    validated = make_validated(tmp_path, n_pairs=6)
    run_shard(config(tmp_path))
    rows = {json.loads(l)["key"]: json.loads(l) for l in (validated / "pairs.jsonl").read_text().splitlines()}
    data = (tmp_path / "shards" / "pairs" / "shard-000000.tar").read_bytes()
    for s in read_tar(data):
        meta = json.loads(s.files["json"])
        row = rows[meta["key"]]
        assert s.files["txt"].decode() == row["text"]
        with open(row["image"], "rb") as fh:
            assert s.files["png"] == fh.read()  # "source" format keeps the PNG bytes


def test_samples_read_images_from_packs_and_name_their_source(tmp_path):
    """Validated rows pointing into a pack (one ranged read each; a relative pack path resolved from the manifest's
    directory): the shard holds the member's bytes, and its json names the source reference, not the pack."""
    validated = make_validated(tmp_path, n_pairs=6)
    rows = [json.loads(line) for line in (validated / "pairs.jsonl").read_text().splitlines()]
    with PackWriter(validated / "images" / "pairs" / "00000.tar") as pack:
        for row in rows:
            source = row["image"]
            ref = pack.add(f"{row['key']}.png", Path(source).read_bytes())
            row.update(image=ref.replace(f"{validated}/", ""), source_image=source)  # relative to the manifest
    (validated / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_shard(config(tmp_path))
    by_key = {r["key"]: r for r in rows}
    samples = [s for tar in sorted((tmp_path / "shards" / "pairs").glob("shard-*.tar")) for s in read_tar(tar.read_bytes())]
    assert len(samples) == 6
    for s in samples:
        meta = json.loads(s.files["json"])
        row = by_key[meta["key"]]
        assert s.files["png"] == Path(row["source_image"]).read_bytes()
        assert meta["image"] == row["source_image"] and "source_image" not in meta


def _shard_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "pairs").glob("shard-*.tar"))} | {
        "index.json": (root / "pairs" / "index.json").read_bytes()}


def test_images_read_from_their_sources_give_the_shards_of_copies(tmp_path):
    """Validated photos kept as they are are sharded from their sources: each shard member holds the source's
    bytes, and the shards are byte for byte those of the same rows with every image copied into a pack (the layout
    before images kept as they were stayed where they were)."""
    cfg, sources = write_photos(tmp_path)
    run_validate(cfg)
    run_shard(cfg)
    validated = tmp_path / "validated"
    rows = [json.loads(line) for line in (validated / "pairs.jsonl").read_text().splitlines()]
    samples = {s.key: s for tar in sorted((tmp_path / "shards" / "pairs").glob("shard-*.tar"))
               for s in read_tar(tar.read_bytes())}
    assert len(samples) == len(rows) == 26
    for row in rows:
        files = samples[row["key"]].files
        [ext] = set(files) - {"txt", "json"}
        if parse_ref(row["image"]) is None:  # kept as it is: the source's bytes, untouched
            assert files[ext] == sources[row["key"]]
        else:
            assert files[ext] == pack_member(row["image"])[1]
        meta = json.loads(files["json"])
        assert meta["image"] == row["source_image"] and not {IMAGE_SHA256_FIELD, IMAGE_BYTES_FIELD} & set(meta)

    # every image copied into a pack, as validation wrote them before: the same shard bytes
    copied = []
    with PackWriter(validated / "images" / "pairs" / "copied.tar") as pack:
        for row in rows:
            data = samples[row["key"]].files[next(iter(set(samples[row["key"]].files) - {"txt", "json"}))]
            copied.append({k: v for k, v in row.items() if k not in (IMAGE_SHA256_FIELD, IMAGE_BYTES_FIELD)}
                          | {"image": pack.add(row["key"], data)})
    (validated / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in copied))
    cfg.paths.shards = cfg.paths.shard_index = str(tmp_path / "shards-copied")
    run_shard(cfg)
    assert _shard_files(tmp_path / "shards-copied") == _shard_files(tmp_path / "shards")


def test_source_changed_after_validation_stops_the_shard_stage(tmp_path):
    cfg, sources = write_photos(tmp_path, n=4)
    run_validate(cfg)
    row = next(json.loads(line) for line in (tmp_path / "validated" / "pairs.jsonl").read_text().splitlines()
               if json.loads(line)["key"] == "photo001")
    source = Path(row["image"])
    assert source.read_bytes() == sources["photo001"]
    Image.new("RGB", (64, 64), (1, 2, 3)).save(source)  # another valid image under the same name
    new = hashlib.sha256(source.read_bytes()).hexdigest()
    with pytest.raises(ChangedImageError) as err:
        run_shard(cfg)
    message = str(err.value)
    assert "'photo001'" in message and str(source) in message
    assert row[IMAGE_SHA256_FIELD] in message and new in message
    assert not list((tmp_path / "shards" / "pairs").glob("shard-*.tar"))  # nothing sharded from changed bytes


def test_deterministic_bytes_and_seeded_order(tmp_path):
    make_validated(tmp_path, n_pairs=11)
    run_shard(config(tmp_path, out=str(tmp_path / "a")))
    run_shard(config(tmp_path, out=str(tmp_path / "b")))
    a = json.loads((tmp_path / "a" / "pairs" / "index.json").read_text())
    b = json.loads((tmp_path / "b" / "pairs" / "index.json").read_text())
    assert a == b
    cfg = config(tmp_path, out=str(tmp_path / "c")).model_copy(update={"seed": 1})
    run_shard(cfg)
    c = json.loads((tmp_path / "c" / "pairs" / "index.json").read_text())
    assert [s["sha256"] for s in c["shards"]] != [s["sha256"] for s in a["shards"]]  # another shuffle


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    make_validated(tmp_path, n_pairs=7)
    run_shard(config(tmp_path))
    urls = sorted(str(p) for p in (tmp_path / "shards" / "pairs").glob("shard-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 7 and all({"__key__", "png", "txt", "json"} <= set(s) for s in samples)


def test_reencode_jpg_and_downscale(tmp_path):
    make_validated(tmp_path, n_pairs=3, size=40)
    run_shard(config(tmp_path, shards={"samples_per_shard": 5, "image_format": "jpg", "max_image_side": 16}))
    s = read_tar((tmp_path / "shards" / "pairs" / "shard-000000.tar").read_bytes())[0]
    assert "jpg" in s.files and "png" not in s.files
    assert Image.open(io.BytesIO(s.files["jpg"])).size == (16, 16)


def test_bad_inputs(tmp_path):
    validated = make_validated(tmp_path, n_pairs=3)
    (validated / "text.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="text.jsonl"):
        run_shard(config(tmp_path))
    make_validated(tmp_path, n_pairs=3)
    (validated / "pairs.jsonl").write_text(json.dumps({"key": "x", "image": str(tmp_path / "nope.png"),
                                                      "text": "a cat"}) + "\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        run_shard(config(tmp_path))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG truncated")
    (validated / "pairs.jsonl").write_text(json.dumps({"key": "x", "image": str(tmp_path / "bad.png"),
                                                      "text": "a cat"}) + "\n")
    with pytest.raises(ValueError, match="cannot decode image"):
        run_shard(config(tmp_path))
    (validated / "pairs.jsonl").write_text("".join(json.dumps({"key": k, "image": str(tmp_path / "images" /
                                           "img-0000.png"), "text": "t"}) + "\n" for k in ("a.b", "a/b")))
    with pytest.raises(ValueError, match="collide"):
        run_shard(config(tmp_path))


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_read_tar_matches_tarfile(tmp_path, fmt):
    import tarfile

    long_dir = "d" * 120  # forces a prefix (ustar), a GNU long-name record or a pax path record
    members = [(f"{long_dir}/k1.txt", b"hello"), (f"{long_dir}/k1.json", b"{}"), ("k2.png", bytes(range(256)) * 5),
               ("k2.txt", b"")]
    fmt_id = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[fmt]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt_id) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = read_tar(path.read_bytes())
    assert [(s.key, sorted(s.files)) for s in samples] == [("k1", ["json", "txt"]), ("k2", ["png", "txt"])]
    assert samples[0].files["txt"] == b"hello" and samples[1].files["png"] == bytes(range(256)) * 5
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01  # inside the first header
    with pytest.raises(ValueError, match="checksum"):
        read_tar(bytes(data))
    with pytest.raises(ValueError, match="truncated"):
        read_tar(path.read_bytes()[:1100])
