"""Process exit codes that launchers act on: Kubernetes ``podFailurePolicy`` rules and Prefect retries.

A config or data error cannot be fixed by running the same command again, so it must not burn retries; a
preempted process saved a checkpoint and its retry resumes from it.
"""
from __future__ import annotations

NON_RETRYABLE = 2  # bad config, missing input, busy workspace: the CLI's error exit (argparse's usage exit too)
PREEMPTED = 143  # 128 + SIGTERM: the trainer saved a checkpoint before exiting; a retry resumes there


class Preempted(Exception):
    """A training stage stopped at a step boundary on SIGTERM/SIGINT after saving a checkpoint there; the CLI
    exits with ``PREEMPTED``. Defined here, not in ``flava.train``, so the CLI can map it without loading the
    trainer's modules into every command (each command's modules are its DVC code deps)."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint
