"""Training streams: endless, deterministic batches from webdataset shards (local or S3), split by rank and worker.

How a stream is laid out (all of it a pure function of ``seed``, so every rank computes the same plan with no
communication, and a resumed run regenerates exactly where it stopped):

- *slots*: each rank runs ``W = data.loader.num_workers`` DataLoader workers (1 when 0), so there are
  ``S = world_size * W`` slots; slot = ``rank * W + worker``.
- *epochs*: epoch ``e`` permutes the shards with a generator seeded by ``(seed, corpus, e)``. With at least ``S``
  shards, slot ``s`` reads shards ``perm[s::S]``; with fewer, every slot reads every shard and keeps the samples at
  positions ``s, s + S, ...`` of the shard's shuffled order. Either way the slots of one epoch are disjoint. Within
  a shard the samples are shuffled by ``(seed, corpus, e, shard)`` (a shard is read whole; ``samples_per_shard``
  bounds the memory). Epochs follow each other forever (resampling): the stream never ends.
- *captions*: a sample stored with several captions (``flava.data.captions``) gives one per visit: in epoch ``e``
  caption ``perm[e % n]`` of its ``n``, the permutation drawn by ``(seed, corpus, key, e // n)``, so each caption
  is seen once every ``n`` epochs, in an order that differs per sample and per round.
- *batches*: a slot packs its sample stream into batches of ``batch_size``; global batch ``n`` of a rank comes from
  worker ``n % W`` (the DataLoader's round-robin order). Masking/augmentation draw from a generator seeded by
  ``(seed, corpus, rank, n)``.
- *resume*: ``state_dict()`` records the batches consumed; ``load_state_dict`` restarts the workers so that worker
  ``w`` plays logical worker ``(w + consumed) % W`` and skips its consumed samples arithmetically from the index
  counts (only the shard it stops inside is read again), so the next batches are exactly those a run without the
  interruption would have produced.

Evaluation turns image paths into pixel batches with the same transform:
``flava.data.transforms.load_pixel_batch(paths, transform_from_config(cfg, train=False))``.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flava.data import storage
from flava.data.captions import CAPTIONS_MEMBER
from flava.data.collate import KIND_OF_CORPUS, Collator
from flava.data.shards import Sample, load_index, read_tar, shard_location, verify_shard
from flava.data.transforms import image_transform, model_image_geometry, transform_from_config

if TYPE_CHECKING:
    from flava.config import PipelineConfig


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python runs (no ``hash()`` randomisation)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _perm(n: int, *parts: Any) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(*parts))).tolist()


def _count_congruent(lo: int, hi: int, residue: int, modulus: int) -> int:
    """How many g in [lo, hi) have g % modulus == residue."""
    def upto(x: int) -> int:  # count in [0, x)
        return (x - residue + modulus - 1) // modulus if x > residue else 0
    return upto(hi) - upto(lo)


def caption_index(n: int, *, seed: int, corpus: str, key: str, epoch: int) -> int:
    """Which of a sample's ``n`` captions its visit in ``epoch`` reads (see the module docstring): a pure function
    of its arguments, drawn from its own seeded generator (never a process-global RNG)."""
    if n < 1:
        raise ValueError(f"sample {key!r} has no caption")
    rounds, slot = divmod(epoch, n)
    return _perm(n, seed, corpus, "captions", key, rounds)[slot]


def with_caption(sample: Sample, *, seed: int, corpus: str, epoch: int) -> Sample:
    """A multi-caption sample as the collator reads it, its ``txt`` the caption of this visit; others as they are."""
    blob = sample.files.get(CAPTIONS_MEMBER)
    if blob is None:
        return sample
    captions = json.loads(blob)
    text = captions[caption_index(len(captions), seed=seed, corpus=corpus, key=sample.key, epoch=epoch)]
    files = {ext: data for ext, data in sample.files.items() if ext != CAPTIONS_MEMBER}
    files["txt"] = text.encode("utf-8")
    return Sample(sample.key, files)


class SlotPlan:
    """Which samples one slot reads in each epoch (see the module docstring)."""

    def __init__(self, shards: list[dict[str, Any]], *, corpus: str, seed: int, slot: int, slots: int):
        if not 0 <= slot < slots:
            raise ValueError(f"slot {slot} outside [0, {slots})")
        self.shards, self.corpus, self.seed, self.slot, self.slots = shards, corpus, seed, slot, slots
        self.by_shard = len(shards) >= slots
        total = sum(s["samples"] for s in shards)
        if total < slots:
            raise ValueError(f"corpus {corpus!r} has {total} samples, too few for {slots} rank x worker slots")

    def _order(self, e: int) -> list[int]:
        return _perm(len(self.shards), self.seed, self.corpus, "shards", e)

    def epoch(self, e: int) -> list[tuple[int, int]]:
        """(shard index, samples this slot takes from it) in reading order for epoch ``e``."""
        order = self._order(e)
        if self.by_shard:
            return [(i, self.shards[i]["samples"]) for i in order[self.slot::self.slots]]
        # Fewer shards than slots: deal the epoch's samples (shards concatenated in order) round-robin.
        out, offset = [], 0
        for i in order:
            n = self.shards[i]["samples"]
            count = _count_congruent(offset, offset + n, self.slot, self.slots)
            if count:
                out.append((i, count))
            offset += n
        return out

    def positions(self, e: int, shard: int) -> list[int]:
        """This slot's sample positions inside ``shard`` (file order indices), in reading order."""
        order = _perm(self.shards[shard]["samples"], self.seed, self.corpus, "samples", e, shard)
        if self.by_shard:
            return order
        offset = 0
        for i in self._order(e):
            if i == shard:
                break
            offset += self.shards[i]["samples"]
        return order[(self.slot - offset) % self.slots::self.slots]


