"""``FlavaForPretraining``: the three towers, the five heads, and the per-batch-kind choice of objectives.

The batch kind decides what runs (FLAVA Sec. 3.4):

- ``image``: the image encoder on masked patches -> MIM (codebook ids of the masked patches);
- ``text``: the text encoder on masked tokens -> MLM;
- ``pair``: an unmasked image + text pass -> global contrastive; a masked image + text pass fused by the
  multimodal encoder -> ITM on the multimodal CLS, MMM-image and MMM-text on matched pairs only.

Unlike transformers' FLAVA, image-only and text-only batches run one (masked) encoder pass, not two; a pair batch
runs the unmasked pass only when the contrastive loss is on (and the last block of that pass only for the CLS
position, the one the loss reads) and the masked/fused pass only when ITM or MMM is on (its last block only at the
positions the ITM/MMM heads read: the mm CLS and the masked patches/tokens of matched pairs). Every training pass
with a text padding mask skips the padded positions in the text and multimodal blocks (``skip_padding``, see
``flava.model.layers``): no loss reads them, and labelled positions are always computed. ITM negatives (when the
batch carries no ``itm_labels``) re-pair the already computed text states with other images of the batch, so they
cost no extra text-encoder pass.

Weight decay is the optimizer's business: ``flava.train.optim.param_groups`` (the rule, with
``train.optimizer.no_decay``).

DDP and per-kind heads: each batch kind leaves some parameters without a gradient (the text tower on an image
batch, the MIM head on a pair batch, ...). Either wrap the model with ``find_unused_parameters=True`` or set
``config.touch_unused_parameters`` (``model.touch_unused_parameters = True``), which adds ``0 * sum(p)`` over all
parameters to the loss so every parameter receives a (zero) gradient on every step and DDP's reducer sees a
fixed set (the trainer's way, ``flava.train.unused``).

Batch checks (``config.validate_inputs``, ``flava.model.batch``): ``forward`` checks a batch whose tensors are on
the CPU; a batch on an accelerator is the caller's to check before its copy there (the trainer does).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from flava.distributed import process_info
from flava.model.batch import (
    BATCH_KINDS,
    check_batch_sizes,
    check_images,
    check_text,
    on_host,
    validate_batch,
)
from flava.model.config import OBJECTIVES, FlavaConfig
from flava.model.encoders import ConvStem, EncoderOutput, ImageEncoder, MultimodalEncoder, TextEncoder
from flava.model.heads import ITMHead, MaskedPredictionHead
from flava.model.layers import TransformerStack
from flava.model.losses import (
    IGNORE_INDEX,
    WeightedObjective,
    contrastive_loss,
    itm_loss,
    masked_prediction_loss,
)


@dataclass
class FlavaOutput:
    loss: torch.Tensor  # weighted sum of the objectives computed for this batch
    losses: dict[str, torch.Tensor]  # unweighted objectives by name (only those computed)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached accuracies, logit scale


# Pytree-visible output: FSDP2 (and torch.export) find the output's tensors by flattening it with pytree.
torch.utils._pytree.register_dataclass(FlavaOutput)


class FlavaForPretraining(nn.Module):
    """``seed`` fixes the initial weights and the first ITM negatives: a model never draws from torch's global RNG,
    which threads training concurrently in one process would share."""

    def __init__(self, config: FlavaConfig, codebook: Any = None, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        impl = config.attention
        img, txt, mm = config.image, config.text, config.multimodal
        self.image_encoder = ImageEncoder(img, impl)
        self.text_encoder = TextEncoder(txt, impl)
        self.multimodal_encoder = MultimodalEncoder(mm, img.hidden_size, txt.hidden_size, impl)
        self.image_projection = nn.Linear(img.hidden_size, config.projection_dim)
        self.text_projection = nn.Linear(txt.hidden_size, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        # An objective's head uses the eps/activation of the tower whose vocabulary it predicts (as transformers).
        self.mim_head = MaskedPredictionHead(img.hidden_size, config.codebook_size, img.layer_norm_eps, img.hidden_act)
        self.mlm_head = MaskedPredictionHead(txt.hidden_size, txt.vocab_size, txt.layer_norm_eps, txt.hidden_act)
        self.mmm_image_head = MaskedPredictionHead(
            mm.hidden_size, config.codebook_size, img.layer_norm_eps, img.hidden_act
        )
        self.mmm_text_head = MaskedPredictionHead(mm.hidden_size, txt.vocab_size, txt.layer_norm_eps, txt.hidden_act)
        self.itm_head = ITMHead(mm.hidden_size)
        self.objective = WeightedObjective({name: config.loss.weight(name) for name in OBJECTIVES})
        self.touch_unused_parameters = config.touch_unused_parameters
        self.validate_inputs = config.validate_inputs
        # (rank, world_size) for the global contrastive loss; None = read from flava.distributed.process_info().
        self.process_group_info: tuple[int, int] | None = None
        self.seed = seed
        # Draws the in-batch ITM negatives when forward() gets no generator; a trainer re-seeds it per rank and
        # keeps its state in the checkpoint, so a resumed run draws the negatives an uninterrupted one would.
        self.itm_generator = torch.Generator().manual_seed(seed)
        self.reset_parameters()
        self.set_activation_checkpointing(config.activation_checkpointing)
        self.codebook = codebook

    # ----------------------------------------------------------------------------------------------- setup
    @property
    def codebook(self):
        """The image tokenizer giving MIM targets. Held outside the module tree: it is frozen, is not part of
        ``state_dict()`` (``flava.model.io`` saves it beside the weights) and never reaches the optimizer."""
        return self.__dict__.get("_codebook")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "codebook":  # route through the property: a DalleCodebook must not become a submodule
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @codebook.setter
    def codebook(self, codebook: Any) -> None:
        if codebook is not None and int(codebook.num_codes) != self.config.codebook_size:
            raise ValueError(
                f"codebook has {codebook.num_codes} codes but config.codebook_size is {self.config.codebook_size}"
            )
        self.__dict__["_codebook"] = codebook

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter from ``generator`` (default: a fresh one seeded with ``self.seed``)."""
        gen = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std, generator=gen)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std, generator=gen)
                if module.padding_idx is not None:
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if isinstance(self.image_encoder.patch_embed, ConvStem):
            self.image_encoder.patch_embed.reset_parameters(gen)
        for name, param in self.named_parameters():
            if name.endswith(("cls_token", "mask_token")) or name.endswith("image_encoder.position_embeddings"):
                nn.init.trunc_normal_(param, std=std, a=-2 * std, b=2 * std, generator=gen)
        with torch.no_grad():
            self.logit_scale.fill_(self.config.logit_scale_init)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each transformer block in backward (less activation memory, ~30 % more compute)."""
        for module in self.modules():
            if isinstance(module, TransformerStack):
                module.activation_checkpointing = bool(enabled)

    # -------------------------------------------------------------------------------------- feature API
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H_img) image CLS hidden state (after the final LayerNorm)."""
        check_images(self.config.image, pixel_values, "pixel_values")
        return self.image_encoder(pixel_values, cls_only=True).cls

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, H_txt) text CLS hidden state."""
        check_text(self.config.text, input_ids, attention_mask)
        return self.text_encoder(input_ids, attention_mask, cls_only=True).cls

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, projection_dim), L2-normalised (zero-shot classification, retrieval)."""
        return F.normalize(self.image_projection(self.image_features(pixel_values)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, projection_dim), L2-normalised."""
        return F.normalize(self.text_projection(self.text_features(input_ids, attention_mask)), dim=-1)

    def fuse(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> EncoderOutput:
        """The multimodal encoder's output over (image, text) pairs (unmasked inputs)."""
        check_images(self.config.image, pixel_values, "pixel_values")
        check_text(self.config.text, input_ids, attention_mask)
        check_batch_sizes({"pixel_values": pixel_values, "input_ids": input_ids})
        image = self.image_encoder(pixel_values)
        text = self.text_encoder(input_ids, attention_mask)
        mm = self.multimodal_encoder
        return mm(mm.fusion_states(image), mm.fusion_states(text), attention_mask)

    def multimodal_features(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """-> (B, H_mm) multimodal CLS hidden state (VQA and other fused fine-tuning)."""
        return self.fuse(pixel_values, input_ids, attention_mask).cls

    def itm_logits(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """-> (B, 2) image-text matching logits; class 1 = matched."""
        return self.itm_head(self.multimodal_features(pixel_values, input_ids, attention_mask))

    # ---------------------------------------------------------------------------------------- training
    def forward(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None) -> FlavaOutput:
        """One batch (see docs/interfaces.md) -> the weighted loss and its unweighted parts.

        ``generator`` draws the in-batch ITM negatives of pair batches without ``itm_labels`` (CPU generator;
        default: ``self.itm_generator``)."""
        kind = batch.get("kind")
        if kind not in BATCH_KINDS:
            raise ValueError(f"batch['kind'] must be one of {BATCH_KINDS}, got {kind!r}")
        if self.validate_inputs and on_host(batch):  # a device batch was checked before its copy (flava.model.batch)
            validate_batch(self.config, batch, has_codebook=self.codebook is not None)
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        if kind == "image":
            self._image_objectives(batch, losses, metrics)
        elif kind == "text":
            self._text_objectives(batch, losses, metrics)
        else:
            self._pair_objectives(batch, losses, metrics, generator if generator is not None else self.itm_generator)
        loss = self.objective(losses) if losses else self._zero()
        if self.touch_unused_parameters:
            loss = loss + self._zero()
        return FlavaOutput(loss=loss, losses=losses, metrics=metrics)

    def _zero(self) -> torch.Tensor:
        """0 * sum of every trainable parameter: an exact zero through which every parameter gets a gradient."""
        return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)

    def _weight(self, name: str) -> bool:
        return self.objective.enabled(name)

    def _world_size(self) -> int:
        return (self.process_group_info or _process_group())[1]

    def _image_objectives(self, batch, losses, metrics) -> None:
        if not self._weight("mim"):
            return
        mask = batch["image_mask"].to(torch.bool)
        labels = self.mim_targets(batch).masked_fill(~mask, IGNORE_INDEX)  # (B, P)
        out = self.image_encoder(batch["pixel_values"], mask)
        losses["mim"], metrics["mim_acc"] = masked_prediction_loss(
            self.mim_head, out.hidden[:, 1:], labels, world_size=self._world_size()
        )

    def _text_objectives(self, batch, losses, metrics) -> None:
        if not self._weight("mlm"):
            return
        labels = batch["mlm_labels"]
        out = self.text_encoder(
            batch["input_ids_masked"], batch.get("attention_mask"), skip_padding=True, needed=labels != IGNORE_INDEX
        )
        losses["mlm"], metrics["mlm_acc"] = masked_prediction_loss(
            self.mlm_head, out.hidden, labels, world_size=self._world_size()
        )

    def _pair_objectives(self, batch, losses, metrics, generator) -> None:
        pixel_values = batch["pixel_values"]
        given_itm = batch.get("itm_labels")
        # Rows known to be matched pairs. With given ITM labels and no positive at all, every row counts
        # (transformers' convention, kept for parity).
        matched = None
        if given_itm is not None:
            positives = given_itm.ne(0)
            matched = positives | ~positives.any()
        fused_pass = self._weight("itm") or self._weight("mmm_image") or self._weight("mmm_text")
        # Both image passes embed the same pixels: the patch embedding (a conv) runs once for the two.
        patches = self.image_encoder.patchify(pixel_values) if self._weight("contrastive") and fused_pass else None
        logits = None
        if self._weight("contrastive"):
            logits = self._contrastive_objective(batch, patches, matched, losses, metrics)
        if fused_pass:
            self._fused_objectives(batch, patches, matched, generator, losses, metrics, logits)

    def _contrastive_objective(self, batch, patches, matched, losses, metrics) -> torch.Tensor | None:
        """The unmasked image and text passes -> the global contrastive loss over the ``matched`` rows. Returns
        the local (B, B) image -> text logits, detached, when hard ITM negatives are drawn from them; else None."""
        # Only the CLS states are needed: the last block of each tower runs for that one position.
        image = self.image_encoder(batch["pixel_values"], cls_only=True, patches=patches)
        text = self.text_encoder(batch["input_ids"], batch.get("attention_mask"), cls_only=True, skip_padding=True)
        image_emb = F.normalize(self.image_projection(image.cls), dim=-1)
        text_emb = F.normalize(self.text_projection(text.cls), dim=-1)
        rank, world_size = self.process_group_info or _process_group()
        losses["contrastive"], metrics["contrastive_acc"] = contrastive_loss(
            image_emb, text_emb, self._clamped_logit_scale(), rank=rank, world_size=world_size, rows=matched
        )
        metrics["logit_scale"] = self.logit_scale.detach().clone()
        if self.config.loss.itm_negatives != "hard":
            return None
        # Not _clamped_logit_scale(): its in-place clamp would bump the parameter's version under the loss's graph.
        scale = self.logit_scale.detach().clamp(self.config.logit_scale_min, self.config.logit_scale_max).float().exp()
        return scale * image_emb.detach().float() @ text_emb.detach().float().t()

    def _fused_objectives(self, batch, patches, matched, generator, losses, metrics, logits=None) -> None:
        """The masked image and text passes fused by the multimodal encoder -> ITM, MMM-image, MMM-text."""
        pixel_values, attention_mask = batch["pixel_values"], batch.get("attention_mask")
        image_mask = batch.get("image_mask")
        image_mask = image_mask.to(torch.bool) if image_mask is not None else None
        masked_ids = batch.get("input_ids_masked", batch["input_ids"])
        image = self.image_encoder(pixel_values, image_mask, patches=patches)
        mlm_labels = batch.get("mlm_labels")
        text = self.text_encoder(
            masked_ids,
            attention_mask,
            skip_padding=True,
            needed=mlm_labels != IGNORE_INDEX if mlm_labels is not None and self._weight("mmm_text") else None,
        )
        mm = self.multimodal_encoder
        text_states, text_mask = mm.fusion_states(text), attention_mask
        itm_labels = batch.get("itm_labels")
        if itm_labels is None and self._weight("itm"):
            itm_labels, text_index = self._itm_negatives(
                pixel_values.shape[0], generator, pixel_values.device, logits=logits, input_ids=batch["input_ids"])
            # Row i now holds caption text_index[i]. index_select, not text_states[text_index]: a caption appears
            # twice (its own row and a negative), and the backward of advanced indexing with repeated indices on
            # CPU adds with parallel atomics in thread-timing order (different bits each run); index_select's
            # backward adds row by row.
            text_states = text_states.index_select(0, text_index)
            text_mask = text_mask[text_index] if text_mask is not None else None
            matched = itm_labels.bool()
        # Labels first: they decide which fused positions the heads read.
        image_labels, text_labels = self._fused_labels(batch, image_mask, matched, masked_ids.shape[1])
        full = 2 + self.config.image.num_patches + masked_ids.shape[1]
        select = self._fused_positions(pixel_values.shape[0], full, image_labels, text_labels, pixel_values.device)
        fused = mm(mm.fusion_states(image), text_states, text_mask, select=select, skip_padding=True)  # (B, S|Q, H)
        if select is not None:
            image_labels = torch.gather(image_labels, 1, select) if image_labels is not None else None
            text_labels = torch.gather(text_labels, 1, select) if text_labels is not None else None

        if self._weight("itm"):
            losses["itm"], metrics["itm_acc"] = itm_loss(self.itm_head(fused.cls), itm_labels)
        if image_labels is not None:
            losses["mmm_image"], metrics["mmm_image_acc"] = masked_prediction_loss(
                self.mmm_image_head, fused.hidden, image_labels, world_size=self._world_size()
            )
        if text_labels is not None:
            losses["mmm_text"], metrics["mmm_text_acc"] = masked_prediction_loss(
                self.mmm_text_head, fused.hidden, text_labels, world_size=self._world_size()
            )

    def _fused_labels(
        self, batch, image_mask: torch.Tensor | None, matched: torch.Tensor | None, length: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The MMM-image and MMM-text labels (None when that loss is off), each (B, S) over the fused positions:
        0 = mm CLS (ITM), 1 = image CLS, 2 .. 1 + P = patches (MMM-image), then the T text tokens (MMM-text).
        Only ``matched`` rows (None = all) keep labels."""
        num_patches = self.config.image.num_patches
        image_labels = text_labels = None
        if self._weight("mmm_image"):
            image_labels = self.mim_targets(batch).masked_fill(~image_mask, IGNORE_INDEX)  # (B, P)
            if matched is not None:
                image_labels = image_labels.masked_fill(~matched[:, None], IGNORE_INDEX)
            image_labels = F.pad(image_labels, (2, length), value=IGNORE_INDEX)
        if self._weight("mmm_text"):
            text_labels = batch["mlm_labels"]  # matched rows keep their own caption: row i's labels still apply
            if matched is not None:
                text_labels = text_labels.masked_fill(~matched[:, None], IGNORE_INDEX)
            text_labels = F.pad(text_labels, (2 + num_patches, 0), value=IGNORE_INDEX)
        return image_labels, text_labels

    @staticmethod
    def _fused_positions(
        batch_size: int,
        full: int,
        image_labels: torch.Tensor | None,
        text_labels: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor | None:
        """(B, Q) ascending fused positions the heads read (the mm CLS + every position with a label), padded per
        row with unread ones; None when that is (nearly) every position. The last multimodal block then runs for
        these Q positions only, as its other outputs would be discarded."""
        needed = torch.zeros(batch_size, full, dtype=torch.bool, device=device)
        needed[:, 0] = True
        for labels in (image_labels, text_labels):
            if labels is not None:
                needed |= labels != IGNORE_INDEX
        count = int(needed.sum(dim=1).max())  # one host sync (the heads' boolean selection syncs anyway)
        if count > 0.75 * full:
            return None
        # stable sort puts the needed positions first, each group in ascending order
        return torch.argsort((~needed).to(torch.int8), dim=1, stable=True)[:, :count]

    def _itm_negatives(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device, *,
        logits: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Swap a fraction ``loss.itm_negative_prob`` of captions for another caption of the batch: uniformly, or,
        given the (B, B) contrastive ``logits``, drawn with probability softmax(logits[i]) over the captions that
        differ from row i's own (``input_ids``); a row with no such caption stays matched.

        Returns (itm_labels (B,) long, 1 = matched; text_index (B,) long: the caption row paired with image i)."""
        rows = torch.arange(batch_size)
        if batch_size < 2:
            return torch.ones(batch_size, dtype=torch.long, device=device), rows.to(device)
        negative = torch.rand(batch_size, generator=generator) < self.config.loss.itm_negative_prob
        if logits is None:
            shift = torch.randint(1, batch_size, (batch_size,), generator=generator)  # never pairs i with itself
            text_index = torch.where(negative, (rows + shift) % batch_size, rows)
            return (~negative).long().to(device), text_index.to(device)
        ids = input_ids.cpu()
        other = (ids[:, None, :] != ids[None, :, :]).any(dim=-1)  # (B, B): caption j is not row i's caption
        negative &= other.any(dim=1)
        weights = torch.softmax(logits.cpu().float().masked_fill(~other, float("-inf")), dim=1)
        text_index = rows.clone()
        if bool(negative.any()):
            text_index[negative] = torch.multinomial(weights[negative], 1, generator=generator).squeeze(1)
        return (~negative).long().to(device), text_index.to(device)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the logit-scale parameter into [logit_scale_min, logit_scale_max] in place (CLIP/FLAVA), so its
        gradient never dies outside the clamp. Done in every training forward; a trainer whose parameters are
        sharded (FSDP) should also call it after each optimizer step."""
        self.logit_scale.clamp_(self.config.logit_scale_min, self.config.logit_scale_max)

    def _clamped_logit_scale(self) -> torch.Tensor:
        if self.training:
            self.clamp_logit_scale_()
        return self.logit_scale.clamp(self.config.logit_scale_min, self.config.logit_scale_max)

    @torch.no_grad()
    def mim_targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """(B, num_patches) codebook ids: ``batch['mim_labels']`` if given, else the codebook applied to
        ``codebook_pixel_values`` (or ``pixel_values``)."""
        if batch.get("mim_labels") is not None:
            return batch["mim_labels"].reshape(batch["mim_labels"].shape[0], -1).long()
        if self.codebook is None:
            raise ValueError("MIM/MMM-image targets need a codebook (FlavaForPretraining(cfg, codebook)) or "
                             "batch['mim_labels'] (B, num_patches)")
        source = batch.get("codebook_pixel_values")
        source = batch["pixel_values"] if source is None else source
        ids = self.codebook(source).reshape(source.shape[0], -1).long()
        expected = (source.shape[0], self.config.image.num_patches)
        if tuple(ids.shape) != expected:
            name = "codebook_pixel_values" if batch.get("codebook_pixel_values") is not None else "pixel_values"
            raise ValueError(
                f"the codebook turned {name} {tuple(source.shape)} into {tuple(ids.shape)} token ids; expected "
                f"{expected} (one per image patch)"
            )
        return ids


def _process_group() -> tuple[int, int]:
    info = process_info()
    return info.rank, info.world_size


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["BATCH_KINDS", "FlavaForPretraining", "FlavaOutput", "count_parameters"]
