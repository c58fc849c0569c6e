"""Validation: every bad input of the issue is converted or quarantined with its reason; counts add up;
the accept threshold fails the stage with a readable message."""
from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from flava.config import PipelineConfig
from flava.data import images as imaging
from flava.data.ingest import dump_row, run_prepare
from flava.data.packs import (
    IMAGE_BYTES_FIELD,
    IMAGE_SHA256_FIELD,
    SOURCE_IMAGE_FIELD,
    PackWriter,
    make_ref,
    parse_ref,
)
from flava.data.stream_config import S3Config
from flava.data.synthetic import run_generate
from flava.data.validate import Fetcher, run_validate
from tests.helpers import tracking_in
from tests.unit.test_synthetic import SMALL


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pack_member(ref: str) -> tuple[str, bytes]:
    """(member name, bytes) of the pack member a validated row's ``image`` points to, read by tarfile -- not by
    the reference's own offset arithmetic."""
    parsed = parse_ref(ref)
    assert parsed is not None, f"not a pack reference: {ref}"
    with tarfile.open(parsed.uri) as tar:
        for member in tar.getmembers():
            if member.offset_data == parsed.offset:
                assert member.size == parsed.size
                return member.name, tar.extractfile(member).read()
    raise AssertionError(f"no member of {parsed.uri} starts at {parsed.offset}")


def ref_bytes(ref: str) -> bytes:
    """The bytes a validated row's ``image`` names: a pack member (read by tarfile) or a whole source file."""
    return pack_member(ref)[1] if parse_ref(ref) is not None else Path(ref).read_bytes()