class ShardDataset(IterableDataset):
    """Yields collated batches for one rank; inside a DataLoader each worker yields its own logical slot."""

    def __init__(self, *, location: str, corpus: str, index: dict[str, Any], collator: Collator, batch_size: int,
                 rank: int, world_size: int, num_workers: int, seed: int, s3=None, verify: bool = True):
        # location: the directory or s3:// prefix holding the corpus' shards (``flava.data.shards.shard_location``)
        self.location, self.corpus, self.index, self.collator = location, corpus, index, collator
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.workers = max(1, num_workers)
        self.seed, self.s3, self.verify = seed, s3, verify
        self.start_batches = 0  # global batches of this rank already consumed (set before iterating)
        self._verified: set[str] = set()  # shards whose sha256 this process has checked (once, not every epoch)
        # Fail now, in the caller, rather than inside a worker (the same check on every rank).
        SlotPlan(index["shards"], corpus=corpus, seed=seed, slot=0, slots=world_size * self.workers)

    def _read_shard(self, i: int) -> list[Sample]:
        entry = self.index["shards"][i]
        uri = storage.join(self.location, entry["name"])
        data = storage.read_bytes(uri, s3=self.s3)
        if self.verify and entry["sha256"] not in self._verified:
            verify_shard(data, entry, uri)
            self._verified.add(entry["sha256"])
        elif len(data) != entry["bytes"]:
            raise ValueError(f"shard {uri} has {len(data)} bytes, its index says {entry['bytes']}: stale or corrupt")
        samples = read_tar(data)
        if len(samples) != entry["samples"]:
            raise ValueError(f"shard {uri} holds {len(samples)} samples, its index says {entry['samples']}")
        return samples

    def samples(self, plan: SlotPlan, skip: int) -> Iterator[Sample]:
        """The slot's endless sample stream, starting after ``skip`` samples (skipped without decoding)."""
        e = 0
        while True:
            assignment = plan.epoch(e)
            total = sum(c for _, c in assignment)
            if skip >= total:
                skip -= total
                e += 1
                continue
            for shard, count in assignment:
                if skip >= count:
                    skip -= count
                    continue
                samples = self._read_shard(shard)
                for pos in plan.positions(e, shard)[skip:]:
                    yield with_caption(samples[pos], seed=self.seed, corpus=self.corpus, epoch=e)
                skip = 0
            e += 1

    def batches(self, logical: int) -> Iterator[dict[str, Any]]:
        w = self.workers
        plan = SlotPlan(self.index["shards"], corpus=self.corpus, seed=self.seed,
                        slot=self.rank * w + logical, slots=self.world_size * w)
        n0 = self.start_batches
        j = max(0, (n0 - logical + w - 1) // w)  # this logical worker's batches among the first n0
        stream = self.samples(plan, j * self.batch_size)
        while True:
            chunk = [next(stream) for _ in range(self.batch_size)]
            n = j * w + logical  # the rank's global batch index
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.corpus, self.rank, n))
            yield self.collator(chunk, gen)
            j += 1

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise ValueError(f"dataset planned for {self.workers} workers, DataLoader has {info.num_workers}")
        return self.batches((worker + self.start_batches) % self.workers)


