"""Image packs and image references that one ranged read resolves.

A *pack* is an uncompressed tar of image members written sequentially by ``PackWriter``: to a temporary name
beside it, renamed into place on ``close`` (a killed writer leaves no pack, never half of one). Members have fixed
headers (mtime 0, uid/gid 0, mode 0644), so the same images in the same order give the same bytes. A pack
replaces one file per image: a corpus of millions of images is a few thousand packs.

An image *reference* is a string. Three forms are read by ``read_ref``:

- ``<tar>#<offset>+<size>``: ``size`` bytes at byte ``offset`` of the (uncompressed) tar ``<tar>``, a local path
  or an ``s3://`` URI -- a member of a pack, or of any tar such as a webdataset shard read in place. ``offset`` is
  the member's data offset (``TarInfo.offset_data``), not its header's. Locally one seek and one read; on S3 one
  ``GET`` with ``Range: bytes=<offset>-<offset + size - 1>``.
- a local path, read whole;
- an ``s3://`` URI, read whole.

The suffix ``#<digits>+<digits>`` makes a reference a ranged one, so a plain file whose name ends that way cannot
be referenced by path (``make_ref`` refuses to build an ambiguous one).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from flava.data import storage
from flava.data.partitions import temporary
from flava.data.stream_config import S3Config

# Fields of a validated manifest row with an image: the image reference as prepare wrote it (``image`` is that same
# reference for an image kept as it is, or points into the validation pack for a converted one), and the SHA-256
# and size of the bytes ``image`` named when validation read them (``read_verified`` checks them).
SOURCE_IMAGE_FIELD = "source_image"
IMAGE_SHA256_FIELD = "image_sha256"
IMAGE_BYTES_FIELD = "image_bytes"
_REF = re.compile(r"^(?P<uri>.+)#(?P<offset>\d+)\+(?P<size>\d+)$")
_BLOCK = 512  # tar block size: member data is padded to a multiple of it


@dataclass(frozen=True)
class RangeRef:
    """A parsed ranged reference: ``size`` bytes at ``offset`` of ``uri``."""

    uri: str
    offset: int
    size: int


def make_ref(uri: str, offset: int, size: int) -> str:
    if offset < 0 or size < 0:
        raise ValueError(f"a range needs offset >= 0 and size >= 0, got {offset}+{size} in {uri!r}")
    if _REF.match(uri):
        raise ValueError(f"{uri!r} already ends like a ranged reference (#<offset>+<size>)")
    return f"{uri}#{offset}+{size}"


def parse_ref(ref: str) -> RangeRef | None:
    """The range of a ``<tar>#<offset>+<size>`` reference; None for a plain path or URI."""
    match = _REF.match(ref)
    if match is None:
        return None
    return RangeRef(match["uri"], int(match["offset"]), int(match["size"]))


def read_ref(ref: str, s3: S3Config | None = None) -> bytes:
    """The bytes ``ref`` names (see the module docstring). Missing file/object -> FileNotFoundError; a range
    past the end of its tar -> ValueError naming the reference."""
    parsed = parse_ref(ref)
    if parsed is None:
        return storage.read_bytes(ref, s3=s3)
    if storage.is_s3(parsed.uri):
        data = _read_s3_range(parsed, s3 or S3Config())
    else:
        path = Path(parsed.uri)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {parsed.uri} (in image reference {ref})")
        with path.open("rb") as f:
            f.seek(parsed.offset)
            data = f.read(parsed.size)
    if len(data) != parsed.size:
        raise ValueError(f"image reference {ref}: read {len(data)} of {parsed.size} bytes (range past the end of "
                         f"{parsed.uri}?)")
    return data


class ChangedImageError(ValueError):
    """The bytes an image reference names are not those validation accepted (the source changed since)."""


def read_verified(ref: str, s3: S3Config | None, *, sha256: str | None, size: int | None, key: str) -> bytes:
    """``read_ref``, then the bytes checked against the SHA-256 and size validation recorded for row ``key`` (each
    when given): changed bytes raise ``ChangedImageError`` naming the row, the reference and both hashes."""
    data = read_ref(ref, s3)
    actual = hashlib.sha256(data).hexdigest() if sha256 is not None or size is not None else None
    if (sha256 is not None and actual != sha256) or (size is not None and len(data) != size):
        raise ChangedImageError(
            f"row {key!r}: image {ref} changed since validation: validated {size} bytes with sha256 {sha256}, "
            f"now {len(data)} bytes with sha256 {actual}; re-run `flava data validate` (never sharded from bytes "
            "validation did not see)")
    return data


def _read_s3_range(parsed: RangeRef, s3: S3Config) -> bytes:
    if parsed.size == 0:  # an empty Range header is invalid; nothing to read
        return b""
    return storage.read_bytes(parsed.uri, s3=s3, byte_range=(parsed.offset, parsed.size))


def fixed_member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header with fixed fields, so the same members give byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class PackWriter:
    """Writes one pack sequentially. ``add`` returns the member's reference (into the pack's final path);
    identical bytes are stored once (the second ``add`` returns the first one's reference). ``close`` renames the
    pack into place; ``abort`` (or leaving a ``with`` block by an exception) drops it. Two processes may write
    different packs in one directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temporary(self.path)
        self._file: BinaryIO = self._tmp.open("wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._by_digest: dict[str, str] = {}
        self._names: set[str] = set()
        self.members = 0

    def add(self, name: str, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if digest in self._by_digest:
            return self._by_digest[digest]
        if name in self._names:
            raise ValueError(f"pack {self.path}: member name {name!r} used twice for different bytes")
        self._tar.addfile(fixed_member(name, len(data)), io.BytesIO(data))
        # the data ends where the tar now stands, before its padding to a whole block
        offset = self._tar.offset - -(-len(data) // _BLOCK) * _BLOCK
        ref = make_ref(str(self.path), offset, len(data))
        self._by_digest[digest] = ref
        self._names.add(name)
        self.members += 1
        return ref

    def close(self) -> None:
        self._tar.close()
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