def open_ref(ref: str) -> Image.Image:
    return Image.open(io.BytesIO(ref_bytes(ref)))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 100_000) -> bytes:
    """A few hundred bytes whose header claims side x side pixels (1e10 by default)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def rgb(size=(32, 24), colour=(200, 40, 40)) -> Image.Image:
    return Image.new("RGB", size, colour)


def exif_rotated_jpeg() -> bytes:
    """40x20 pixels stored, EXIF orientation 6 (display rotated 90 degrees clockwise -> 20x40)."""
    img = rgb((40, 20))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # a blue band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def sixteen_bit_png() -> bytes:
    arr = np.full((24, 32), 65535, dtype=np.uint16)
    arr[:, :16] = 32896  # -> 128 after rescaling, not clipped to 255
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    return encode(img)


def palette_png() -> bytes:
    img = rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    return encode(img, transparency=0)


def rgba_png() -> bytes:
    img = Image.new("RGBA", (32, 24), (255, 0, 0, 0))  # fully transparent red -> background (white)
    img.paste((0, 0, 255, 255), (0, 0, 16, 24))  # opaque blue left half
    return encode(img)


GOOD = [
    ("rgb", encode(rgb()), "RGB"),
    ("cmyk", encode(rgb().convert("CMYK"), "JPEG"), "CMYK"),
    ("grey", encode(rgb().convert("L")), "L"),
    ("palette", palette_png(), "P"),
    ("rgba", rgba_png(), "RGBA"),
    ("sixteen", sixteen_bit_png(), "I;16"),
    ("exif", exif_rotated_jpeg(), "RGB"),
]
BAD_IMAGES = [
    ("truncated", encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))[:600],
     "truncated or corrupt image"),
    ("zero", b"", "empty file"),
    ("notimage", b"this is plain text, not an image at all", "not an image"),
    ("bomb", png_bomb(), "decompression bomb"),
    ("bigbomb", encode(Image.new("L", (5000, 5000))), "decompression bomb"),  # 25e6 px > 4096^2, ~25 kB
]


def write_prepared(tmp_path: Path) -> tuple[PipelineConfig, Path]:
    src = tmp_path / "src"
    src.mkdir()
    pairs = []
    for name, data, _ in GOOD + BAD_IMAGES:
        (src / f"{name}.img").write_bytes(data)
        pairs.append({"key": name, "image": str(src / f"{name}.img"), "text": f"a picture called {name}"})
    caption_cases = [("nonutf8", "caf\udce9 au lait"), ("empty", ""), ("blank", "  \t \n "), ("huge", "word " * 20000),
                     ("nocaption", None)]
    for key, text in caption_cases:
        pairs.append({"key": key, "image": str(src / "rgb.img"), "text": text})
    pairs.append({"key": "rgb", "image": str(src / "grey.img"), "text": "a duplicate key"})
    pairs.append({"key": "missing", "image": str(src / "does-not-exist.png"), "text": "an image that is gone"})
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "pairs.jsonl").write_text("".join(dump_row(r) + "\n" for r in pairs))
    images = [{"key": "a", "image": str(src / "rgb.img"), "label": "red"},
              {"key": "b", "image": str(src / "zero.img"), "label": "red"},
              {"key": "c", "image": str(src / "cmyk.img"), "label": ""}]
    (prepared / "images.jsonl").write_text("".join(dump_row(r) + "\n" for r in images))
    text = [{"key": "t1", "text": "a perfectly fine passage of text"}, {"key": "t2", "text": "too short"},
            {"key": "t3", "text": "bad \udcff bytes in here"}, {"key": "t4", "text": "x " * 5000}]
    (prepared / "text.jsonl").write_text("".join(dump_row(r) + "\n" for r in text))
    cfg = PipelineConfig.model_validate({
        "paths": {"prepared": str(prepared), "validated": str(tmp_path / "validated")},
        "data": {"validation": {"min_accept_fraction": 0.0}},
        "tracking": tracking_in(tmp_path),
    })
    return cfg, prepared


def write_photos(tmp_path: Path, n: int = 24, side: int = 64) -> tuple[PipelineConfig, dict[str, bytes]]:
    """A prepared pairs corpus of ``n`` noise photos kept as they are (RGB PNGs and JPEGs) and two that need a
    conversion (a greyscale PNG, an EXIF-rotated JPEG); no images or text rows. Returns the config (shards of the
    pairs under ``tmp_path/shards``) and the source bytes by key."""
    src, prepared = tmp_path / "raw", tmp_path / "prepared"
    src.mkdir()
    prepared.mkdir()
    rng = np.random.default_rng(0)
    sources = {}
    for i in range(n):
        fmt, suffix = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
        noise = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        sources[(f"photo{i:03d}", suffix)] = encode(noise, fmt)
    sources[("grey", "png")] = encode(rgb().convert("L"))
    sources[("exif", "jpg")] = exif_rotated_jpeg()
    rows = []
    for (key, suffix), data in sources.items():
        (src / f"{key}.{suffix}").write_bytes(data)
        rows.append({"key": key, "image": str(src / f"{key}.{suffix}"), "text": f"a photo called {key}"})
    (prepared / "pairs.jsonl").write_text("".join(dump_row(r) + "\n" for r in rows))
    for corpus in ("images", "text"):
        (prepared / f"{corpus}.jsonl").write_text("")
    cfg = PipelineConfig.model_validate({
        "paths": {"raw": str(src), "prepared": str(prepared), "validated": str(tmp_path / "validated"),
                  "shards": str(tmp_path / "shards")},
        "data": {"validation": {"min_accept_fraction": 0.0}, "shards": {"samples_per_shard": 8, "corpora": ["pairs"]}},
        "tracking": tracking_in(tmp_path),
    })
    return cfg, {key: data for (key, _), data in sources.items()}


def test_images_kept_as_they_are_are_not_copied(tmp_path):
    """Passthrough photos stay where they are (the row names the source, its SHA-256 and size); only the converted
    images are written, into the partition's pack: the validated image directory holds no bytes of the others."""
    cfg, sources = write_photos(tmp_path)
    assert run_validate(cfg)["pairs"] == {"in": 26, "accepted": 26, "rejected": 0, "reject_rate": 0.0}
    out = tmp_path / "validated"
    rows = {r["key"]: r for r in read_jsonl(out / "pairs.jsonl")}
    for key, row in rows.items():
        assert row[SOURCE_IMAGE_FIELD].startswith(str(tmp_path / "raw" / key))
        if key in ("grey", "exif"):  # converted: a member of the pack
            assert parse_ref(row["image"]).uri == str(out / "images" / "pairs" / "00000.tar")
        else:  # kept: the source reference itself, with what validation read there
            assert row["image"] == row[SOURCE_IMAGE_FIELD]
            assert row[IMAGE_SHA256_FIELD] == hashlib.sha256(sources[key]).hexdigest()
            assert row[IMAGE_BYTES_FIELD] == len(sources[key])
    with tarfile.open(out / "images" / "pairs" / "00000.tar") as tar:
        assert sorted(m.name.split("-")[0] for m in tar.getmembers()) == ["exif", "grey"]
    image_bytes = sum(p.stat().st_size for p in (out / "images").rglob("*") if p.is_file())
    source_bytes = sum(len(d) for d in sources.values())
    assert image_bytes < 0.1 * source_bytes, (image_bytes, source_bytes)  # two small images and tar headers
    assert sorted(p.name for p in (out / "images").rglob("*") if p.is_file()) == ["00000.tar"]  # no file per image

    # with nothing to convert, a partition writes no pack
    for key in ("grey", "exif"):
        (tmp_path / "prepared" / "pairs.jsonl").write_text("".join(
            line + "\n" for line in (tmp_path / "prepared" / "pairs.jsonl").read_text().splitlines()
            if json.loads(line)["key"] != key))
    run_validate(cfg)
    assert len(read_jsonl(out / "pairs.jsonl")) == 24
    assert [p for p in (out / "images").rglob("*") if p.is_file()] == []


