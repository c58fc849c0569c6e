"""Packs and image references: a pack is a plain tar whose members the references name; one seek+read locally,
one ranged GET on S3 (moto server on loopback); plain paths and URIs still read whole; a killed writer leaves no
pack."""
from __future__ import annotations

import os
import tarfile

import pytest

from flava.data import storage
from flava.data.packs import PackWriter, make_ref, parse_ref, read_ref
from flava.data.sources import ImageStore
from flava.data.stream_config import S3Config
from tests.helpers import moto_s3

IMAGES = {"a.jpg": b"\xff\xd8\xff first image" * 37, "b.png": b"\x89PNG second" * 3, "c.jpg": b"x" * 512}


def _pack(path) -> dict[str, str]:
    with PackWriter(path) as pack:
        return {name: pack.add(name, data) for name, data in IMAGES.items()}


def test_pack_is_a_tar_whose_members_the_refs_name(tmp_path):
    refs = _pack(tmp_path / "p.tar")
    assert os.listdir(tmp_path) == ["p.tar"]  # no temporary left beside it
    with tarfile.open(tmp_path / "p.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == list(IMAGES)
        for m in members:
            assert tar.extractfile(m).read() == IMAGES[m.name]
            assert refs[m.name] == f"{tmp_path / 'p.tar'}#{m.offset_data}+{m.size}"
    for name, ref in refs.items():
        assert read_ref(ref) == IMAGES[name]
        assert parse_ref(ref).size == len(IMAGES[name])


def test_same_bytes_are_stored_once_and_packs_are_reproducible(tmp_path):
    with PackWriter(tmp_path / "p.tar") as pack:
        first = pack.add("a.jpg", b"same")
        assert pack.add("b.jpg", b"same") == first
        assert pack.members == 1
        with pytest.raises(ValueError, match="used twice"):
            pack.add("a.jpg", b"other bytes")
    _pack(tmp_path / "x.tar")
    _pack(tmp_path / "y.tar")
    assert (tmp_path / "x.tar").read_bytes() == (tmp_path / "y.tar").read_bytes()


def test_a_failed_writer_leaves_no_pack(tmp_path):
    with pytest.raises(RuntimeError):
        with PackWriter(tmp_path / "p.tar") as pack:
            pack.add("a.jpg", b"data")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_parse_plain_paths_and_bad_ranges(tmp_path):
    assert parse_ref("/data/img.jpg") is None and parse_ref("s3://b/k.jpg") is None
    parsed = parse_ref("s3://b/shard#1.tar#1536+20")
    assert (parsed.uri, parsed.offset, parsed.size) == ("s3://b/shard#1.tar", 1536, 20)
    with pytest.raises(ValueError, match="already ends like"):
        make_ref("/x/y#1+2", 0, 1)
    plain = tmp_path / "plain.jpg"
    plain.write_bytes(b"whole file")
    assert read_ref(str(plain)) == b"whole file"
    with pytest.raises(ValueError, match="read 4 of 10 bytes"):
        read_ref(make_ref(str(plain), 6, 10))
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        read_ref(make_ref(str(tmp_path / "missing.tar"), 0, 1))


def test_s3_refs_are_one_ranged_get(tmp_path, monkeypatch):
    refs = _pack(tmp_path / "p.tar")
    with moto_s3(monkeypatch, "bkt") as (endpoint, client):
        client.upload_file(str(tmp_path / "p.tar"), "bkt", "packs/p.tar")
        client.put_object(Bucket="bkt", Key="plain.jpg", Body=b"plain object")
        s3 = S3Config(endpoint_url=endpoint)
        ranges: list[str | None] = []
        storage.s3_client(s3).meta.events.register(
            "before-send.s3.GetObject", lambda request, **_: ranges.append(request.headers.get("Range")))
        for name, ref in refs.items():
            parsed = parse_ref(ref)
            s3_ref = make_ref("s3://bkt/packs/p.tar", parsed.offset, parsed.size)
            assert read_ref(s3_ref, s3) == IMAGES[name]
        assert read_ref("s3://bkt/plain.jpg", s3) == b"plain object"
        expected = [f"bytes={parse_ref(r).offset}-{parse_ref(r).offset + parse_ref(r).size - 1}" for r in refs.values()]
        assert [r.decode() if isinstance(r, bytes) else r for r in ranges] == [*expected, None]
        with pytest.raises(FileNotFoundError, match="s3://bkt/nope.tar"):
            read_ref("s3://bkt/nope.tar#0+4", s3)


def test_image_store_is_one_lazy_pack_per_source(tmp_path):
    """prepare's store of embedded bytes: one pack per instance, named by the caller, created at the first image,
    identical images stored once; a source without embedded bytes leaves no pack."""
    with ImageStore(tmp_path / "a.tar") as a, ImageStore(tmp_path / "b.tar") as b, ImageStore(tmp_path / "c.tar"):
        ref1, digest = a.put(IMAGES["a.jpg"])
        assert a.put(IMAGES["a.jpg"]) == (ref1, digest) and a.written == 1
        ref2, _ = b.put(IMAGES["b.png"], "png")
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "b.tar"]
    assert read_ref(ref1) == IMAGES["a.jpg"] and read_ref(ref2) == IMAGES["b.png"]
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert tar.getnames() == [f"{digest}.jpg"]  # suffix from the bytes' signature
