"""The pre-norm transformer block shared by the image, text and multimodal towers.

One block = ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (ViT/FLAVA pre-norm). Attention projects q, k, v
with one fused linear layer and runs either PyTorch's fused ``scaled_dot_product_attention`` (``"sdpa"``, the
default: flash / memory-efficient kernels where the device has them) or the explicit softmax(QK^T/sqrt(d))V
(``"eager"``, the reference path transformers' FLAVA uses). ``TransformerStack`` runs the blocks, optionally
under activation checkpointing, and returns the last hidden state both before and after its final LayerNorm:
FLAVA feeds the former to the multimodal encoder and the latter to the heads.

Which positions the blocks compute is planned once per forward pass, in one ``Positions`` object that the stack
hands to every block. Skipping padding (``Positions.plan(mask, skip_padding=True)``, what the training forward
uses): with a key-padding mask the blocks run the per-token work (LayerNorms, the qkv/output projections, the MLP)
on the real tokens only, held packed as one (N, H) tensor between blocks; they are scattered to (B, S, ...) only
for the attention product itself, where the mask hides the padded keys (S <= T: columns that are padding in every
row drop out). Padded positions cannot influence real ones (they are masked keys), so outputs at every computed
position -- the unmasked ones, plus any the caller reads (``select``, ``needed``) -- equal those of the full
computation. At every other position the blocks are skipped: the stack's ``pre_norm`` output there is its input,
passed through unchanged (and ``post_norm`` its LayerNorm). Without ``skip_padding`` every position is computed
(the feature API, so embeddings match transformers' FLAVA at padded positions too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flava.model.config import TransformerConfig

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class LayerNorm(nn.LayerNorm):
    """LayerNorm that normalises in fp32 when weights/inputs are half precision (bf16 statistics are too coarse,
    as torchmultimodal also found); identical to ``nn.LayerNorm`` in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def take(x: torch.Tensor, select: int | torch.Tensor | None) -> torch.Tensor:
    """(B, T, H) -> the selected positions: all, the first ``select``, or ``select`` (B, Q) indices per row."""
    if select is None:
        return x
    if isinstance(select, int):
        return x[:, :select]
    return torch.gather(x, 1, select[..., None].expand(-1, -1, x.shape[-1]))


def attention_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) key mask, 1/True = attend -> (B, 1, 1, T) boolean mask as SDPA takes it (None = attend to all)."""
    if mask is None:
        return None
    return mask.to(torch.bool)[:, None, None, :]


class Packing:
    """The positions of a (B, T, ...) sequence batch that the blocks compute, and the moves between three layouts:
    the padded (B, T, ...) one of the stack's input/output, the packed (N, ...) one holding the N computed rows in
    row-major order, and the attention layout (B, S, ...) -- the first S = ``span`` positions, S being one past
    the last computed position of any row (trailing all-padding columns drop out of the attention product)."""

    def __init__(self, compute: torch.Tensor) -> None:
        """``compute`` (B, T) bool: True = computed. Costs a few host syncs (row counts, the span)."""
        self.batch, self.length = compute.shape
        flat = compute.reshape(-1)
        self.rows = flat.nonzero().squeeze(1)  # (N,) indices into the flattened B * T positions
        used = compute.any(dim=0).nonzero()
        self.span = int(used.max()) + 1 if used.numel() else 0
        inner = compute[:, : self.span].reshape(-1)
        self.inner_rows = inner.nonzero().squeeze(1)  # (N,) indices into the flattened B * S positions
        self.inner_gaps = (~inner).nonzero().squeeze(1)  # the other positions of the attention layout
        # slot[b, t] = the packed row of position (b, t); -1 where it is not computed
        self.slot = torch.full_like(flat, -1, dtype=torch.long).index_copy(
            0, self.rows, torch.arange(self.rows.numel(), device=flat.device)
        ).view(self.batch, self.length)

    @property
    def num_rows(self) -> int:
        return self.rows.numel()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (N, C): the computed rows."""
        return x.reshape(self.batch * self.length, x.shape[-1]).index_select(0, self.rows)

    def unpack(self, x: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C) -> (B, T, C), ``fill`` (B, T, C) (default zeros) at the positions that are not computed."""
        width = x.shape[-1]
        base = x.new_zeros(self.batch * self.length, width) if fill is None else fill.reshape(-1, width)
        return base.index_copy(0, self.rows, x).view(self.batch, self.length, width)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, S, C) attention layout, zeros at the positions that are not computed. Written once:
        the computed rows, then zeros into the gaps only."""
        width = x.shape[-1]
        out = x.new_empty(self.batch * self.span, width).index_copy_(0, self.inner_rows, x)
        if self.inner_gaps.numel():
            out = out.index_fill_(0, self.inner_gaps, 0.0)
        return out.view(self.batch, self.span, width)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, C) attention layout -> (N, C) packed."""
        return x.reshape(self.batch * self.span, x.shape[-1]).index_select(0, self.inner_rows)

    def attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The (B, 1, 1, T) key mask cut to the attention layout's S positions."""
        return mask[..., : self.span]

    def take(self, x: torch.Tensor, select: int | torch.Tensor) -> torch.Tensor:
        """Packed (N, C) -> (B, Q, C) at the (computed) positions ``select`` (see ``take``)."""
        if isinstance(select, int):
            index = self.slot[:, :select]
        else:
            index = torch.gather(self.slot, 1, select)
        return x.index_select(0, index.reshape(-1)).view(*index.shape, x.shape[-1])


