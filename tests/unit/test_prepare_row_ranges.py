"""Row-range partitions of CSV/TSV/JSONL manifests in prepare: cut at real record boundaries (quoted newlines
included), the bytes of one partition on any engine, resumable, and planned with offsets only."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from flava.data import ingest, sources
from flava.data.engine import Engine, EngineConfig
from flava.data.prep_config import IngestConfig, ManifestPairs
from tests.helpers import spy_partitions
from tests.unit.test_prepare_partitions import _snapshot

ROWS = 10  # per manifest: with partition_rows 4 each is cut into 3 ranges


def _raw(tmp_path: Path) -> Path:
    """A CSV with a header, a byte-order mark, quoted fields holding newlines (\\n, \\r\\n, a bare \\r), CRLF lines,
    blank lines and a malformed row; a header-less TSV (CC3M) with bare quotes; a JSONL manifest with blank and
    broken lines. Each has rejects, so line numbers and reasons reach the outputs."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = ['"first\nline, quoted",imgs/0.jpg']
    rows += [f'"caption {i}\r\nover two lines",imgs/{i}.jpg' if i % 3 == 0 else f"caption {i},imgs/{i}.jpg"
             for i in range(1, ROWS - 2)]
    rows += ['"a bare\rreturn",http://example.com/x.jpg', "too,many,fields"]
    (raw / "quoted.csv").write_bytes(b"\xef\xbb\xbfcaption,image\r\n" + "\n\n".join(rows).encode() + b"\n\n")
    tsv = [f'a "quoted {i}" caption\timgs/{i}.jpg'.encode() for i in range(ROWS - 1)] + [b"no image, caf\xe9"]
    (raw / "cc3m.tsv").write_bytes(b"\n".join(tsv) + b"\n")
    jsonl = [json.dumps({"key": f"j{i}", "image": f"imgs/{i}.jpg", "caption": f"row {i}"}) for i in range(ROWS - 1)]
    (raw / "docs.jsonl").write_text("\n\n".join(jsonl[:5]) + "\n{broken\n" + "\n".join(jsonl[5:]) + "\n\n")
    return raw


def _ingest() -> IngestConfig:
    return IngestConfig.model_validate({
        "pairs": [{"path": "quoted.csv", "key_column": None},
                  {"path": "cc3m.tsv", "header": False, "column_names": ["caption", "image"], "key_column": None},
                  {"path": "docs.jsonl"}],
        "images": [], "text": [], "eval_dir": None})


def _outputs(out: Path) -> dict[str, bytes]:
    """Everything but the per-partition bookkeeping, which differs with the partitioning."""
    return {k: v for k, v in _snapshot(out).items() if not k.startswith(ingest.PARTITIONS_DIR)}


def _units(out: Path) -> list[str]:
    index = json.loads((out / ingest.PARTITIONS_DIR / "pairs" / "index.json").read_text())
    return [Path(p["unit"]).name for p in index["partitions"]]


@pytest.mark.parametrize("rows", [1, 4])
def test_row_ranges_give_the_bytes_of_one_partition(tmp_path, rows):
    raw = _raw(tmp_path)
    whole, ranges = tmp_path / "whole", tmp_path / "ranges"
    ingest.prepare(_ingest(), raw, whole)
    assert _units(whole) == ["quoted.csv", "cc3m.tsv", "docs.jsonl"]
    result = ingest.prepare(_ingest(), raw, ranges, EngineConfig(partition_rows=rows))
    per_file = -(-ROWS // rows)
    assert _units(ranges) == ["quoted.csv"] * per_file + ["cc3m.tsv"] * per_file + ["docs.jsonl"] * per_file
    assert _outputs(ranges) == _outputs(whole)  # manifest, rejects, metrics (counts, reasons, first reasons)

    assert result["pairs"] == {"in": 3 * ROWS, "accepted": 3 * ROWS - 4, "rejected": 4}
    pairs = [json.loads(line) for line in (ranges / "pairs.jsonl").read_text().splitlines()]
    assert pairs[0] == {"key": "quoted-00000000", "image": str(raw / "imgs/0.jpg"), "text": "first\nline, quoted",
                        "source": "quoted"}
    assert pairs[3]["text"] == "caption 3\r\nover two lines"
    assert [p["key"] for p in pairs if p["source"] == "cc3m"] == [f"cc3m-{i:08d}" for i in range(ROWS - 1)]
    rejects = [json.loads(line) for line in (ranges / "pairs.rejects.jsonl").read_text().splitlines()]
    # line numbers of the file, whichever range a row fell in
    assert {"row": {"line": 24, "fields": ["too", "many", "fields"]}, "source": "quoted",
            "reason": "malformed CSV row: 3 fields, expected 2"} in rejects
    assert [r["row"] for r in rejects if r["source"] == "docs"] == [{"line": 10, "content": "{broken\n"}]


# Plans the manifest in argv[1] under tracemalloc in a fresh interpreter: in the test process, threads left by
# earlier tests (MLflow, Prefect, Dask) allocate while the pass runs, and tracemalloc counts every thread's.
_PLAN_PEAK = """
import gc, json, sys, tracemalloc
from pathlib import Path
from flava.data import sources
from flava.data.prep_config import ManifestPairs
path = Path(sys.argv[1])
src = ManifestPairs(path=str(path))
gc.collect()
tracemalloc.start()
units = sources.manifest_ranges(path, src, "csv", 1_000)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"peak": peak, "units": [[u.first_row, u.rows, u.offset] for u in units]}))
"""


def test_ranges_start_at_records_and_hold_only_offsets(tmp_path):
    """The plan's ranges start where a record starts (a quoted newline is no boundary), and the plan is the ranges'
    numbers only: planning a manifest peaks far below its size."""
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write("caption,image\n")
        for i in range(40_000):  # ~3 MB
            f.write(f'"caption {i},\nwith a quoted newline",imgs/{i}.jpg\n')
    done = subprocess.run([sys.executable, "-c", _PLAN_PEAK, str(path)], capture_output=True, text=True, check=True)
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    peak = plan["peak"]
    src = ManifestPairs(path=str(path))
    units = sources.manifest_ranges(path, src, "csv", 1_000)
    assert plan["units"] == [[u.first_row, u.rows, u.offset] for u in units]  # the measured pass made this plan
    assert len(units) == 40 and [u.rows for u in units] == [1_000] * 40
    assert [u.first_row for u in units] == list(range(0, 40_000, 1_000))
    assert peak < path.stat().st_size / 20, (peak, path.stat().st_size)
    data = path.read_bytes()
    for unit in units:
        assert data.startswith(f'"caption {unit.first_row},\n'.encode(), unit.offset)
        assert unit.first_line == 2 + 2 * unit.first_row
    # a file of one range or less is one whole-file unit, as before ranges existed
    assert sources.manifest_ranges(path, src, "csv", 40_000) == [sources.SourceUnit(str(path))]


def test_binary_lines_parse_as_text_mode_does(tmp_path):
    """Records are parsed from a binary file's lines (so their offsets are known): the rows are those the csv
    module reads from the file opened in text mode."""
    raw = _raw(tmp_path)
    for name, src in [("quoted.csv", _ingest().pairs[0]), ("cc3m.tsv", _ingest().pairs[1])]:
        sep = "\t" if name.endswith(".tsv") else ","
        with (raw / name).open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f, delimiter=sep, quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL)
            expected = [(fields, reader.line_num) for fields in reader if fields]
        expected = expected[1:] if src.header else expected
        got = [row for row, _ in sources._manifest_rows(raw / name, src)]
        assert len(got) == len(expected) == ROWS
        assert [r["fields"] if "fields" in r else [v for v in r.values() if v is not None] for r in got] \
            == [fields for fields, _ in expected]
        assert [r["line"] for r in got if "line" in r] == [n for fields, n in expected if len(fields) > 2]
    mac = tmp_path / "mac.csv"  # a bare \r ends the header: the rest of that binary line is the first row
    mac.write_bytes(b"caption,image\rx,imgs/x.jpg\r\ny,imgs/y.jpg")
    assert [row for row, _ in sources._manifest_rows(mac, ManifestPairs(path=str(mac)))] == [
        {"caption": "x", "image": "imgs/x.jpg"}, {"caption": "y", "image": "imgs/y.jpg"}]
    assert [(u.first_row, u.offset, u.first_line) for u in sources.manifest_ranges(mac, ManifestPairs(
        path=str(mac)), "csv", 1)] == [(0, 14, 2), (1, 28, 3)]


