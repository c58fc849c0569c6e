"""Test doubles for the evaluation tests (no tests here): a colour world, a tokenizer and an oracle model.

The world: class ``c`` is a colour; its images are solid squares of that colour (with a little noise) and its name
is a single word. The oracle model embeds an image by its mean colour and a text by the sum of its word
embeddings, where each colour word points at its colour's direction -- so zero-shot, retrieval, probe and
fine-tunes all have a known right answer.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BertTokenizerFast

COLOURS = {
    "red": (220, 20, 20),
    "green": (20, 200, 40),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 30),
    "purple": (150, 30, 170),
    "cyan": (30, 210, 210),
}
FILLER = ["a", "photo", "of", "the", "picture", "shape", "what", "colour", "is", "it", "this", "nice", "square"]
TEMPLATES = ["a photo of a {}.", "a picture of the {} shape.", "{}"]
IMAGE_SIZE = 8


def make_tokenizer(directory: Path) -> BertTokenizerFast:
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?"] + FILLER + list(COLOURS)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _colour_matrix() -> torch.Tensor:
    return torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0  # (C, 3)


class OracleModel(torch.nn.Module):
    """``encode_image``/``encode_text`` in a shared P-dim space; features for probes and fine-tunes."""

    def __init__(self, tokenizer: BertTokenizerFast, dim: int = 16, seed: int = 0, noise: float = 0.05):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.image_proj = torch.nn.Linear(3, dim, bias=False)
        with torch.no_grad():
            self.image_proj.weight.copy_(torch.randn(dim, 3, generator=gen))
        self.token_embedding = torch.nn.Embedding(len(tokenizer), dim)
        with torch.no_grad():
            self.token_embedding.weight.copy_(noise * torch.randn(len(tokenizer), dim, generator=gen))
            colours = _colour_matrix()
            # Centre the colours so that directions differ (all-positive RGB would be nearly collinear).
            centred = colours - colours.mean(0, keepdim=True)
            for i, name in enumerate(COLOURS):
                token = tokenizer.convert_tokens_to_ids(name)
                self.token_embedding.weight[token] = self.image_proj(centred[i])
        self.register_buffer("colour_mean", colours.mean(0))
        self.mm = torch.nn.Linear(2 * dim, dim)

    def _pool_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.mean(dim=(2, 3)) - self.colour_mean  # (B, 3)

    def image_features(self, pixel_values):
        return self.image_proj(self._pool_image(pixel_values))

    def text_features(self, input_ids, attention_mask):
        emb = self.token_embedding(input_ids) * attention_mask[..., None]
        return emb.sum(dim=1)

    def encode_image(self, pixel_values):
        return F.normalize(self.image_features(pixel_values), dim=-1)

    def encode_text(self, input_ids, attention_mask):
        return F.normalize(self.text_features(input_ids, attention_mask), dim=-1)

    def multimodal_features(self, pixel_values, input_ids, attention_mask):
        return self.mm(torch.cat([self.image_features(pixel_values), self.text_features(input_ids, attention_mask)], -1))


def _image(path: Path, rgb, rng: np.random.Generator) -> str:
    arr = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 8, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return str(path)


def write_eval_root(root: Path, per_class: int = 4, seed: int = 0, relative: bool = True) -> Path:
    """The prepared eval layout of docs/interfaces.md over the colour world."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    (root / "zeroshot").mkdir(parents=True, exist_ok=True)
    (root / "zeroshot" / "classes.json").write_text(json.dumps({"classnames": names, "templates": TEMPLATES}))

    def img(rel: str, rgb) -> str:
        full = _image(root / rel, rgb, rng)
        return rel if relative else full

    for split in ("train", "val", "test"):
        rows = [
            {"image": img(f"images/zs_{split}_{c}_{i}.png", COLOURS[n]), "label": c}
            for c, n in enumerate(names) for i in range(per_class)
        ]
        (root / "zeroshot" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "retrieval").mkdir(exist_ok=True)
    rows = [
        {"image": img(f"images/ret_{n}.png", COLOURS[n]),
         "captions": [t.format(n) for t in TEMPLATES] + [f"this is {n}.", f"nice {n} square."]}
        for n in names
    ]
    (root / "retrieval" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "text_cls").mkdir(exist_ok=True)
    (root / "vqa").mkdir(exist_ok=True)
    for split in ("train", "val", "test"):
        lines = ["sentence\tlabel"]
        vqa = []
        for c, n in enumerate(names):
            for i in range(per_class):
                lines.append(f"{TEMPLATES[i % len(TEMPLATES)].format(n)}\t{c % 2}")
                vqa.append({"image": img(f"images/vqa_{split}_{n}_{i}.png", COLOURS[n]),
                            "question": "what colour is it?", "answer": n})
        (root / "text_cls" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        (root / "vqa" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vqa))
    return root
