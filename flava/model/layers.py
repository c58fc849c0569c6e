"""The pre-norm transformer block shared by the image, text and multimodal towers.

One block = ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (ViT/FLAVA pre-norm). Attention projects q, k, v
with one fused linear layer and runs either PyTorch's fused ``scaled_dot_product_attention`` (``"sdpa"``, the
default: flash / memory-efficient kernels where the device has them) or the explicit softmax(QK^T/sqrt(d))V
(``"eager"``, the reference path transformers' FLAVA uses). ``TransformerStack`` runs the blocks, optionally
under activation checkpointing, and returns the last hidden state both before and after its final LayerNorm:
FLAVA feeds the former to the multimodal encoder and the latter to the heads.
"""
from __future__ import annotations

import math
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


Select = "int | torch.Tensor | None"  # query positions: None = all, k = the first k, (B, Q) tensor = gathered


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


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, implementation: str = "sdpa") -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)  # [q; k; v] rows
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attention_dropout = cfg.attention_dropout
        self.implementation = implementation

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, select: Select = None) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); with ``select`` (see ``take``) only those Q positions attend (keys and
        values still come from all T), giving (B, Q, H)."""
        batch, length, width = x.shape
        if select is None:
            # (B, T, 3, heads, head_dim) -> 3 x (B, heads, T, head_dim)
            q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            weight, bias = self.qkv.weight, self.qkv.bias
            q_bias, kv_bias = (None, None) if bias is None else (bias[:width], bias[width:])
            q = F.linear(take(x, select), weight[:width], q_bias)  # (B, Q, H)
            k, v = F.linear(x, weight[width:], kv_bias).view(batch, length, 2, self.num_heads, self.head_dim).permute(
                2, 0, 3, 1, 4
            )
            length = q.shape[1]
            q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        dropout = self.attention_dropout if self.training else 0.0
        if self.implementation == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, T, T)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=self.training)
            out = probs @ v
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, select: Select = None) -> torch.Tensor:
        """(B, T, H) -> (B, T, H), or (B, Q, H): the block's output at the ``select``-ed positions only."""
        attended = self.attn(self.norm1(x), mask, select)
        x = take(x, select)
        x = x + self.dropout(attended)
        return x + self.dropout(self.mlp(self.norm2(x)))


class TransformerStack(nn.Module):
    """``num_layers`` blocks and a final LayerNorm. ``forward`` returns ``(pre_norm, post_norm)`` hidden states,
    both (B, T, H) -- or (B, Q, H) when the last block computes some positions only: the first (CLS) one with
    ``cls_only`` (all the contrastive loss and the feature API read) or the (B, Q) indices ``last_select`` (the
    positions the fusion heads read). The other positions of the last block would be discarded; skipping them
    saves most of that block."""

    def __init__(self, cfg: TransformerConfig, implementation: str = "sdpa") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, implementation) for _ in range(cfg.num_layers))
        self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.activation_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cls_only: bool = False,
        last_select: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            select = (1 if cls_only else last_select) if i == last else None
            # Recompute each block's activations in backward instead of storing them (saves memory, ~1/3 compute).
            if recompute:
                x = checkpoint(block, x, mask, select, use_reentrant=False)
            else:
                x = block(x, mask, select)
        if not len(self.blocks):
            x = take(x, 1 if cls_only else last_select)
        return x, self.norm(x)