@dataclass(frozen=True)
class Positions:
    """Which positions a ``TransformerStack`` computes, planned once per forward pass (``Positions.plan``).

    ``mask``: the (B, 1, 1, S) boolean key mask of the attention product (None = attend to all); ``packing``: the
    positions every block computes when padding is skipped (None = all of them); ``select``: the positions the
    last block returns (None = all, k = the first k, a (B, Q) tensor = those indices per row). The stack hands the
    last block this plan and the other blocks its copy without ``select``; a block and its attention read
    the plan only through the moves below, which are identities on the padded (B, T, H) layout."""

    mask: torch.Tensor | None = None
    packing: Packing | None = None
    select: int | torch.Tensor | None = None

    @classmethod
    def plan(
        cls,
        mask: torch.Tensor | None,
        *,
        select: int | torch.Tensor | None = None,
        skip_padding: bool = False,
        needed: torch.Tensor | None = None,
    ) -> Positions:
        """``mask`` (B, T) key mask, 1/True = real token (None = all real). With ``skip_padding`` the blocks compute
        only the real positions plus those whose output is read: ``select`` and ``needed`` ((B, T) bool, e.g.
        labelled positions). Costs a few host syncs when there is padding to skip (see ``Packing``)."""
        bias = attention_bias(mask)
        if not skip_padding or mask is None:
            return cls(mask=bias, select=select)
        compute = mask.to(torch.bool)
        if needed is not None:
            if needed.shape != mask.shape:
                raise ValueError(f"needed has shape {tuple(needed.shape)}; expected {tuple(mask.shape)}")
            compute = compute | needed.to(torch.bool)
        if isinstance(select, int):
            compute = compute.clone()
            compute[:, :select] = True
        elif select is not None:
            compute = compute.scatter(1, select, True)
        packing = Packing(compute)
        if not 0 < packing.num_rows < compute.numel():  # no padding: nothing to skip
            return cls(mask=bias, select=select)
        return cls(mask=packing.attention_mask(bias), packing=packing, select=select)

    def every(self) -> Positions:
        """The plan of a block that returns every position it computes (all but the last)."""
        return replace(self, select=None)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """The stack's input (B, T, H) -> what the blocks compute: (N, H) packed rows, or x itself."""
        if self.packing is None:
            return x
        if tuple(x.shape[:2]) != (self.packing.batch, self.packing.length):
            raise ValueError(
                f"the mask covers {(self.packing.batch, self.packing.length)} positions; the input is {tuple(x.shape)}"
            )
        return self.packing.pack(x)

    def unpack(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The last block's output -> (B, T, H), or (B, Q, H) with ``select``; skipped positions pass ``inputs``."""
        if self.packing is None or self.select is not None:
            return x
        return self.packing.unpack(x, fill=inputs)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """Computed rows -> (B, Q, H) at the ``select``-ed positions (x itself without ``select``)."""
        if self.select is None:
            return x
        return take(x, self.select) if self.packing is None else self.packing.take(x, self.select)

    def attention_shape(self, x: torch.Tensor) -> tuple[int, int]:
        """(B, S) of the attention layout: x's (B, T), or the packing's (B, span)."""
        return (x.shape[0], x.shape[1]) if self.packing is None else (self.packing.batch, self.packing.span)

    def to_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Computed rows (N, C) -> (B, S, C), zeros at skipped positions (x itself when nothing is skipped)."""
        return x if self.packing is None else self.packing.scatter(x)

    def from_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, C) -> the computed rows (N, C) (x itself when nothing is skipped)."""
        return x if self.packing is None else self.packing.gather(x)


EVERY = Positions()  # every position computed and returned, no mask


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, implementation: str = "sdpa") -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)  # [q; k; v] rows
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attention_dropout = cfg.attention_dropout
        self.implementation = implementation

    def forward(self, x: torch.Tensor, positions: Positions = EVERY) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H), or the packed (N, H) rows -> (N, H) (see ``Positions``). With
        ``positions.select`` only those Q positions attend (keys and values still come from every computed
        position), giving (B, Q, H)."""
        width = self.qkv.in_features
        batch, length = positions.attention_shape(x)
        if positions.select is None:
            q, k, v = self._heads(positions.to_attention(self.qkv(x)), batch, length, 3)
            out = self._attend(q, k, v, positions.mask).transpose(1, 2).reshape(batch, length, width)
            return self.proj(positions.from_attention(out))
        weight, bias = self.qkv.weight, self.qkv.bias
        q_bias, kv_bias = (None, None) if bias is None else (bias[:width], bias[width:])
        q = F.linear(positions.take(x), weight[:width], q_bias)  # (B, Q, H)
        k, v = self._heads(positions.to_attention(F.linear(x, weight[width:], kv_bias)), batch, length, 2)
        queries = q.shape[1]
        q = q.view(batch, queries, self.num_heads, self.head_dim).transpose(1, 2)
        out = self._attend(q, k, v, positions.mask).transpose(1, 2).reshape(batch, queries, width)
        return self.proj(out)

    def _heads(self, fused: torch.Tensor, batch: int, length: int, parts: int) -> tuple[torch.Tensor, ...]:
        """(B, T, parts * H) -> ``parts`` x (B, heads, T, head_dim) views. Unbinding the (B, T, parts, heads, d)
        view on its ``parts`` axis makes backward stack the gradients straight into the projection's contiguous
        (B, T, parts * H) layout (a permute first would cost a stack and a copy per block)."""
        split = fused.view(batch, length, parts, self.num_heads, self.head_dim).unbind(2)
        return tuple(t.transpose(1, 2) for t in split)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, heads, Q, d), (B, heads, T, d) x 2 -> (B, heads, Q, d)."""
        dropout = self.attention_dropout if self.training else 0.0
        if self.implementation == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, Q, T)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=self.training)
        return probs @ v


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: TransformerConfig, implementation: str = "sdpa") -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, implementation)
        self.norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, positions: Positions = EVERY) -> torch.Tensor:
        """(B, T, H) -> (B, T, H), or packed (N, H) -> (N, H); (B, Q, H) with ``positions.select``."""
        attended = self.attn(self.norm1(x), positions)
        x = positions.take(x) + self.dropout(attended)
        return x + self.dropout(self.mlp(self.norm2(x)))


