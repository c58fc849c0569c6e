"""Safe decoding and normalisation of untrusted image bytes.

``inspect_image`` never raises on bad input: it returns what it could read (size, mode, format) and an error
string for empty, oversized, undecodable, truncated or decompression-bomb files. The bomb check uses our own
pixel limit on the header's size, before any pixel is decoded (PIL's global ``MAX_IMAGE_PIXELS`` is left
alone). ``to_rgb`` converts every convertible mode to 8-bit RGB: palette and alpha are composited onto a
background, 16-bit greyscale is rescaled (not clipped), CMYK goes through PIL's conversion; EXIF orientation
is applied first.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_ORIENTATION = 0x0112  # EXIF tag


@dataclass
class ImageInfo:
    error: str | None = None  # "<category>: <detail>"; None when the image decoded
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None
    image: Image.Image | None = None  # the decoded image (only when fully loaded)


def inspect_image(data: bytes, *, max_bytes: int, max_pixels: int, min_side: int, max_side: int) -> ImageInfo:
    """Read the header, check the bomb limit, then decode fully if the size is within bounds."""
    if len(data) == 0:
        return ImageInfo(error="empty file: zero bytes")
    if len(data) > max_bytes:
        return ImageInfo(error=f"file too large: {len(data)} bytes > {max_bytes}")
    with warnings.catch_warnings():
        # PIL warns above its own limit and raises above twice that; both mean a bomb to us.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            return ImageInfo(error=f"decompression bomb: {err}")
        except UnidentifiedImageError:
            return ImageInfo(error="not an image: no decoder recognises the bytes")
        except Exception as err:  # noqa: BLE001 - a broken header can raise anything from a codec plugin
            return ImageInfo(error=f"not an image: {type(err).__name__}: {err}")
        info = ImageInfo(width=img.width, height=img.height, mode=img.mode, format=img.format)
        if img.width * img.height > max_pixels:
            info.error = f"decompression bomb: {img.width}x{img.height} = {img.width * img.height} pixels > {max_pixels}"
            return info
        if min(img.size) < min_side or max(img.size) > max_side:
            return info  # out of the size bounds: reported by the dimension expectation, not decoded
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            info.error = f"decompression bomb: {err}"
            return info
        except Exception as err:  # noqa: BLE001 - truncated/corrupt data raises OSError, SyntaxError, ValueError...
            info.error = f"truncated or corrupt image: {type(err).__name__}: {err}"
            return info
    info.image = img
    return info


def _composite(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> tuple[Image.Image, bool]:
    """EXIF-rotate and convert to 8-bit RGB. Returns (image, whether EXIF rotation changed it)."""
    try:
        turned = img.getexif().get(_ORIENTATION, 1) not in (1, None)
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is ignored, the pixels are still good
        turned = False
    mode = img.mode
    if mode == "RGB":
        return img, turned
    if mode in _SIXTEEN_BIT:  # 16-bit (or 32-bit int) greyscale: rescale 0..65535 -> 0..255
        arr = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB"), turned
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), mode="L").convert("RGB"), turned
    if mode in _WITH_ALPHA or (mode == "P" and "transparency" in img.info):
        return _composite(img, background), turned
    return img.convert("RGB"), turned
