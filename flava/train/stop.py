"""Stopping a training stage early from outside, at an evaluation (a sweep's pruner)."""
from __future__ import annotations


class EarlyStop(Exception):
    """Raised by a stage's ``on_eval`` callback to end the stage at that evaluation. The stage ends its MLflow
    run as stopped (status KILLED, tag ``flava.stopped_early`` with the reason), keeping the curve so far, and
    re-raises it to its caller."""