class TransformerStack(nn.Module):
    """``num_layers`` blocks and a final LayerNorm. ``forward`` returns ``(pre_norm, post_norm)`` hidden states,
    both (B, T, H) -- or (B, Q, H) when the last block computes some positions only (``Positions.select``): the
    first (CLS) one (all the contrastive loss and the feature API read) or the positions the fusion heads read.
    The other positions of the last block would be discarded; skipping them saves most of that block. With a
    ``Positions.packing`` every block skips the padded positions (module docstring)."""

    def __init__(self, cfg: TransformerConfig, implementation: str = "sdpa") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, implementation) for _ in range(cfg.num_layers))
        self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, positions: Positions = EVERY) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, H); ``positions`` from ``Positions.plan`` (default: every position, no mask)."""
        if not len(self.blocks):  # nothing computed: the selected inputs themselves
            x = take(x, positions.select)
            return x, self.norm(x)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        inputs, x = x, positions.pack(x)  # (N, H) from here on when padding is skipped
        every, last = positions.every(), len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            plan = positions if i == last else every
            # Recompute each block's activations in backward instead of storing them (saves memory, ~1/3 compute).
            x = checkpoint(block, x, plan, use_reentrant=False) if recompute else block(x, plan)
        x = positions.unpack(x, inputs)  # skipped positions pass their input through
        return x, self.norm(x)
