"""Image tokenizers that turn pixels into MIM targets: one codebook id per image patch.

- ``KMeansCodebook``: k-means (k-means++ seeding, Lloyd iterations) over a descriptor of each image patch, fit
  on the user's own images in seconds; the embedded default. The descriptor is the patch's normalised pixels
  (``pixels``: codes of colour and texture) or a histogram of its gradient orientations (``hog``: Dalal & Triggs
  2005, the target MaskFeat (Wei et al. 2022) predicts: codes of edges and their directions, blind to colour).
- ``DalleCodebook``: the DALL-E dVAE encoder that FLAVA uses, in the layout of transformers'
  ``FlavaImageCodebook`` (``config.json`` + ``model.safetensors``), loaded from a local directory.
  It reads ``codebook_pixel_values`` at 8x the token grid (112 px for 14x14 patches), mapped as the
  FLAVA image processor does.

Both are called as ``codebook(pixel_values) -> LongTensor (B, num_patches)`` and have ``num_codes``.
``load_codebook(directory)`` dispatches on ``codebook.json``. Weights are stored as safetensors only: nothing
here ever unpickles.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

MANIFEST = "codebook.json"
FORMAT_VERSION = 1


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def image_patches(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, C * patch_size**2), patches in row-major order (as the ViT's patch embedding)."""
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected (B, C, H, W)")
    height, width = pixel_values.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"pixel_values has spatial size {height}x{width}, not a multiple of patch_size={patch_size}"
        )
    return F.unfold(pixel_values, kernel_size=patch_size, stride=patch_size).transpose(1, 2)


PATCH_FEATURES = ("pixels", "hog")


