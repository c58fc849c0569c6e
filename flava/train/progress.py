"""Progress reporting: a tqdm bar with live losses and throughput on an interactive terminal, plain log lines
(one per ``log_every`` steps) in CI, pods and files. Only the main rank reports."""
from __future__ import annotations

import logging
import sys
from typing import Mapping

from tqdm.auto import tqdm

log = logging.getLogger("flava.train")


def _fmt(metrics: Mapping[str, float], keys: list[str]) -> str:
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


class Progress:
    def __init__(self, stage: str, total: int, start: int = 0, *, enabled: bool = True,
                 interactive: bool | None = None):
        self.stage, self.total, self.enabled = stage, total, enabled
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = None
        if enabled and self.interactive:
            self.bar = tqdm(total=total, initial=start, desc=f"pretrain {stage}", dynamic_ncols=True, leave=True)

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Called after every step (``metrics`` only on logging steps)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if metrics:
                shown = {k: f"{v:.4g}" for k, v in metrics.items() if k.startswith("loss") or k == "samples_per_s"}
                self.bar.set_postfix(shown, refresh=False)
        elif metrics:
            losses = sorted(k for k in metrics if k.startswith("loss"))
            log.info("%s step %d/%d %s", self.stage, step, self.total,
                     _fmt(metrics, losses + ["lr", "grad_norm", "samples_per_s", "mfu"]))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info("%s", text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