def test_fetcher_stats_a_local_reference_once(tmp_path, monkeypatch):
    with PackWriter(tmp_path / "p.tar") as pack:
        ranged = pack.add("a.png", encode(rgb()))
    (tmp_path / "whole.png").write_bytes(encode(rgb()))
    calls = []
    real_stat = Path.stat

    def counting_stat(self, *args, **kwargs):
        calls.append(str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", counting_stat)
    fetch = Fetcher(S3Config(), max_bytes=10**6)
    for ref in (ranged, str(tmp_path / "whole.png")):
        calls.clear()
        data, error = fetch(ref)
        assert error is None and data == encode(rgb())
        assert len(calls) == 1, (ref, calls)


def test_bad_inputs_are_converted_or_quarantined_with_reasons(tmp_path):
    cfg, _ = write_prepared(tmp_path)
    result = run_validate(cfg)
    out = tmp_path / "validated"
    accepted = {r["key"]: r for r in read_jsonl(out / "pairs.jsonl")}
    rejects = {r["key"] if r["text"] != "a duplicate key" else "rgb#2": r for r in read_jsonl(out / "pairs.rejects.jsonl")}

    # converted, not rejected: every accepted image is 8-bit RGB; the converted ones in the pack under
    # paths.validated, the RGB PNG kept as it is, where it was (not copied)
    assert set(accepted) == {name for name, _, _ in GOOD}
    for row in accepted.values():
        source = str(tmp_path / "src" / f"{row['key']}.img")
        if row["key"] == "rgb":
            assert row["image"] == source
        else:
            assert parse_ref(row["image"]).uri == str(out / "images" / "pairs" / "00000.tar")
        assert open_ref(row["image"]).mode == "RGB"
        assert row[SOURCE_IMAGE_FIELD] == source  # prepare's reference, kept
        data = ref_bytes(row["image"])
        assert row[IMAGE_SHA256_FIELD] == hashlib.sha256(data).hexdigest() and row[IMAGE_BYTES_FIELD] == len(data)
    rgba = np.asarray(open_ref(accepted["rgba"]["image"]))
    assert tuple(rgba[0, 0]) == (0, 0, 255) and tuple(rgba[0, -1]) == (255, 255, 255)  # alpha composited on white
    sixteen = np.asarray(open_ref(accepted["sixteen"]["image"]))
    assert sixteen[0, 0, 0] == 128 and sixteen[0, -1, 0] == 255  # rescaled, not clipped
    exif = open_ref(accepted["exif"]["image"])
    assert exif.size == (20, 40)  # EXIF rotation applied
    assert np.asarray(exif)[0, 10, 2] > 200  # the blue band is now along the top

    expected = {
        "truncated": "truncated or corrupt image", "zero": "empty file", "notimage": "not an image",
        "bomb": "decompression bomb", "bigbomb": "decompression bomb", "nonutf8": "invalid caption",
        "empty": "empty caption", "blank": "empty caption", "huge": "caption too long",
        "nocaption": "empty caption", "rgb#2": "duplicate key", "missing": "missing file",
    }
    assert set(rejects) == set(expected)
    for key, category in expected.items():
        assert rejects[key]["reason"].startswith(category + ":"), (key, rejects[key]["reason"])
        assert rejects[key]["failed_expectations"]
    assert rejects["blank"]["reason"] == "empty caption: whitespace only"
    assert rejects["empty"]["reason"] == "empty caption: no text"
    assert "does-not-exist.png" in rejects["missing"]["reason"]
    # one pack, holding exactly the accepted rows' converted images (decoded-then-rejected rows leave nothing
    # behind, nor does the image kept as it is)
    assert [p.name for p in (out / "images" / "pairs").iterdir()] == ["00000.tar"]
    with tarfile.open(out / "images" / "pairs" / "00000.tar") as tar:
        members = tar.getnames()
    assert len(set(members)) == len(members)
    assert set(members) == {pack_member(r["image"])[0] for r in accepted.values() if r["key"] != "rgb"}

    metrics = json.loads((out / "metrics.json").read_text())
    for corpus in ("pairs", "images", "text"):
        m = metrics[corpus]
        assert m["in"] == m["accepted"] + m["rejected"] and sum(m["reasons"].values()) == m["rejected"]
        assert result[corpus]["in"] == m["in"]
    assert metrics["pairs"]["reasons"]["decompression bomb"] == 2
    assert metrics["pairs"]["converted"] == {"CMYK->RGB": 1, "I;16->RGB": 1, "L->RGB": 1, "P->RGB": 1,
                                             "RGBA->RGB": 1}
    assert metrics["pairs"]["exif_rotated"] == 1
    assert metrics["images"]["reasons"] == {"empty file": 1, "missing label": 1}
    assert metrics["text"]["accepted"] == 1
    assert metrics["text"]["reasons"] == {"invalid text": 1, "text too long": 1, "text word count out of bounds": 1}
    report = (out / "report.md").read_text()
    assert "| pairs | 19 | 7 | 12 |" in report and "decompression bomb: 2" in report
    assert json.loads((out / "ge" / "pairs.json").read_text())["success"] is False


def test_truncate_option_keeps_huge_captions(tmp_path):
    cfg, _ = write_prepared(tmp_path)
    cfg.data.validation.truncate_captions = True
    run_validate(cfg)
    huge = next(r for r in read_jsonl(tmp_path / "validated" / "pairs.jsonl") if r["key"] == "huge")
    assert len(huge["text"].split()) == cfg.data.validation.max_caption_words
    assert json.loads((tmp_path / "validated" / "metrics.json").read_text())["pairs"]["truncated"] == 1


def test_accept_threshold_fails_readably_after_writing_outputs(tmp_path):
    cfg, _ = write_prepared(tmp_path)
    cfg.data.validation.min_accept_fraction = 0.9
    with pytest.raises(ValueError, match=r"below data.validation.min_accept_fraction=0.9 for pairs: 7/19 accepted"):
        run_validate(cfg)
    assert (tmp_path / "validated" / "report.md").read_text().count("BELOW THRESHOLD") == 3


def test_synthetic_world_passes_end_to_end(tmp_path):
    cfg = PipelineConfig.model_validate({
        "paths": {k: str(tmp_path / k) for k in ("raw", "prepared", "validated")},
        "data": {"generate": SMALL},
        "tracking": tracking_in(tmp_path),
    })
    run_generate(cfg)
    run_prepare(cfg)
    result = run_validate(cfg)
    assert all(result[c]["rejected"] == 0 and result[c]["accepted"] > 0 for c in ("pairs", "images", "text"))
    rows = read_jsonl(tmp_path / "validated" / "pairs.jsonl")
    assert all(open_ref(r["image"]).size == (32, 32) for r in rows)
    # a re-run writes byte-identical outputs (no GE run ids or timestamps)
    before = {p: p.read_bytes() for p in sorted((tmp_path / "validated").rglob("*")) if p.is_file()}
    run_validate(cfg)
    assert before == {p: p.read_bytes() for p in sorted((tmp_path / "validated").rglob("*")) if p.is_file()}


def test_inspect_image_limits_and_to_rgb_modes():
    limits = {"max_bytes": 10_000_000, "max_pixels": 10_000, "min_side": 4, "max_side": 4096}
    ok = imaging.inspect_image(encode(rgb((50, 50))), **limits)
    assert ok.error is None and ok.image is not None
    over = imaging.inspect_image(encode(rgb((200, 200))), **limits)  # 40,000 px > 10,000
    assert over.error.startswith("decompression bomb") and over.image is None
    small = imaging.inspect_image(encode(rgb((2, 50))), **limits)
    assert small.error is None and small.image is None and small.width == 2  # left to the size expectation
    for mode in ("1", "L", "LA", "P", "RGBA", "CMYK", "YCbCr", "I", "F"):
        converted, turned = imaging.to_rgb(rgb().convert(mode), (255, 255, 255))
        assert converted.mode == "RGB" and converted.size == (32, 24) and not turned


def test_cli_runs_the_three_stages_and_reports_threshold_failures(tmp_path, capsys):
    from flava.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\n" + yaml.safe_dump({"tracking": tracking_in(tmp_path)}))
    paths = [f"--set=paths.{k}={tmp_path / k}" for k in ("raw", "prepared", "validated")]
    sizes = [f"--set=data.generate.{k}={json.dumps(v)}" for k, v in SMALL.items()]
    for stage in ("generate", "prepare", "validate"):
        assert main(["data", stage, "--params", str(params), *paths, *sizes]) == 0
    assert '"accepted": 24' in capsys.readouterr().out  # each stage prints its metrics dict as JSON
    assert json.loads((tmp_path / "validated" / "metrics.json").read_text())["pairs"]["accepted"] == 24
    # one bad row in three -> below a 0.9 threshold: exit status 2 and a message naming the corpus
    rows = read_jsonl(tmp_path / "prepared" / "pairs.jsonl")[:3]
    rows[0]["text"] = ""
    (tmp_path / "prepared" / "pairs.jsonl").write_text("".join(dump_row(r) + "\n" for r in rows))
    assert main(["data", "validate", "--params", str(params), *paths]) == 2
    assert "pairs: 2/3 accepted" in capsys.readouterr().err


def test_fetcher_reads_pack_ranges_and_checks_their_size_before_reading(tmp_path):
    with PackWriter(tmp_path / "p.tar") as pack:
        small, big = pack.add("small.png", b"\x89PNG small"), pack.add("big.png", b"\x89PNG " + b"x" * 100)
    fetch = Fetcher(S3Config(), max_bytes=50)
    assert fetch(small) == (b"\x89PNG small", None)
    assert fetch(big) == (None, "file too large: 105 bytes > 50")
    missing, error = fetch(make_ref(str(tmp_path / "p.tar"), 10**6, 10))  # past the end of the pack
    assert missing is None and error.startswith("missing file:") and "read 0 of 10 bytes" in error
    assert fetch(make_ref(str(tmp_path / "gone.tar"), 0, 10))[1] == f"missing file: {tmp_path / 'gone.tar'}"