def hog_patches(pixel_values: torch.Tensor, patch_size: int, bins: int, cells: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, bins * cells**2): per patch, ``cells`` x ``cells`` cells, each a histogram of the
    unsigned gradient orientation over ``bins`` equal bins of [0, pi), weighted by gradient magnitude (the mean
    over the cell's pixels). Central differences, replicated border; per pixel the channel with the strongest
    gradient (Dalal & Triggs). Not normalised: a flat patch stays near zero, apart from an edge."""
    if patch_size % cells:
        raise ValueError(f"patch_size ({patch_size}) must be a multiple of the HOG cells per side ({cells})")
    image_patches(pixel_values[:, :1], patch_size)  # the same shape checks as the pixel descriptor
    x = F.pad(pixel_values.float(), (1, 1, 1, 1), mode="replicate")
    gx = x[..., 1:-1, 2:] - x[..., 1:-1, :-2]
    gy = x[..., 2:, 1:-1] - x[..., :-2, 1:-1]
    magnitude = torch.sqrt(gx * gx + gy * gy)
    strongest = magnitude.argmax(dim=1, keepdim=True)  # (B, 1, H, W)
    angle = torch.atan2(gy.gather(1, strongest), gx.gather(1, strongest)) % math.pi
    index = (angle * (bins / math.pi)).long().clamp(max=bins - 1)
    hist = torch.zeros(x.shape[0], bins, *pixel_values.shape[-2:], dtype=magnitude.dtype, device=x.device)
    hist.scatter_(1, index, magnitude.gather(1, strongest))  # (B, bins, H, W): one bin per pixel
    hist = F.avg_pool2d(hist, patch_size // cells)  # (B, bins, H / cell, W / cell)
    return F.unfold(hist, kernel_size=cells, stride=cells).transpose(1, 2)


def patch_descriptors(pixel_values: torch.Tensor, patch_size: int, features: str = "pixels", hog_bins: int = 9,
                      hog_cells: int = 2) -> torch.Tensor:
    """(B, C, H, W) normalised pixels -> (B, L, D): each patch's pixels, or its ``hog_patches`` histograms."""
    if features not in PATCH_FEATURES:
        raise ValueError(f"features must be one of {PATCH_FEATURES}, got {features!r}")
    pixel_values = pixel_values.detach().float()
    if features == "hog":
        return hog_patches(pixel_values, patch_size, hog_bins, hog_cells)
    return image_patches(pixel_values, patch_size)


def _nearest(points: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid, for (N, D) points against (K, D) centroids."""
    c_norm = (centroids * centroids).sum(dim=1)  # (K,)
    index, dist = [], []
    for start in range(0, points.shape[0], chunk):
        x = points[start : start + chunk]
        d = (x * x).sum(dim=1, keepdim=True) - 2 * x @ centroids.t() + c_norm  # (n, K)
        best, arg = d.min(dim=1)
        index.append(arg)
        dist.append(best.clamp(min=0))
    return torch.cat(index), torch.cat(dist)


class KMeansCodebook:
    """Nearest-centroid codes for image patches; ``centroids`` (num_codes, descriptor size): C * patch_size**2
    for ``features="pixels"``, ``hog_bins * hog_cells**2`` for ``"hog"``."""

    kind = "kmeans"

    def __init__(self, centroids: torch.Tensor, patch_size: int, num_channels: int = 3, *,
                 features: str = "pixels", hog_bins: int = 9, hog_cells: int = 2) -> None:
        if features not in PATCH_FEATURES:
            raise ValueError(f"features must be one of {PATCH_FEATURES}, got {features!r}")
        self.features = features
        self.hog_bins, self.hog_cells = int(hog_bins), int(hog_cells)
        self.patch_size = int(patch_size)
        self.num_channels = int(num_channels)
        size = self.descriptor_size
        if centroids.ndim != 2 or centroids.shape[1] != size:
            raise ValueError(f"centroids has shape {tuple(centroids.shape)}; expected (num_codes, {size}) for "
                             f"{features} descriptors")
        self.centroids = centroids.detach().float().cpu()
        self.inertia: float | None = None  # mean squared distance of the fitting patches to their centroid
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def num_codes(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def descriptor_size(self) -> int:
        if self.features == "hog":
            return self.hog_bins * self.hog_cells**2
        return self.num_channels * self.patch_size**2

    def descriptors(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised pixels -> (B, L, descriptor size), patches in row-major order."""
        return patch_descriptors(pixel_values, self.patch_size, self.features, self.hog_bins, self.hog_cells)

    @classmethod
    def fit(
        cls,
        pixel_values: torch.Tensor,
        *,
        num_codes: int,
        patch_size: int,
        iters: int,
        seed: int,
        features: str = "pixels",
        hog_bins: int = 9,
        hog_cells: int = 2,
    ) -> "KMeansCodebook":
        """Fit on (N, C, H, W) normalised images: k-means++ seeding, then ``iters`` Lloyd steps (stopping early
        once no patch changes cluster). Empty clusters are re-seeded with the worst-fit patches."""
        if num_codes < 2:
            raise ValueError(f"num_codes must be >= 2, got {num_codes}")
        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        points = patch_descriptors(pixel_values.cpu(), patch_size, features, hog_bins, hog_cells)
        points = points.reshape(-1, points.shape[-1])  # (N * L, D)
        if points.shape[0] < num_codes:
            raise ValueError(
                f"k-means needs at least num_codes={num_codes} patches, got {points.shape[0]} from "
                f"{pixel_values.shape[0]} images"
            )
        generator = torch.Generator().manual_seed(int(seed))
        centroids = _kmeans_plus_plus(points, num_codes, generator)
        assign = None
        for _ in range(iters):
            new_assign, dist = _nearest(points, centroids)
            if assign is not None and torch.equal(new_assign, assign):
                break
            assign = new_assign
            sums = torch.zeros_like(centroids).index_add_(0, assign, points)
            counts = torch.bincount(assign, minlength=num_codes).to(points.dtype)
            centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
            empty = (counts == 0).nonzero().flatten()
            if empty.numel():
                worst = dist.topk(empty.numel()).indices  # re-seed with the patches fit worst
                centroids[empty] = points[worst]
        codebook = cls(centroids, patch_size, pixel_values.shape[1], features=features, hog_bins=hog_bins,
                       hog_cells=hog_cells)
        codebook.inertia = float(_nearest(points, centroids)[1].mean())
        return codebook

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised pixels -> (B, (H / patch) * (W / patch)) codes."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected (B, {self.num_channels}, H, W)"
            )
        patches = self.descriptors(pixel_values)  # (B, L, D)
        key = (patches.device, patches.dtype)
        if key not in self._cache:
            self._cache[key] = self.centroids.to(device=patches.device, dtype=patches.dtype)
        index, _ = _nearest(patches.reshape(-1, patches.shape[-1]), self._cache[key])
        return index.view(patches.shape[0], patches.shape[1])

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _save_tensors({"centroids": self.centroids}, directory / "codebook.safetensors")
        _write_json(directory / MANIFEST, {
            "kind": self.kind, "format_version": FORMAT_VERSION, "num_codes": self.num_codes,
            "patch_size": self.patch_size, "num_channels": self.num_channels, "inertia": self.inertia,
            "features": self.features, "hog_bins": self.hog_bins, "hog_cells": self.hog_cells,
        })
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "KMeansCodebook":
        directory = Path(directory)
        meta = _read_manifest(directory, expect="kmeans")
        centroids = load_file(str(directory / "codebook.safetensors"))["centroids"]
        # codebooks saved before descriptors were a choice hold pixel centroids and no "features" key
        codebook = cls(centroids, meta["patch_size"], meta.get("num_channels", 3),
                       features=meta.get("features", "pixels"), hog_bins=meta.get("hog_bins", 9),
                       hog_cells=meta.get("hog_cells", 2))
        if codebook.num_codes != meta["num_codes"]:
            raise ValueError(f"{directory}: codebook.json says {meta['num_codes']} codes, weights hold "
                             f"{codebook.num_codes}")
        codebook.inertia = meta.get("inertia")
        return codebook


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator, pool: int = 32768) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn with probability ~ D(x)^2, from a
    random pool of at most ``pool`` points (seeding on all of a large set costs k full passes for little gain)."""
    if points.shape[0] > pool:
        points = points[torch.randperm(points.shape[0], generator=generator)[:pool]]
    norms = (points * points).sum(dim=1)  # (N,)
    pick = int(torch.randint(points.shape[0], (1,), generator=generator))
    chosen = [pick]
    closest = (norms - 2 * points @ points[pick] + norms[pick]).clamp(min=0)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct patches than codes: any point will do
            pick = int(torch.randint(points.shape[0], (1,), generator=generator))
        else:
            pick = int(torch.multinomial(closest / total, 1, generator=generator))
        chosen.append(pick)
        closest = torch.minimum(closest, (norms - 2 * points @ points[pick] + norms[pick]).clamp(min=0))
    return points[torch.tensor(chosen)].clone()


# ---------------------------------------------------------------------------------------------- DALL-E dVAE
DALLE_DEFAULTS = {"num_groups": 4, "input_channels": 3, "num_blocks_per_group": 2, "hidden_size": 256,
                  "vocab_size": 8192}


class _ResPath(nn.Sequential):
    def __init__(self, in_size: int, out_size: int) -> None:
        hidden = out_size // 4
        super().__init__(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", nn.Conv2d(in_size, hidden, 3, padding=1)),
            ("relu_2", nn.ReLU()), ("conv_2", nn.Conv2d(hidden, hidden, 3, padding=1)),
            ("relu_3", nn.ReLU()), ("conv_3", nn.Conv2d(hidden, hidden, 3, padding=1)),
            ("relu_4", nn.ReLU()), ("conv_4", nn.Conv2d(hidden, out_size, 1)),
        ]))


class _ResBlock(nn.Module):
    """identity (or 1x1 conv) + residual path scaled by 1 / num_layers**2 (DALL-E's post-gain)."""

    def __init__(self, in_size: int, out_size: int, num_layers: int) -> None:
        super().__init__()
        self.id_path = nn.Conv2d(in_size, out_size, 1) if in_size != out_size else nn.Identity()
        self.res_path = nn.Module()
        self.res_path.path = _ResPath(in_size, out_size)
        self.post_gain = 1.0 / num_layers**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path.path(x)


class _Group(nn.Module):
    def __init__(self, blocks: int, num_layers: int, in_size: int, out_size: int, pool: bool) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(blocks):
            layers[f"block_{i + 1}"] = _ResBlock(in_size if i == 0 else out_size, out_size, num_layers)
        if pool:
            layers["pool"] = nn.MaxPool2d(2)
        self.group = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group(x)


class DalleCodebook(nn.Module):
    """The DALL-E dVAE encoder (frozen): ``num_groups`` groups of residual blocks, each but the last halving
    the resolution, then a 1x1 conv to ``vocab_size`` logits; the code of a cell is the argmax.
    Parameter names follow transformers' ``FlavaImageCodebook`` so its checkpoints load key by key."""

    kind = "dalle"

    def __init__(self, **config: Any) -> None:
        super().__init__()
        unknown = set(config) - set(DALLE_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown DalleCodebook config fields: {sorted(unknown)}")
        self.config = {**DALLE_DEFAULTS, **config}
        c = self.config
        groups, per_group, width = c["num_groups"], c["num_blocks_per_group"], c["hidden_size"]
        num_layers = groups * per_group
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["input"] = nn.Conv2d(c["input_channels"], width, 7, padding=3)
        in_size = width
        for g in range(groups):
            out_size = width * 2**g
            layers[f"group_{g + 1}"] = _Group(per_group, num_layers, in_size, out_size, pool=g < groups - 1)
            in_size = out_size
        layers["output"] = nn.Sequential(
            OrderedDict([("relu", nn.ReLU()), ("conv", nn.Conv2d(in_size, c["vocab_size"], 1))])
        )
        self.blocks = nn.Sequential(layers)
        self.requires_grad_(False)
        self.eval()

    @property
    def num_codes(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def downsample(self) -> int:
        return 2 ** (self.config["num_groups"] - 1)

    def train(self, mode: bool = True) -> "DalleCodebook":
        return super().train(False)  # always frozen, always in eval mode

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) codebook pixels -> (B, (H / 8) * (W / 8)) codes."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config["input_channels"]:
            raise ValueError(
                f"codebook pixel values have shape {tuple(pixel_values.shape)}; expected "
                f"(B, {self.config['input_channels']}, H, W)"
            )
        first = self.blocks.input.weight
        if first.device != pixel_values.device:
            self.to(pixel_values.device)
        logits = self.blocks(pixel_values.to(first.dtype))  # (B, vocab, H / 8, W / 8)
        return logits.argmax(dim=1).flatten(1)

    def save(self, directory: str | Path) -> Path:
        """transformers' layout (``config.json`` with model_type ``flava_image_codebook`` + ``model.safetensors``)
        plus our ``codebook.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _save_tensors(self.state_dict(), directory / "model.safetensors")
        _write_json(directory / "config.json", {"model_type": "flava_image_codebook", "freeze": True, **self.config})
        _write_json(directory / MANIFEST, {"kind": self.kind, "format_version": FORMAT_VERSION,
                                           "num_codes": self.num_codes})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "DalleCodebook":
        """From a local directory holding transformers' ``FlavaImageCodebook`` (``save_pretrained`` layout, or a
        downloaded ``facebook/flava-image-codebook``). Only ``model.safetensors`` is read."""
        directory = Path(directory)
        config_path, weights = directory / "config.json", directory / "model.safetensors"
        if not config_path.exists():
            raise FileNotFoundError(f"{directory} has no config.json (expected a FlavaImageCodebook directory)")
        if not weights.exists():
            raise FileNotFoundError(
                f"{weights} not found; only safetensors weights are loaded (convert a pytorch_model.bin first)"
            )
        raw = json.loads(config_path.read_text())
        codebook = cls(**{k: raw[k] for k in DALLE_DEFAULTS if k in raw})
        state = load_file(str(weights))
        state = {k.removeprefix("model."): v for k, v in state.items()}
        missing, unexpected = codebook.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights}: missing keys {missing[:5]}..., unexpected keys {unexpected[:5]}...")
        return codebook


def _read_manifest(directory: Path, expect: str | None = None) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no {MANIFEST}")
    meta = json.loads(path.read_text())
    if expect is not None and meta.get("kind") != expect:
        raise ValueError(f"{path}: kind is {meta.get('kind')!r}, expected {expect!r}")
    return meta


def load_codebook(directory: str | Path) -> KMeansCodebook | DalleCodebook:
    """Load whichever codebook ``directory`` holds: dispatch on ``codebook.json``'s ``kind``; a bare
    transformers ``FlavaImageCodebook`` directory (no ``codebook.json``) loads as ``DalleCodebook``."""
    directory = Path(directory)
    if not (directory / MANIFEST).exists():
        config = directory / "config.json"
        if config.exists() and json.loads(config.read_text()).get("model_type") == "flava_image_codebook":
            return DalleCodebook.load(directory)
        raise FileNotFoundError(f"{directory} holds no codebook ({MANIFEST} or a FlavaImageCodebook config.json)")
    kind = _read_manifest(directory).get("kind")
    if kind == "kmeans":
        return KMeansCodebook.load(directory)
    if kind == "dalle":
        return DalleCodebook.load(directory)
    raise ValueError(f"{directory / MANIFEST}: unknown codebook kind {kind!r} (expected 'kmeans' or 'dalle')")
