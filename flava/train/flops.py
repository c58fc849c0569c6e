"""Model FLOPs of a training step per batch kind, and device peaks, for the MFU estimate logged on GPU.

Same convention as ``benchmarks/train_step.py`` with ``needed_only=False``: matmul FLOPs only (2 per
multiply-accumulate), every position of every block counted, a training step = 3 x forward (backward = 2 x
forward; activation recomputation not counted). The model skips some last-block rows no loss reads, so this is an
upper bound of the work done and MFU is slightly optimistic.
One pre-norm block over ``n`` tokens of width ``d`` and MLP width ``f`` costs ``2n(4d^2 + 2df) + 4n^2 d``.
Embedding lookups, norms, softmax and activations are not counted.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from flava.model.losses import IGNORE_INDEX

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), matched by substring of the CUDA device name,
# more specific names first. The MFU denominator is the bf16 peak whatever the training precision (convention).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),
    ("A100", 312.0e12),
    ("L40S", 362.05e12),
    ("A10G", 70.0e12),
)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device (``train.peak_tflops`` wins); None on CPU or an unknown GPU (no MFU then)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def _block(d: int, f: int, n: int) -> int:
    return 2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d


def _stack(tower, n: int) -> int:
    return tower.num_layers * _block(tower.hidden_size, tower.intermediate_size, n)


def stem_flops(img) -> int:
    """Pixels -> patch tokens of one image (an ``ImageEncoderConfig``): the patch convolution is a
    (C * patch^2) x d matmul per patch; the ``conv`` stem is each 3x3 stride-2 convolution at its output
    resolution plus the 1x1 projection per patch."""
    p = img.num_patches
    if img.stem == "patch":
        return 2 * p * (img.num_channels * img.patch_size**2) * img.hidden_size
    flops, side, c_in = 0, img.image_size, img.num_channels
    for c_out in img.stem_channels:
        side = (side + 1) // 2
        flops += 2 * side * side * (c_in * 9) * c_out
        c_in = c_out
    return flops + 2 * p * c_in * img.hidden_size


def _head(hidden: int, vocab: int) -> int:
    """Masked-prediction head per predicted position: transform (d x d) + decoder (d x vocab)."""
    return 2 * (hidden * hidden + hidden * vocab)


def step_flops(cfg, batch: Mapping[str, Any]) -> float:
    """Training FLOPs of one micro-batch of ``FlavaForPretraining`` with config ``cfg`` (a ``FlavaConfig``)."""
    img, txt, mm = cfg.image, cfg.text, cfg.multimodal
    kind = batch["kind"]
    p = img.num_patches
    n_img = p + 1
    image_pass = stem_flops(img) + _stack(img, n_img)
    forward = 0
    if kind == "image":
        b = batch["pixel_values"].shape[0]
        masked = int(batch["image_mask"].sum()) if "image_mask" in batch else b * p
        forward = b * image_pass + masked * _head(img.hidden_size, cfg.codebook_size)
    elif kind == "text":
        b, t = batch["input_ids"].shape
        masked = int((batch["mlm_labels"] != IGNORE_INDEX).sum()) if "mlm_labels" in batch else 0
        forward = b * _stack(txt, t) + masked * _head(txt.hidden_size, txt.vocab_size)
    elif kind == "pair":
        b, t = batch["input_ids"].shape
        text_pass = _stack(txt, t)
        per_sample = 2 * (image_pass + text_pass)  # unmasked (contrastive) + masked (fusion) unimodal passes
        per_sample += 2 * cfg.projection_dim * (img.hidden_size + txt.hidden_size) + 4 * b * cfg.projection_dim
        per_sample += 2 * mm.hidden_size * (n_img * img.hidden_size + t * txt.hidden_size)
        per_sample += _stack(mm, 1 + n_img + t) + 2 * (mm.hidden_size**2 + 2 * mm.hidden_size)
        forward = b * per_sample
        if "image_mask" in batch:
            forward += int(batch["image_mask"].sum()) * _head(mm.hidden_size, cfg.codebook_size)
        if "mlm_labels" in batch:
            forward += int((batch["mlm_labels"] != IGNORE_INDEX).sum()) * _head(mm.hidden_size, txt.vocab_size)
    else:
        raise ValueError(f"unknown batch kind {kind!r}")
    return float(3 * forward)
