"""Image transforms: decode any mode to RGB, resize/crop/normalise, opt-in augmentation, eval batch helper."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from flava.data.transforms import decode_image, image_transform, load_pixel_batch

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_eval_transform_shape_and_normalisation():
    img = Image.new("RGB", (40, 20), (255, 0, 128))
    x = image_transform(16, train=False, mean=MEAN, std=STD)(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full((16, 16), (1.0 - 0.5) / 0.25), atol=1e-4)
    assert torch.allclose(x[1], torch.full((16, 16), (0.0 - 0.5) / 0.25), atol=1e-4)


def test_center_crop_keeps_the_middle():
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = 255  # white middle third
    x = image_transform(10, train=False, mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(arr))
    assert x.min() > 0.9  # the centre crop is all white


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_decode_converts_modes_to_rgb(mode):
    if mode == "I;16":
        img = Image.fromarray(np.full((8, 8), 40000, np.uint16))
    else:
        img = Image.new("RGB", (8, 8), (10, 200, 30)).convert(mode)
    assert decode_image(png_bytes(img) if mode != "CMYK" else _jpeg(img)).mode == "RGB"


def _jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def test_decode_rejects_garbage():
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(b"not an image")


def test_exif_orientation_applied():
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (10, 20)


def test_augmentation_is_off_by_default_and_seeded_when_on():
    arr = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    plain = image_transform(32, train=True, mean=MEAN, std=STD)
    assert torch.equal(plain(img, torch.Generator().manual_seed(0)), plain(img, torch.Generator().manual_seed(1)))
    aug = image_transform(24, train=True, mean=MEAN, std=STD, random_resized_crop=True, crop_scale=(0.3, 0.6),
                          horizontal_flip=True)
    a = aug(img, torch.Generator().manual_seed(5))
    assert torch.equal(a, aug(img, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, aug(img, torch.Generator().manual_seed(6)))
    # Eval never augments even with augmentation configured.
    ev = image_transform(24, train=False, mean=MEAN, std=STD, random_resized_crop=True, horizontal_flip=True)
    assert torch.equal(ev(img, torch.Generator().manual_seed(5)), ev(img, torch.Generator().manual_seed(6)))


def test_load_pixel_batch_from_paths(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (12, 12), (i * 50, 0, 0)).save(p)
        paths.append(str(p))
    tf = image_transform(8, train=False, mean=MEAN, std=STD)
    batch = load_pixel_batch(paths, tf)
    assert batch.shape == (3, 3, 8, 8)
    assert torch.allclose(batch[1], tf(Image.open(paths[1])))
    with pytest.raises(FileNotFoundError):
        load_pixel_batch([str(tmp_path / "missing.png")], tf)


def test_bad_arguments():
    with pytest.raises(ValueError, match="std"):
        image_transform(8, train=False, mean=MEAN, std=(0, 1, 1))
    with pytest.raises(ValueError, match="image_size"):
        image_transform(0, train=False, mean=MEAN, std=STD)