class ShardStream:
    """Endless iterator of batches with ``state_dict()`` / ``load_state_dict()`` for exact resume."""

    def __init__(self, dataset: ShardDataset, *, num_workers: int, prefetch_factor: int,
                 start_method: str):
        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.start_method = start_method  # data.loader.start_method
        self.consumed = 0
        self._it: Iterator | None = None

    @property
    def kind(self) -> str:
        return self.dataset.collator.kind

    def _start(self) -> Iterator:
        self.dataset.start_batches = self.consumed
        if self.num_workers == 0:
            return iter(self.dataset)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor, persistent_workers=False,
                            multiprocessing_context=self.start_method)
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        self.consumed += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes (they are restarted on the next ``next()``)."""
        self._it = None

    def _identity(self) -> dict[str, Any]:
        d = self.dataset
        return {"corpus": d.corpus, "seed": d.seed, "rank": d.rank, "world_size": d.world_size,
                "num_workers": d.workers, "batch_size": d.batch_size}

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), "batches": self.consumed, "samples": self.consumed * self.dataset.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"cannot resume the {self.dataset.corpus} stream exactly: {detail}")
        if int(state["batches"]) < 0:
            raise ValueError(f"stream state has a negative batch count {state['batches']}")
        self.consumed = int(state["batches"])
        self.close()


def build_stream(
    cfg: "PipelineConfig",
    corpus: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    tokenizer=None,
    codebook=None,
    include_keys: bool = False,
) -> ShardStream:
    """An endless, deterministic, resumable stream of ``corpus`` batches for this rank.

    ``corpus`` in {"pairs", "images", "text"} gives batches of kind "pair", "image", "text". ``tokenizer`` is needed
    for pairs and text. A k-means ``codebook`` (or none) reads ``pixel_values``; a DALL-E codebook
    (one with a ``downsample`` factor) gets ``codebook_pixel_values`` at ``grid * downsample`` pixels (112 for a
    14x14 grid), with the same crop and flip as ``pixel_values``. ``include_keys`` adds the sample keys (a list of str) under ``"keys"``, for tests.
    """
    if corpus not in KIND_OF_CORPUS:
        raise ValueError(f"corpus must be one of {sorted(KIND_OF_CORPUS)}, got {corpus!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    kind = KIND_OF_CORPUS[corpus]
    lc = cfg.data.loader
    transform = grid = None
    if kind != "text":
        image_size, patch = model_image_geometry(cfg)
        transform = transform_from_config(cfg, train=True)
        grid = (image_size // patch, image_size // patch)
    codebook_transform = None
    downsample = getattr(codebook, "downsample", None)
    if kind != "text" and downsample:
        codebook_transform = image_transform(
            grid[0] * int(downsample), train=True, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
            resample=lc.resample,
        )
    collator = Collator(kind=kind, transform=transform, grid=grid, masking=cfg.data.masking, tokenizer=tokenizer,
                        max_length=cfg.data.tokenizer.max_length, pad_to_max_length=lc.pad_to_max_length,
                        include_keys=include_keys,
                        codebook_transform=codebook_transform, codebook_eps=lc.codebook_pixel_eps)
    index = load_index(cfg.paths.shard_index, corpus)  # local: the index DVC tracks
    dataset = ShardDataset(location=shard_location(cfg.paths.shard_index, corpus, index), corpus=corpus,
                           index=index, collator=collator,
                           batch_size=batch_size, rank=rank, world_size=world_size, num_workers=lc.num_workers,
                           seed=seed, s3=cfg.data.shards.s3, verify=lc.verify_checksums)
    return ShardStream(dataset, num_workers=lc.num_workers, prefetch_factor=lc.prefetch_factor,
                       start_method=lc.start_method)
