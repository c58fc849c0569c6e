"""Checkpoints for exact resume: ``{root}/step-XXXXXXX/`` on local disk or under ``s3://bucket/prefix``.

A checkpoint directory holds
- ``model.safetensors``: the full (unsharded) weights; tied tensors are stored once and their aliases listed in
  the safetensors metadata;
- ``trainer.pt``: optimizer (keyed by parameter name), scheduler, grad scaler, step and trainer counters, and the
  trainer's records (the logged rows and evaluations the reports and curves are written from);
- ``rank-XXXXX.pt``: per rank, the RNG states (python, numpy, torch, cuda, and the trainer's own generators), the
  data stream position and the rank's partial logging window;
- ``meta.json``: written last; a directory without it is incomplete and ignored. It names the identity of the run
  that wrote it (``fingerprint``) and that run's MLflow run id.

Beside the step directories, ``complete.json`` marks a run that finished: its checkpoints are not resumed (a new run
of the same identity trains again), they are discarded by the next run.

Everything is read with safetensors or ``torch.load(weights_only=True)``: nothing is unpickled. Local writes go to a
``.tmp-step-XXXXXXX`` directory renamed into place when complete, so a run killed mid-write leaves the previous
checkpoint as the latest. On S3 (no rename) ``meta.json`` is uploaded after every other file and deleted first.
Multi-rank saves assume a shared local filesystem or S3 (every rank writes its own ``rank-*.pt``).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from flava.distributed import ProcessInfo, barrier
from flava.model.io import save_tensors

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{7,})$")
WEIGHTS, TRAINER, META = "model.safetensors", "trainer.pt", "meta.json"
COMPLETE = "complete.json"  # at the store's root: the run of this identity finished


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# ---------------------------------------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """RNG states of python, numpy, torch (and CUDA) as tensors/ints only, so weights_only loading accepts them."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    nps = state["numpy"]
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state((nps["name"], keys, nps["pos"], nps["has_gauss"], nps["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------- safetensors weights
def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict; tensors sharing storage (tied weights) are written once, aliases go to the metadata."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor.detach().to("cpu").contiguous()
    save_tensors(unique, path, metadata={"aliases": json.dumps(aliases)})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def _full_options(**kwargs) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict of a plain, compiled, DDP or FSDP model (a collective under FSDP; rank 0 gets the tensors)."""
    return get_model_state_dict(model, options=_full_options())


# ------------------------------------------------------------------------------------------------------ stores
class LocalStore:
    """Checkpoints in a local (or shared) directory; atomic publication by rename."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def uri(self, step: int) -> str:
        return str(self.root / step_name(step))

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = STEP_DIR.match(child.name)
            if match and (child / META).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def _tmp(self, step: int) -> Path:
        return self.root / f".tmp-{step_name(step)}"

    def prepare(self, step: int) -> None:
        """(main rank) a fresh staging directory, removing what a killed save left behind."""
        tmp = self._tmp(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def staging(self, step: int) -> Path:
        return self._tmp(step)

    def put(self, step: int, staging: Path, names: list[str]) -> None:
        """Files are written in place in the shared staging directory: nothing to upload."""

    def commit(self, step: int, staging: Path, meta: dict[str, Any]) -> None:
        (staging / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        final = self.root / step_name(step)
        if final.exists():  # an incomplete leftover (complete ones are never re-saved)
            shutil.rmtree(final)
        os.replace(staging, final)

    def fetch(self, step: int, names: list[str]) -> Path:
        return self.root / step_name(step)

    def read_meta(self, step: int) -> dict[str, Any]:
        return json.loads((self.root / step_name(step) / META).read_text())

    def delete(self, step: int) -> None:
        final = self.root / step_name(step)
        trash = self.root / f".trash-{step_name(step)}"
        os.replace(final, trash)  # no longer listed as complete from here on
        shutil.rmtree(trash, ignore_errors=True)

    def read_marker(self) -> dict[str, Any] | None:
        path = self.root / COMPLETE
        return json.loads(path.read_text()) if path.is_file() else None

    def write_marker(self, payload: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{COMPLETE}.tmp"
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
        os.replace(tmp, self.root / COMPLETE)

    def delete_marker(self) -> None:
        (self.root / COMPLETE).unlink(missing_ok=True)


class S3Store:
    """Checkpoints under ``s3://bucket/prefix`` (boto3; ``AWS_ENDPOINT_URL`` selects a MinIO/moto endpoint)."""

    def __init__(self, uri: str, client=None):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"checkpoint URI {uri!r} names no bucket")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        if client is None:
            import boto3  # optional (S3 checkpoints only; the `pipeline` extra): local checkpoints work without it

            client = boto3.client("s3")
        self.client = client
        self._tmpdirs: dict[int, Path] = {}

    def _key(self, step: int, name: str = "") -> str:
        parts = [p for p in (self.prefix, step_name(step), name) if p]
        return "/".join(parts)

    def uri(self, step: int) -> str:
        return f"s3://{self.bucket}/{self._key(step)}"

    def _list(self, prefix: str) -> list[str]:
        keys, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self.client.list_objects_v2(**kwargs)
            keys += [obj["Key"] for obj in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]

    def steps(self) -> list[int]:
        base = f"{self.prefix}/" if self.prefix else ""
        found = set()
        for key in self._list(base):
            parts = key[len(base):].split("/")
            if len(parts) == 2 and parts[1] == META and (match := STEP_DIR.match(parts[0])):
                found.add(int(match.group(1)))
        return sorted(found)

    def prepare(self, step: int) -> None:
        self._delete_objects(step)  # a partial upload from a killed save

    def staging(self, step: int) -> Path:
        if step not in self._tmpdirs:
            self._tmpdirs[step] = Path(tempfile.mkdtemp(prefix=f"flava-{step_name(step)}-"))
        return self._tmpdirs[step]

    def put(self, step: int, staging: Path, names: list[str]) -> None:
        for name in names:
            self.client.upload_file(str(staging / name), self.bucket, self._key(step, name))

    def commit(self, step: int, staging: Path, meta: dict[str, Any]) -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=self._key(step, META), Body=json.dumps(meta, indent=2, sort_keys=True).encode()
        )
        self.cleanup(step)

    def cleanup(self, step: int) -> None:
        tmp = self._tmpdirs.pop(step, None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def fetch(self, step: int, names: list[str]) -> Path:
        local = Path(tempfile.mkdtemp(prefix=f"flava-fetch-{step_name(step)}-"))
        for name in names + [META]:
            self.client.download_file(self.bucket, self._key(step, name), str(local / name))
        return local

    def read_meta(self, step: int) -> dict[str, Any]:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(step, META))["Body"].read()
        return json.loads(body)

    def _delete_objects(self, step: int) -> None:
        keys = self._list(self._key(step) + "/")
        meta = self._key(step, META)
        if meta in keys:  # meta first: from here on the checkpoint no longer counts as complete
            self.client.delete_object(Bucket=self.bucket, Key=meta)
        for key in keys:
            if key != meta:
                self.client.delete_object(Bucket=self.bucket, Key=key)

    def delete(self, step: int) -> None:
        self._delete_objects(step)

    def _marker_key(self) -> str:
        return f"{self.prefix}/{COMPLETE}" if self.prefix else COMPLETE

    def read_marker(self) -> dict[str, Any] | None:
        if self._marker_key() not in self._list(self._marker_key()):
            return None
        return json.loads(self.client.get_object(Bucket=self.bucket, Key=self._marker_key())["Body"].read())

    def write_marker(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, indent=2, sort_keys=True).encode()
        self.client.put_object(Bucket=self.bucket, Key=self._marker_key(), Body=body)

    def delete_marker(self) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._marker_key())


def open_store(uri: str | Path, s3_client=None):
    text = str(uri)
    return S3Store(text, client=s3_client) if text.startswith("s3://") else LocalStore(text)


# ------------------------------------------------------------------------------------------------ checkpointer
@dataclass
class Restored:
    """What a loaded checkpoint hands back besides the state it loaded into the live objects."""

    step: int
    data_state: Any
    extra: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)  # global, as saved by the main rank
    rank_state: dict[str, Any] = field(default_factory=dict)  # this rank's own


class Checkpointer:
    """Save, find, load and prune the checkpoints of one stage (``{paths.checkpoints}/{stage}``)."""

    def __init__(self, uri: str | Path, info: ProcessInfo = ProcessInfo(), keep_last: int = 2, s3_client=None,
                 fingerprint: str | None = None):
        self.store = open_store(uri, s3_client)
        self.info = info
        self.keep_last = keep_last
        # The identity of the run (code, inputs, effective config): only a run of the same identity resumes.
        self.fingerprint = fingerprint
        self.run_id: str | None = None  # the MLflow run these checkpoints belong to; stored in meta.json

    def discard_unresumable(self) -> list[int]:
        """Delete what this run must not resume: checkpoints written by a run of another identity (resuming them
        would silently continue a different run) and everything of a finished run of this identity (a re-run
        trains again). Every rank calls this; the main rank deletes. Returns the discarded steps."""
        if self.fingerprint is None:
            return []
        marker = self.store.read_marker()
        finished = marker is not None and marker.get("fingerprint") == self.fingerprint
        stale = [s for s in self.steps()
                 if finished or self.store.read_meta(s).get("fingerprint") != self.fingerprint]
        if self.info.is_main:
            if stale:
                why = "a finished run" if finished else "another run identity (code, inputs or config)"
                log.warning("checkpoints %s under %s belong to %s: discarded", stale, self.root_uri(), why)
            for step in stale:
                self.store.delete(step)
            if marker is not None:  # last: a run killed above still finds the marker and discards the rest
                self.store.delete_marker()
        barrier()
        return stale

    def mark_complete(self, step: int) -> None:
        """(main rank) Record that the run of this identity finished at ``step``: its checkpoints are not resumed."""
        if self.info.is_main:
            self.store.write_marker({"fingerprint": self.fingerprint, "step": step, "mlflow_run_id": self.run_id})

    def resumable_run_id(self) -> str | None:
        """The MLflow run id stored with the checkpoint a resume would load (None when there is none)."""
        latest = self.latest()
        return self.store.read_meta(latest).get("mlflow_run_id") if latest is not None else None

    def weights(self, step: int) -> dict[str, torch.Tensor]:
        """The full model weights saved at ``step``."""
        local = self.store.fetch(step, [WEIGHTS])
        try:
            return load_weights(local / WEIGHTS)
        finally:
            if isinstance(self.store, S3Store):
                shutil.rmtree(local, ignore_errors=True)

    def root_uri(self) -> str:
        return self.store.uri(0).rsplit("/", 1)[0]

    def steps(self) -> list[int]:
        return self.store.steps()

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def uri(self, step: int) -> str:
        return self.store.uri(step)

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        scaler=None,
        data_state: Any = None,
        extra: dict[str, Any] | None = None,
        keep: set[int] = frozenset(),
        records: dict[str, Any] | None = None,
        rank_state: dict[str, Any] | None = None,
    ) -> str:
        """Write the checkpoint of ``step`` (every rank calls this). A complete checkpoint of the same step is never
        overwritten. Afterwards keeps the newest ``keep_last`` plus the steps in ``keep`` (the best one).

        ``records`` (main rank's, tensors and plain values) go to ``trainer.pt``; ``rank_state`` to each rank's
        own file."""
        if step in self.steps():
            log.info("checkpoint %s exists, not re-saved", self.uri(step))
            return self.uri(step)
        started = time.perf_counter()
        weights = model_state(model)  # collectives under FSDP: every rank takes part
        optim = get_optimizer_state_dict(model, optimizer, options=_full_options())
        if self.info.is_main:
            self.store.prepare(step)
        barrier()
        staging = self.store.staging(step)
        rank_name = rank_file(self.info.rank)
        torch.save({"rng": capture_rng(), "data": data_state, "state": dict(rank_state or {})}, staging / rank_name)
        self.store.put(step, staging, [rank_name])
        if self.info.is_main:
            save_weights(weights, staging / WEIGHTS)
            torch.save(
                {
                    "optimizer": optim,
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "step": step,
                    "extra": dict(extra or {}),
                    "records": dict(records or {}),
                },
                staging / TRAINER,
            )
            self.store.put(step, staging, [WEIGHTS, TRAINER])
        barrier()
        if self.info.is_main:
            meta = {"step": step, "world_size": self.info.world_size, "extra": dict(extra or {}), "time": time.time(),
                    "fingerprint": self.fingerprint, "mlflow_run_id": self.run_id}
            self.store.commit(step, staging, meta)
            self.prune(keep)
        elif hasattr(self.store, "cleanup"):
            self.store.cleanup(step)
        barrier()
        log.info("saved checkpoint %s in %.1fs", self.uri(step), time.perf_counter() - started)
        return self.uri(step)

    def prune(self, keep: set[int] = frozenset()) -> list[int]:
        """Delete complete checkpoints other than the newest ``keep_last`` and those in ``keep``."""
        steps = self.steps()
        kept = set(steps[-self.keep_last:]) | set(keep)
        removed = [s for s in steps if s not in kept]
        for step in removed:
            self.store.delete(step)
        return removed

    def load(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler=None,
        scaler=None,
        restore_rng_state: bool = True,
    ) -> Restored:
        """Load ``step`` into the live objects (every rank calls this) and return the data state and counters."""
        meta = self.store.read_meta(step)
        if meta.get("world_size", 1) != self.info.world_size:
            raise ValueError(
                f"checkpoint {self.uri(step)} was written by {meta.get('world_size')} ranks, this run has "
                f"{self.info.world_size}: exact resume needs the same world size"
            )
        local = self.store.fetch(step, [WEIGHTS, TRAINER, rank_file(self.info.rank)])
        set_model_state_dict(model, load_weights(local / WEIGHTS), options=StateDictOptions(full_state_dict=True))
        trainer = torch.load(local / TRAINER, map_location="cpu", weights_only=True)
        if optimizer is not None:
            set_optimizer_state_dict(
                model, optimizer, trainer["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
        if scheduler is not None:
            scheduler.load_state_dict(trainer["scheduler"])
        if scaler is not None and trainer.get("scaler") is not None:
            scaler.load_state_dict(trainer["scaler"])
        per_rank = torch.load(local / rank_file(self.info.rank), map_location="cpu", weights_only=True)
        if restore_rng_state:
            restore_rng(per_rank["rng"])
        if isinstance(self.store, S3Store):
            shutil.rmtree(local, ignore_errors=True)
        return Restored(step=trainer["step"], data_state=per_rank["data"], extra=trainer.get("extra", {}), meta=meta,
                        records=trainer.get("records", {}), rank_state=per_rank.get("state", {}))