@pytest.mark.slow
def test_row_ranges_on_a_local_dask_cluster_give_the_serial_bytes(tmp_path):
    raw, out = _raw(tmp_path), tmp_path / "prepared"
    ingest.prepare(_ingest(), raw, out, EngineConfig(partition_rows=4))
    serial = _snapshot(out)
    shutil.rmtree(out)
    ingest.prepare(_ingest(), raw, out, EngineConfig(kind="local", workers=2, partition_rows=4))
    assert _snapshot(out) == serial


def test_killed_prepare_resumes_at_the_first_unfinished_row_range(tmp_path, monkeypatch):
    raw, out = _raw(tmp_path), tmp_path / "prepared"
    engine = EngineConfig(partition_rows=4)
    ingest.prepare(_ingest(), raw, out, engine)
    uninterrupted = _snapshot(out)
    shutil.rmtree(out)

    real_summary_write = ingest.write_json_atomic
    killed_at = out / ingest.PARTITIONS_DIR / "pairs" / "00004.json"  # the TSV's second range

    def killed(path, doc):
        if path == killed_at:
            raise KeyboardInterrupt("killed")
        real_summary_write(path, doc)

    monkeypatch.setattr(ingest, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest.prepare(_ingest(), raw, out, engine)
    monkeypatch.setattr(ingest, "write_json_atomic", real_summary_write)
    done = spy_partitions(monkeypatch, ingest, "prepare_partition")
    ingest.prepare(_ingest(), raw, out, engine)
    assert done == [("pairs", i) for i in range(4, 9)]  # the ranges before the kill were kept
    assert _snapshot(out) == uninterrupted

    done.clear()  # one CSV byte changed (same size): the corpus again, with the new byte
    csv_file = raw / "quoted.csv"
    csv_file.write_bytes(csv_file.read_bytes().replace(b"caption 5", b"caption X"))
    ingest.prepare(_ingest(), raw, out, engine)
    assert done == [("pairs", i) for i in range(9)]
    assert "caption X" in (out / "pairs.jsonl").read_text()
    done.clear()  # another partition size: other ranges, every partition again
    ingest.prepare(_ingest(), raw, out, EngineConfig(partition_rows=5))
    assert done == [("pairs", i) for i in range(6)]


def test_inputs_are_hashed_on_the_engine_once_per_file(tmp_path, monkeypatch):
    """The planning process does not read every input byte itself: the files' SHA-256 run as engine tasks, one per
    distinct file (the row ranges of one manifest share it)."""
    mapped: list[tuple[str, list]] = []

    class Recording(Engine):
        def map(self, fn, items):
            mapped.append((fn.__name__, list(items)))
            return super().map(fn, items)

    @contextmanager
    def recording(cfg):
        yield Recording()

    monkeypatch.setattr(ingest, "open_engine", recording)
    raw = _raw(tmp_path)
    ingest.prepare(_ingest(), raw, tmp_path / "prepared", EngineConfig(partition_rows=4))
    files = [str(raw / name) for name in ("quoted.csv", "cc3m.tsv", "docs.jsonl")]
    assert ("input_identity", files) in mapped
    assert mapped.index(("input_identity", files)) < [name for name, _ in mapped].index("prepare_partition")
    assert len(next(items for name, items in mapped if name == "prepare_partition")) == 9
