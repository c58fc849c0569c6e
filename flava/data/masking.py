"""Masking for the pretraining objectives.

- ``block_mask``: BEiT-style block-wise masking of image patches (MIM / MMM-image). Rectangular blocks of random
  area and aspect ratio are added until the masked count reaches ``round(mask_ratio * h * w)``; blocks never
  overshoot the target, and if no block fits any more the remaining few patches are picked at random, so every
  image gets exactly the same number of masked patches.
- ``bert_mask``: BERT's masked-language-model corruption (MLM / MMM-text): each real, non-special token is chosen
  with probability ``prob``; of the chosen, 80 % become ``[MASK]``, 10 % a random non-special token, 10 % stay.
  Labels hold the original id at chosen positions and -100 elsewhere.

Both take a ``torch.Generator`` so a loader can make them deterministic per batch.
"""
from __future__ import annotations

import math
import random
from typing import Iterable

import numpy as np
import torch

from flava.model.losses import IGNORE_INDEX

# Tries per block before concluding that no block of the remaining size fits (BEiT uses the same idea).
_BLOCK_ATTEMPTS = 10


def _python_rng(generator: torch.Generator | None) -> random.Random:
    """A fast scalar RNG seeded from the torch generator (one draw), so results follow the generator's seed."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return random.Random(seed)


def block_mask(
    grid: tuple[int, int],
    *,
    mask_ratio: float,
    min_block_patches: int,
    max_block_patches: int | None = None,
    min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A (h * w,) bool mask over a patch grid, True = masked, row-major like the patch sequence.

    Exactly ``round(mask_ratio * h * w)`` patches are masked (at least 1), mostly in rectangular blocks whose area
    is drawn from ``[min_block_patches, max_block_patches]`` and whose aspect ratio is log-uniform in
    ``[min_aspect, 1 / min_aspect]``.
    """
    h, w = (int(v) for v in grid)
    if h <= 0 or w <= 0:
        raise ValueError(f"block_mask: grid must be positive, got {grid}")
    if not 0 < mask_ratio < 1:
        raise ValueError(f"block_mask: mask_ratio must be in (0, 1), got {mask_ratio}")
    if min_block_patches < 1:
        raise ValueError(f"block_mask: min_block_patches must be >= 1, got {min_block_patches}")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"block_mask: min_aspect must be in (0, 1], got {min_aspect}")
    n = h * w
    target = max(1, round(mask_ratio * n))
    max_block = target if max_block_patches is None else max(1, min(max_block_patches, target))
    rng = _python_rng(generator)
    mask = np.zeros((h, w), dtype=bool)
    count = _add_blocks(mask, target, max_block, min_block_patches, min_aspect, rng)
    flat = torch.from_numpy(mask.reshape(-1))
    if count < target:  # no block fits the few patches left: finish with single patches
        free = torch.nonzero(~flat).squeeze(1)
        pick = torch.tensor(rng.sample(free.tolist(), target - count), dtype=torch.long)
        flat[pick] = True
    return flat


def _add_blocks(
    mask: np.ndarray, target: int, max_block: int, min_block_patches: int, min_aspect: float, rng: random.Random
) -> int:
    """Mark blocks in the (h, w) ``mask`` until ``target`` patches are masked or no block fits; return the count."""
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    count = 0
    while count < target:
        remaining = target - count
        upper = min(max_block, remaining)
        added = _place_block(mask, min(min_block_patches, upper), upper, remaining, log_aspect, rng)
        if added == 0:
            break
        count += added
    return count


