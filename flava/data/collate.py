"""Turn raw shard samples into one training batch (the dict layout of docs/interfaces.md).

Per batch: decode + transform images, draw a BEiT block mask per image (``image_mask``, True = masked), tokenise
the texts to a fixed (or longest) length and apply BERT masking (``input_ids_masked``, ``mlm_labels``). All random
choices come from the one ``torch.Generator`` passed in, so a batch is a pure function of its samples and seed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from flava.data.masking import bert_mask, block_mask
from flava.data.stream_config import MaskingConfig
from flava.data.transforms import ImageTransform, decode_image

IMAGE_EXTS = ("png", "jpg", "jpeg")
# The corpora (prepared files, shard folders, sampling ratios) and the batch kind each one yields; one table,
# read both ways.
KIND_OF_CORPUS = {"pairs": "pair", "images": "image", "text": "text"}
CORPUS_OF_KIND = {kind: corpus for corpus, kind in KIND_OF_CORPUS.items()}


@dataclass
class Collator:
    kind: str  # "pair" | "image" | "text"
    transform: ImageTransform | None
    grid: tuple[int, int] | None  # patch grid of the image encoder
    masking: MaskingConfig
    tokenizer: Any = None  # a transformers fast tokenizer (BERT specials)
    max_length: int = 32
    pad_to_max_length: bool = True
    include_keys: bool = False
    # dVAE codebook view (DALL-E): same crop/flip at the codebook's resolution, pixels in [0, 1] mapped to
    # [eps, 1 - eps] as the DALL-E encoder expects; None when the codebook reads ``pixel_values``.
    codebook_transform: ImageTransform | None = None
    codebook_eps: float = 0.1

    def __post_init__(self):
        if self.kind not in ("pair", "image", "text"):
            raise ValueError(f"batch kind must be pair, image or text, got {self.kind!r}")
        if self.kind != "text" and (self.transform is None or self.grid is None):
            raise ValueError(f"{self.kind} batches need an image transform and a patch grid")
        if self.kind != "image":
            if self.tokenizer is None:
                raise ValueError(f"{self.kind} batches need a tokenizer")
            if self.tokenizer.mask_token_id is None or self.tokenizer.pad_token_id is None:
                raise ValueError("the tokenizer needs [MASK] and [PAD] tokens")
            self._special = sorted(set(self.tokenizer.all_special_ids))
            self._vocab = len(self.tokenizer)

    def __call__(self, samples: list, generator: torch.Generator) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        batch: dict[str, Any] = {"kind": self.kind}
        if self.kind in ("pair", "image"):
            pixels, masks, codebook_pixels = [], [], []
            for s in samples:
                ext = next((e for e in IMAGE_EXTS if e in s.files), None)
                if ext is None:
                    raise ValueError(f"sample {s.key!r} has no image ({'/'.join(IMAGE_EXTS)})")
                img = decode_image(s.files[ext])
                box, flip = self.transform.draw(img.size, generator)
                pixels.append(self.transform.render_uint8(img, box, flip))
                if self.codebook_transform is not None:
                    codebook_pixels.append(self.codebook_transform.render_uint8(img, box, flip))
                masks.append(block_mask(
                    self.grid, mask_ratio=self.masking.image_mask_ratio,
                    min_block_patches=self.masking.min_block_patches,
                    max_block_patches=self.masking.max_block_patches, min_aspect=self.masking.min_aspect,
                    generator=generator,
                ))
            batch["pixel_values"] = self.transform.normalise(torch.stack(pixels))  # (B, 3, H, W) float
            batch["image_mask"] = torch.stack(masks)  # (B, num_patches) bool
            if codebook_pixels:
                view = torch.stack(codebook_pixels).float().div_(255.0)  # (B, 3, H', W') in [0, 1]
                batch["codebook_pixel_values"] = view * (1 - 2 * self.codebook_eps) + self.codebook_eps
        if self.kind in ("pair", "text"):
            texts = []
            for s in samples:
                if "txt" not in s.files:
                    raise ValueError(f"sample {s.key!r} has no txt")
                texts.append(s.files["txt"].decode("utf-8"))
            enc = self.tokenizer(
                texts, max_length=self.max_length, truncation=True,
                padding="max_length" if self.pad_to_max_length else "longest",
                return_tensors="pt", return_token_type_ids=False,
            )
            input_ids = enc["input_ids"].long()  # (B, T)
            attention_mask = enc["attention_mask"].long()
            masked, labels = bert_mask(
                input_ids, attention_mask, special_ids=self._special, vocab_size=self._vocab,
                mask_token_id=self.tokenizer.mask_token_id, prob=self.masking.text_mask_prob,
                mask_fraction=self.masking.mask_token_fraction,
                random_fraction=self.masking.random_token_fraction, min_masked=self.masking.min_masked_tokens,
                generator=generator,
            )
            batch.update(input_ids=input_ids, input_ids_masked=masked, attention_mask=attention_mask,
                         mlm_labels=labels)
        if self.include_keys:
            batch["keys"] = [json.loads(s.files["json"]).get("key", s.key) if "json" in s.files else s.key
                             for s in samples]
        return batch
