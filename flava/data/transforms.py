"""Image decoding and transforms (PIL -> normalised float tensor), shared by training loaders and evaluation.

No torchvision dependency: decoding, EXIF orientation, resizing and cropping use Pillow; the random choices of the
training augmentation take a ``torch.Generator`` so a loader can make them deterministic per batch.

Evaluation uses the same code path with ``train=False``: ``load_pixel_batch(paths, transform)`` turns a list of
image paths (or ``s3://`` URIs) into a ``(N, 3, H, W)`` batch, and ``transform_from_config(cfg, train=False)``
builds the transform with the model preset's image size and the loader's normalisation.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from flava.config import PipelineConfig

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
# Attempts at drawing a crop box inside the image before falling back to a centre crop (as torchvision does).
_CROP_ATTEMPTS = 10


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image with EXIF orientation applied. Raises ValueError on undecodable bytes."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        raise ValueError(f"cannot decode image ({len(data)} bytes): {err}") from err
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (L, P, RGBA, CMYK, I;16, ...) to 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray((arr / (top / 255.0)).clip(0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalised (3, size, size) float tensor.

    Eval (``train=False``): resize the shorter side to ``size`` and centre-crop. Train: the same unless
    ``random_resized_crop`` / ``horizontal_flip`` are enabled, drawing from the generator passed at call time.
    """

    size: int
    train: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    horizontal_flip: bool = False
    resample: str = "bicubic"

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"image_transform: image_size must be positive, got {self.size}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"image_transform: resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"image_transform: mean/std need 3 values with std > 0, got {self.mean}, {self.std}")

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        img = to_rgb(img)
        return self.render(img, *self.draw(img.size, generator))

    def draw(self, size: tuple[int, int], generator: torch.Generator | None = None):
        """The random choices for one image of ``size`` (w, h): (crop box or None, flip). Separate from
        ``render`` so a second view (the dVAE codebook's pixels) can reuse the same crop and flip."""
        box = self._crop_box(size, generator) if self.train and self.random_resized_crop else None
        flip = self.train and self.horizontal_flip and bool(torch.rand((), generator=generator) < 0.5)
        return box, flip

    def render(self, img: Image.Image, box=None, flip: bool = False) -> torch.Tensor:
        return self.normalise(self.render_uint8(img, box, flip))

    def render_uint8(self, img: Image.Image, box=None, flip: bool = False) -> torch.Tensor:
        """Geometry only: (3, size, size) uint8. Loaders stack these and ``normalise`` the batch in one op."""
        method = _RESAMPLE[self.resample]
        if box is not None:
            img = img.resize((self.size, self.size), method, box=box)
        else:
            img = self._resize_center_crop(img, method)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> float32 normalised with ``mean``/``std``."""
        x = pixels.float().div_(255.0)  # [0, 1]
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return x.sub_(mean).div_(std)

    def _resize_center_crop(self, img: Image.Image, method) -> Image.Image:
        w, h = img.size
        if (w, h) == (self.size, self.size):
            return img
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        # Resize and crop in one call: the crop box is expressed in source pixels.
        box = (left / scale, top / scale, (left + self.size) / scale, (top + self.size) / scale)
        return img.resize((self.size, self.size), method, box=box)

    def _crop_box(self, size: tuple[int, int], generator) -> tuple[float, float, float, float]:
        w, h = size
        area = w * h
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        for _ in range(_CROP_ATTEMPTS):
            u = torch.rand(4, generator=generator).tolist()
            target = area * (self.crop_scale[0] + u[0] * (self.crop_scale[1] - self.crop_scale[0]))
            ratio = math.exp(log_lo + u[1] * (log_hi - log_lo))
            cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if cw <= w and ch <= h:
                left, top = u[2] * (w - cw), u[3] * (h - ch)
                return (left, top, left + cw, top + ch)
        side = min(w, h)  # fallback: the largest centred square
        return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)


def image_transform(
    image_size: int,
    *,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    random_resized_crop: bool = False,
    crop_scale: Sequence[float] = (0.9, 1.0),
    crop_ratio: Sequence[float] = (0.75, 4 / 3),
    horizontal_flip: bool = False,
    resample: str = "bicubic",
) -> ImageTransform:
    """The image transform; augmentation is opt-in (flips and crops can falsify captions about positions)."""
    return ImageTransform(
        int(image_size), bool(train), tuple(float(m) for m in mean), tuple(float(s) for s in std),
        random_resized_crop, tuple(crop_scale), tuple(crop_ratio), horizontal_flip, resample,
    )


def model_image_geometry(cfg: "PipelineConfig") -> tuple[int, int]:
    """(image_size, patch_size) of the configured model, the single source of both."""
    image = cfg.model.resolved.image
    return image.image_size, image.patch_size


def transform_from_config(cfg: "PipelineConfig", *, train: bool) -> ImageTransform:
    """The transform the pipeline uses: model preset's image size, ``data.loader`` normalisation/augmentation."""
    image_size, _ = model_image_geometry(cfg)
    lc = cfg.data.loader
    return image_transform(
        image_size, train=train, mean=lc.mean, std=lc.std, random_resized_crop=lc.random_resized_crop,
        crop_scale=lc.crop_scale, crop_ratio=lc.crop_ratio, horizontal_flip=lc.horizontal_flip,
        resample=lc.resample,
    )


def load_pixel_batch(
    images: Iterable[str | Image.Image], transform: ImageTransform, *, s3=None
) -> torch.Tensor:
    """Eval helper: image paths / ``s3://`` URIs / PIL images -> (N, 3, H, W) normalised pixel batch."""
    # kept here: this module ships with the served model (serving_modules follows module-level imports), which
    # does not need flava.data.storage
    from flava.data.storage import read_bytes

    tensors = []
    for item in images:
        img = item if isinstance(item, Image.Image) else decode_image(read_bytes(str(item), s3=s3))
        tensors.append(transform(img))
    if not tensors:
        raise ValueError("load_pixel_batch: no images given")
    return torch.stack(tensors)
