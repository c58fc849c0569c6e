"""The workspace lock: one pipeline at a time per workspace, whichever route runs it.

``flava pipeline run`` and the Prefect flow hold it for their whole run and mark their child processes with
``$FLAVA_WORKSPACE_LOCK``; a stage command started any other way (a plain ``dvc repro``, ``flava data prepare``)
takes it for its own duration, so it cannot write into a workspace a pipeline run is using.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

LOCK_FILE = ".dvc/tmp/flava-pipeline.lock"  # under .dvc/tmp: untracked, and where DVC keeps its own lock
HELD_ENV = "FLAVA_WORKSPACE_LOCK"  # set (to the lock's path) for the processes a holder starts


DVC_ROOT_ENV = "DVC_ROOT"  # DVC sets it for every stage it runs: the root of the project's repository


def workspace_root(start: str | Path | None = None) -> Path:
    """The project's root: ``$DVC_ROOT`` under DVC, else the nearest directory at or above ``start`` (default: the
    current one) holding ``.dvc``, else ``start``. Relative locations that must mean one file for every process of
    a run (the CLI, a flow-run pod, a sweep worker started elsewhere in the tree) resolve against it."""
    if os.environ.get(DVC_ROOT_ENV):
        return Path(os.environ[DVC_ROOT_ENV]).resolve()
    here = Path(start or Path.cwd()).resolve()
    return next((d for d in (here, *here.parents) if (d / ".dvc").is_dir()), here)


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds this workspace."""


@contextmanager
def workspace_lock(root: str | Path, holder: str, timeout_s: float | None = 0.0) -> Iterator[Path]:
    """One pipeline at a time per workspace, whichever route runs it (``flava pipeline run``, the Prefect flow).

    An ``fcntl`` lock on ``.dvc/tmp/flava-pipeline.lock``, released by the kernel if the holder dies. Waits up
    to ``timeout_s`` seconds (None: forever, 0: not at all), then raises WorkspaceBusy naming the holder."""
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                current = handle.read().strip() or "another process"
                if deadline is not None and time.monotonic() >= deadline:
                    raise WorkspaceBusy(
                        f"workspace {Path(root).resolve()} is busy: {current} holds {LOCK_FILE}; waited "
                        f"{timeout_s:g}s (launch.schedule.lock_timeout_s). Wait for it to finish or stop it."
                    ) from None
                if not announced:
                    log.info("waiting for the workspace lock held by %s", current)
                    announced = True
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{holder} (pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC)\n")
        handle.flush()
        marked = os.environ.get(HELD_ENV)
        os.environ[HELD_ENV] = str(path.resolve())  # inherited by the stage processes this holder starts
        try:
            yield path
        finally:
            if marked is None:
                os.environ.pop(HELD_ENV, None)
            else:
                os.environ[HELD_ENV] = marked
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def stage_lock(root: str | Path, stage: str, timeout_s: float | None) -> Iterator[None]:
    """Around one stage command: nothing when a pipeline run that holds this workspace started it (or there is no
    DVC workspace here), else the workspace lock for the command's duration. Under a distributed launcher
    (torchrun sets ``$RANK``) only rank 0 takes it: the group is one stage command."""
    path = Path(root) / LOCK_FILE
    held = os.environ.get(HELD_ENV) == str(path.resolve())
    if not (Path(root) / ".dvc").is_dir() or held or os.environ.get("RANK", "0") != "0":
        yield
        return
    with workspace_lock(root, f"stage command {stage}", timeout_s):
        yield


