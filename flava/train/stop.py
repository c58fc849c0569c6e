"""Stopping a training stage early from outside: at an evaluation (a sweep's pruner), or at a step boundary on
SIGTERM/SIGINT (a Kubernetes preemption, Ctrl-C)."""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class EarlyStop(Exception):
    """Raised by a stage's ``on_eval`` callback to end the stage at that evaluation. The stage ends its MLflow
    run as stopped (status KILLED, tag ``flava.stopped_early`` with the reason), keeping the curve so far, and
    re-raises it to its caller."""


class StopSignals:
    """While entered, SIGTERM and SIGINT only set ``received``; the training loop reads it at its step boundaries
    (all ranks agree through the loop's per-step all-reduce), saves a checkpoint and stops. On exit the previous
    handlers are back.

    The handler does no I/O (it may interrupt anything, logging included). A second SIGINT raises
    ``KeyboardInterrupt`` at once: Ctrl-C twice still stops a run that hangs. Python delivers signals to the main
    thread only, so in any other thread (the Prefect route trains in threads) nothing is installed and the process
    keeps its own handling."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self) -> "StopSignals":
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: SIGTERM/SIGINT keep the process's handling (no checkpoint on them)")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None: a handler not installed from Python; the default is the closest we can restore
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
