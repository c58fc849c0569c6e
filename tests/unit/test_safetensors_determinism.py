"""Model and checkpoint files are byte-deterministic: the same tensors give the same bytes in any process.

safetensors keeps the header metadata in a Rust HashMap, whose order changes from process to process (and map to
map), so without canonicalisation identical weights get a new DVC hash about half the time."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

from flava.model import FlavaForPretraining
from flava.model.config import preset
from flava.model.io import load_model, save_model, save_tensors
from flava.train.checkpoint import load_weights

ROOT = Path(__file__).resolve().parents[2]
METADATA = {"format": "x", "format_version": "1", "zz": "2", "aliases": "{}", "b": "é"}

# Saves one fixed state with several metadata keys, a tiny model and tied weights; prints the three files' hashes.
CHILD = """
import hashlib, sys, torch
from pathlib import Path
from flava.model import FlavaForPretraining
from flava.model.config import preset
from flava.model.io import save_model, save_tensors
from flava.train.checkpoint import save_weights
out = Path(sys.argv[1])
state = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(3, dtype=torch.int64)}
save_tensors(state, out / "t.safetensors", metadata=%r)
model = FlavaForPretraining(preset("tiny"), seed=3)
save_model(model, out / "model")
tied = dict(model.state_dict())
tied["alias"] = tied["text_encoder.word_embeddings.weight"]
save_weights(tied, out / "w.safetensors")
for name in ("t.safetensors", "model/model.safetensors", "w.safetensors"):
    print(hashlib.sha256((out / name).read_bytes()).hexdigest())
""" % (METADATA,)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_tensors_same_bytes_in_one_process(tmp_path):
    state = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), "i": torch.arange(5)}
    digests = set()
    for i in range(20):
        save_tensors(state, tmp_path / f"{i}.safetensors", metadata=METADATA)
        digests.add(_digest(tmp_path / f"{i}.safetensors"))
    assert len(digests) == 1
    back = load_weights(tmp_path / "0.safetensors")  # still a valid safetensors file, metadata intact
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["i"], state["i"])


def test_model_directory_weights_are_byte_identical_and_load(tmp_path):
    model = FlavaForPretraining(preset("tiny"), seed=1)
    digests = set()
    for i in range(8):
        save_model(model, tmp_path / str(i))
        digests.add(_digest(tmp_path / str(i) / "model.safetensors"))
    assert len(digests) == 1
    loaded = load_model(tmp_path / "0")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_fresh_processes_with_different_hash_seeds_write_the_same_bytes(tmp_path):
    outputs = []
    for seed in ("0", "1", "12345", "random"):
        out = tmp_path / seed
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", CHILD, str(out)], cwd=ROOT, env=env, capture_output=True,
                              text=True, check=True, timeout=300)
        outputs.append(proc.stdout.split())
    assert all(o == outputs[0] for o in outputs), outputs
    # and the header really carries the metadata keys in sorted order
    header = (tmp_path / "0" / "t.safetensors").read_bytes()[8:400].decode("utf-8", "replace")
    assert header.index('"aliases"') < header.index('"b"') < header.index('"format"') < header.index('"zz"')


def test_a_longer_canonical_header_moves_the_data_behind_it(tmp_path, monkeypatch):
    """Should the re-serialised header come out longer than safetensors' own (other JSON escaping), the file is
    rewritten with the data behind the new header, and still loads."""
    import json

    from flava.model import io as model_io

    dumps = json.dumps
    monkeypatch.setattr(model_io.json, "dumps", lambda obj, **kw: dumps(obj, indent=1))  # a longer header
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "i": torch.arange(3)}
    save_tensors(state, tmp_path / "long.safetensors", metadata={"b": "1", "a": "2"})
    back = load_weights(tmp_path / "long.safetensors")
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["i"], state["i"])
    size = int.from_bytes((tmp_path / "long.safetensors").read_bytes()[:8], "little")
    assert size % 8 == 0 and '\n "__metadata__": {\n  "a"' in (tmp_path / "long.safetensors").read_text("latin-1")
