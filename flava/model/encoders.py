"""The three FLAVA towers: a ViT image encoder, a BERT-style text encoder and the multimodal fusion encoder.

Each returns an ``EncoderOutput`` with the last hidden state before (``pre_norm``) and after (``hidden``) the
tower's final LayerNorm. FLAVA fuses the pre-norm states (Sec. 3.1 of the paper and transformers' code) and puts
its heads and contrastive projections on the normalised ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flava.model.config import ImageEncoderConfig, MultimodalEncoderConfig, TextEncoderConfig
from flava.model.layers import LayerNorm, Positions, TransformerStack


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # (B, T, H) after the final LayerNorm
    pre_norm: torch.Tensor  # (B, T, H) before it
    mask: torch.Tensor | None = None  # (B, T) key mask (1 = real token) or None for "all real"

    @property
    def cls(self) -> torch.Tensor:  # (B, H)
        return self.hidden[:, 0]


class ConvStem(nn.Sequential):
    """Pixels -> the patch grid through stride-2 3x3 convolutions (GroupNorm over each sample's channels and
    positions, then GELU) and a 1x1 projection to the tower width: ``stem: conv`` of ``ImageEncoderConfig``.
    Per-sample normalisation keeps a sample's tokens independent of the rest of its batch (unlike BatchNorm)."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        layers: list[nn.Module] = []
        widths = (cfg.num_channels, *cfg.stem_channels)
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       nn.GroupNorm(1, c_out, eps=cfg.layer_norm_eps), nn.GELU()]
        layers.append(nn.Conv2d(widths[-1], cfg.hidden_size, 1))
        super().__init__(*layers)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """He-normal 3x3 convolutions (fan-in, for GELU's near-ReLU gain), unit GroupNorms; the 1x1 projection
        keeps the model-wide initialisation that ``FlavaForPretraining`` gives every linear map."""
        for module in list(self)[:-1]:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def patch_stem(cfg: ImageEncoderConfig) -> nn.Module:
    """(B, C, H, W) -> (B, hidden, H / patch, W / patch), as ``cfg.stem`` chooses."""
    if cfg.stem == "conv":
        return ConvStem(cfg)
    return nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)


class ImageEncoder(nn.Module):
    """Patch embedding (a strided conv, or a convolutional stem), a CLS token and learned positions, then the
    shared stack.

    With ``image_mask`` (B, num_patches; True = masked) the masked patches' embeddings are replaced by the learned
    ``mask_token`` before positions are added (BEiT-style masked image modelling inputs)."""

    def __init__(self, cfg: ImageEncoderConfig, implementation: str = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = patch_stem(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size))
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = TransformerStack(cfg, implementation)

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, P, H) patch embeddings (before masking, CLS and positions)."""
        return self.patch_embed(pixel_values).flatten(2).transpose(1, 2)

    def embed(
        self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None, patches: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``patches``: ``patchify(pixel_values)`` when the caller already has it (a pair batch's two passes)."""
        x = self.patchify(pixel_values) if patches is None else patches  # (B, P, H)
        if image_mask is not None:
            x = torch.where(image_mask[..., None].to(torch.bool), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + P, H)
        return self.dropout(x + self.position_embeddings.to(x.dtype))

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        cls_only: bool = False,
        patches: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """-> states (B, 1 + P, H), or (B, 1, H) with ``cls_only`` (see ``TransformerStack``); ``patches`` as in
        ``embed``."""
        positions = Positions(select=1 if cls_only else None)
        pre, post = self.encoder(self.embed(pixel_values, image_mask, patches), positions)
        return EncoderOutput(hidden=post, pre_norm=pre)


class TextEncoder(nn.Module):
    """Word + position + token-type embeddings and a LayerNorm (BERT), then the shared pre-norm stack."""

    def __init__(self, cfg: TextEncoderConfig, implementation: str = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        # Kept for checkpoint compatibility with BERT/FLAVA weights; single-segment inputs use row 0.
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embed_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = TransformerStack(cfg, implementation)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.word_embeddings(input_ids)
        x = x + self.position_embeddings.weight[:length] + self.token_type_embeddings.weight[0]
        return self.dropout(self.embed_norm(x))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cls_only: bool = False,
        skip_padding: bool = False,
        needed: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """-> states (B, T, H), or (B, 1, H) with ``cls_only``. ``skip_padding``: the blocks skip the padded
        positions except the ``needed`` ones ((B, T) bool), whose states then pass the embeddings through
        (see ``flava.model.layers``); the training forward uses it, the feature API does not."""
        positions = Positions.plan(
            attention_mask, select=1 if cls_only else None, skip_padding=skip_padding, needed=needed
        )
        pre, post = self.encoder(self.embed(input_ids), positions)
        return EncoderOutput(hidden=post, pre_norm=pre, mask=attention_mask)


class MultimodalEncoder(nn.Module):
    """Projects image and text states into the fusion width, prepends a multimodal CLS token and runs the
    shared stack over ``[mm CLS, image CLS, patches..., text tokens...]`` with the text padding mask."""

    def __init__(
        self,
        cfg: MultimodalEncoderConfig,
        image_width: int,
        text_width: int,
        implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_input = nn.Linear(image_width, cfg.hidden_size)
        self.text_input = nn.Linear(text_width, cfg.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.encoder = TransformerStack(cfg, implementation)

    def fusion_states(self, out: EncoderOutput) -> torch.Tensor:
        return out.pre_norm if self.cfg.fusion_input == "pre_norm" else out.hidden

    def forward(
        self,
        image_states: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
        skip_padding: bool = False,
    ) -> EncoderOutput:
        """``image_states`` (B, 1 + P, H_img), ``text_states`` (B, T, H_txt), ``text_mask`` (B, T) or None ->
        states (B, 1 + (1 + P) + T, H_mm), or (B, Q, H_mm) at the positions ``select`` (B, Q) only.
        ``skip_padding``: the blocks skip the padded text positions not in ``select`` (``flava.model.layers``)."""
        image = self.image_input(image_states)
        text = self.text_input(text_states)
        batch = image.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1).to(image.dtype), image, text], dim=1)
        mask = None
        if text_mask is not None:
            # Every image position (and the mm CLS) is real; text positions follow the padding mask.
            ones = torch.ones(batch, 1 + image.shape[1], dtype=text_mask.dtype, device=text_mask.device)
            mask = torch.cat([ones, text_mask], dim=1)
        pre, post = self.encoder(x, Positions.plan(mask, select=select, skip_padding=skip_padding))
        return EncoderOutput(hidden=post, pre_norm=pre, mask=mask)
