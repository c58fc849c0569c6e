"""What every evaluation task and paper benchmark is given: the model under evaluation and how to feed it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from flava.eval.config import EvalConfig


@dataclass
class EvalContext:
    model: torch.nn.Module
    tokenizer: Any
    eval_root: str | Path
    ecfg: EvalConfig
    transform: Callable[[Image.Image], torch.Tensor]
    device: torch.device
    max_length: int
    seed: int

    @property
    def common(self) -> dict[str, Any]:
        """The keyword arguments every encoder pass takes."""
        return {"batch_size": self.ecfg.batch_size, "device": self.device}