def _place_block(
    mask: np.ndarray, lower: int, upper: int, remaining: int, log_aspect: tuple[float, float], rng: random.Random
) -> int:
    """Try up to ``_BLOCK_ATTEMPTS`` random blocks; mark the first that adds 1..``remaining`` new patches.

    Returns how many patches it added (0: none fitted)."""
    h, w = mask.shape
    for _ in range(_BLOCK_ATTEMPTS):
        area = rng.uniform(lower, upper)
        aspect = math.exp(rng.uniform(*log_aspect))
        bh = int(round(math.sqrt(area * aspect)))
        bw = int(round(math.sqrt(area / aspect)))
        if not (1 <= bh <= h and 1 <= bw <= w):
            continue
        top = rng.randint(0, h - bh)
        left = rng.randint(0, w - bw)
        block = mask[top:top + bh, left:left + bw]
        new = bh * bw - int(np.count_nonzero(block))
        # Accept a block only if it adds something and does not overshoot the target.
        if 0 < new <= remaining:
            block[...] = True
            return new
    return 0


def bert_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    special_ids: Iterable[int],
    vocab_size: int,
    mask_token_id: int,
    prob: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    min_masked: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of (B, T) or (T,) token ids -> ``(input_ids_masked, mlm_labels)`` of the same shape.

    Never touches padding (``attention_mask == 0``) or ``special_ids``. ``min_masked`` forces at least that many
    chosen tokens in a sequence that has that many candidates (short captions would often get none at 15 %).
    """
    _check_bert_args(input_ids, attention_mask, prob, mask_fraction, random_fraction, mask_token_id, vocab_size)
    squeeze = input_ids.dim() == 1
    ids = input_ids.unsqueeze(0) if squeeze else input_ids
    att = attention_mask.unsqueeze(0) if squeeze else attention_mask
    ids = ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"bert_mask: input_ids outside [0, {vocab_size})")

    special = torch.tensor(sorted(set(int(s) for s in special_ids)), dtype=torch.long)
    candidate = att.bool() & ~torch.isin(ids, special)  # (B, T)
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & candidate
    if min_masked > 0:
        _top_up(chosen, candidate, min_masked, generator)

    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[chosen] = ids[chosen]
    # One uniform draw splits the chosen tokens into [MASK] / random / unchanged.
    split = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (split < mask_fraction)
    to_random = chosen & (split >= mask_fraction) & (split < mask_fraction + random_fraction)
    masked = ids.clone()
    masked[to_mask] = mask_token_id
    if to_random.any():
        pool = _random_token_pool(special, vocab_size)
        picks = torch.randint(0, pool.numel(), (int(to_random.sum()),), generator=generator)
        masked[to_random] = pool[picks]
    if squeeze:
        return masked.squeeze(0), labels.squeeze(0)
    return masked, labels


def _check_bert_args(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prob: float, mask_fraction: float,
    random_fraction: float, mask_token_id: int, vocab_size: int,
) -> None:
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"bert_mask: attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"bert_mask: input_ids must be (T,) or (B, T), got {tuple(input_ids.shape)}")
    if not 0 < prob < 1:
        raise ValueError(f"bert_mask: prob must be in (0, 1), got {prob}")
    if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
        raise ValueError(f"bert_mask: need 0 <= mask_fraction + random_fraction <= 1, got {mask_fraction}, {random_fraction}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"bert_mask: mask_token_id {mask_token_id} outside the vocab of {vocab_size}")


def _top_up(chosen: torch.Tensor, candidate: torch.Tensor, min_masked: int, generator: torch.Generator | None) -> None:
    """Rows of ``chosen`` (B, T) with too few tokens: add candidates in a random order until ``min_masked`` (or
    none left). In place."""
    short = (chosen.sum(1) < min_masked) & (candidate.sum(1) > 0)
    for row in torch.nonzero(short).squeeze(1).tolist():
        cands = torch.nonzero(candidate[row] & ~chosen[row]).squeeze(1)
        need = min(min_masked - int(chosen[row].sum()), cands.numel())
        order = torch.randperm(cands.numel(), generator=generator)[:need]
        chosen[row, cands[order]] = True


def _random_token_pool(special: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The vocab ids a chosen token may be replaced with at random: every id that is not special."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[special < vocab_size]] = False
    pool = torch.nonzero(allowed).squeeze(1)
    if pool.numel() == 0:
        raise ValueError("bert_mask: every vocab id is special; nothing to draw random tokens from")
    return pool
