"""Where the data stages run their partitions: one process, a local Dask cluster, or an existing Dask scheduler.

A stage splits its work into partitions (prepare: the units of its sources, such as tar shards and parquet parts;
validate and shard: manifest row ranges) and maps one pure, top-level function over them; ``Engine.map`` returns
the results in partition order whatever the engine, so a stage's outputs do not depend on where it ran.
``data.engine.kind`` chooses:

- ``serial``: every partition in this process, in order (the default: no start-up cost, nothing to install).
- ``local``: a ``dask.distributed.LocalCluster`` on this machine, ``workers`` processes (default: one per core)
  of one thread each -- the stages are CPU-bound Python (image decoding, GE), so processes, not threads.
- ``address``: the Dask scheduler at ``data.engine.address`` (e.g. ``tcp://scheduler:8786``, or the cluster
  ``flava dask up`` starts on Kubernetes: :mod:`flava.launch.dask_cluster`); its workers need this project installed
  and see the stage's paths where this process does.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Sequence

from pydantic import Field, model_validator

from flava.configbase import StrictModel


class EngineConfig(StrictModel):
    """``data.engine``: where the data stages (prepare, validate, shard) run their partitions, and how many manifest
    rows make one partition of validate and shard, and of prepare's CSV/TSV/JSONL manifests (its other partitions
    are its sources' files)."""

    kind: Literal["serial", "local", "address"] = "serial"
    workers: int = Field(0, ge=0)  # local: worker processes; 0 = one per core
    address: str = ""  # address: the Dask scheduler, e.g. tcp://scheduler:8786
    # rows per partition: memory is bounded by it (~2.6 KB per row); above the synthetic corpora (3000 pairs),
    # so the embedded pipeline validates and shards each corpus as one partition (flava.data.shards: its shards are
    # then those of one shuffle of the whole corpus). 40 x data.shards.samples_per_shard (256): the shard stage's
    # partitions (of the validated manifest) then fill every shard but the corpus's last
    partition_rows: int = Field(10_240, ge=1)

    @model_validator(mode="after")
    def _address_given(self) -> "EngineConfig":
        if self.kind == "address" and not self.address:
            raise ValueError("data.engine.address must name the Dask scheduler when data.engine.kind is 'address'")
        return self


class Engine:
    """Maps a function over items; subclasses decide where the calls run."""

    name = "serial"

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return [fn(item) for item in items]


class DaskEngine(Engine):
    """The calls run on a ``dask.distributed`` client's workers; results gathered in the order of ``items``."""

    def __init__(self, client, name: str):
        self.client, self.name = client, name

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        # pure=False: each partition is its own task (no hashing of the arguments to deduplicate calls)
        futures = self.client.map(fn, list(items), pure=False)
        return self.client.gather(futures)


@contextmanager
def open_engine(cfg: EngineConfig) -> Iterator[Engine]:
    """The engine of ``cfg``; a local cluster lives as long as the ``with`` block."""
    if cfg.kind == "serial":
        yield Engine()
        return
    # dask.distributed takes about a second to import (measured here): only a Dask engine pays for it
    from dask.distributed import Client, LocalCluster

    if cfg.kind == "address":
        with Client(cfg.address) as client:
            yield DaskEngine(client, f"dask scheduler {cfg.address}")
        return
    workers = cfg.workers or os.cpu_count() or 1
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield DaskEngine(client, f"local dask cluster of {workers} workers")
