"""Checks of a pretraining batch (see docs/interfaces.md) against the model config, before any compute.

Every check raises ``ValueError`` naming the tensor and what was expected. Shapes, dtypes and presence are read
from tensor metadata; the value ranges (token ids, labels) are reduced on the tensors' device and read back with one
sync. Run on host tensors that sync is free, which is why training checks each batch on the host: the trainer
before it copies the batch to the device, and ``FlavaForPretraining.forward`` only when the batch's tensors are on
the CPU (``config.validate_inputs`` switches both off). A device batch can still be checked by calling
``validate_batch`` directly, at the cost of one device sync.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from flava.model.config import FlavaConfig, ImageEncoderConfig, TextEncoderConfig
from flava.model.losses import IGNORE_INDEX

BATCH_KINDS = ("image", "text", "pair")


def on_host(batch: Mapping[str, Any]) -> bool:
    """True when every tensor of ``batch`` is on the CPU (checking it costs no device sync)."""
    return all(v.device.type == "cpu" for v in batch.values() if isinstance(v, torch.Tensor))


def validate_batch(config: FlavaConfig, batch: Mapping[str, Any], *, has_codebook: bool) -> None:
    """Raise ``ValueError`` naming the first problem of ``batch`` for a model of ``config``: a value that is not a
    tensor, a wrong shape or dtype, a missing input or label an enabled objective of the batch kind needs, ids or
    labels out of range, batch sizes that disagree. ``has_codebook``: the model can compute MIM targets itself."""
    kind = batch.get("kind")
    if kind not in BATCH_KINDS:
        raise ValueError(f"batch['kind'] must be one of {BATCH_KINDS}, got {kind!r}")
    tensors = _tensors(batch)
    ranges = RangeChecks()
    if kind in ("image", "pair"):
        check_images(config.image, _require(batch, "pixel_values", kind), "pixel_values")
        if batch.get("image_mask") is not None:
            _check_shape(batch["image_mask"], "image_mask", ("B", config.image.num_patches))
    if kind in ("text", "pair"):
        _check_text_inputs(config.text, batch, kind, ranges)
    _check_labels(config, batch, ranges)
    _require_targets(config, batch, kind, has_codebook)
    check_batch_sizes(tensors)
    ranges.raise_if_violated()


def _tensors(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The batch's tensors by name; anything else but ``kind`` and None is an error."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in batch.items():
        if name != "kind" and value is not None and not isinstance(value, torch.Tensor):
            raise ValueError(f"batch[{name!r}] must be a torch.Tensor, got {type(value).__name__}")
        if isinstance(value, torch.Tensor):
            tensors[name] = value
    return tensors


def _check_text_inputs(txt: TextEncoderConfig, batch: Mapping[str, Any], kind: str, ranges: RangeChecks) -> None:
    """input_ids and attention_mask, and the masked ids and MLM labels of the same (B, T) shape."""
    check_text(txt, _require(batch, "input_ids", kind), batch.get("attention_mask"), ranges)
    for name in ("input_ids_masked", "mlm_labels"):
        if batch.get(name) is not None:
            _check_shape(batch[name], name, ("B", tuple(batch["input_ids"].shape)[1]))
            _check_integer(batch[name], name)
    if batch.get("input_ids_masked") is not None:
        ranges.add("input_ids_masked", batch["input_ids_masked"], txt.vocab_size, "vocab_size")
    if batch.get("mlm_labels") is not None:
        ranges.add("mlm_labels", batch["mlm_labels"], txt.vocab_size, "vocab_size", ignore=IGNORE_INDEX)


def _check_labels(config: FlavaConfig, batch: Mapping[str, Any], ranges: RangeChecks) -> None:
    """The optional ITM labels, MIM labels and codebook inputs, whatever the batch kind."""
    img = config.image
    if batch.get("itm_labels") is not None:
        _check_shape(batch["itm_labels"], "itm_labels", ("B",))
        _check_integer(batch["itm_labels"], "itm_labels")
        ranges.add("itm_labels", batch["itm_labels"], 2, "2 (0 = not matched, 1 = matched)")
    if batch.get("mim_labels") is not None:
        labels = batch["mim_labels"].reshape(batch["mim_labels"].shape[0], -1)
        _check_shape(labels, "mim_labels", ("B", img.num_patches))
        _check_integer(labels, "mim_labels")
        ranges.add("mim_labels", labels, config.codebook_size, "codebook_size")
    if batch.get("codebook_pixel_values") is not None:
        _check_shape(batch["codebook_pixel_values"], "codebook_pixel_values", ("B", img.num_channels, "H", "W"))


def _require_targets(config: FlavaConfig, batch: Mapping[str, Any], kind: str, has_codebook: bool) -> None:
    """The labels every enabled objective of this kind needs, and MIM targets (a codebook or ``mim_labels``)."""
    def on(name: str) -> bool:
        return config.loss.weight(name) > 0

    required: list[str] = []
    if kind == "image" and on("mim"):
        required += ["image_mask"]
    if kind == "text" and on("mlm"):
        required += ["input_ids_masked", "mlm_labels"]
    if kind == "pair":
        if on("mmm_image"):
            required += ["image_mask"]
        if on("mmm_text"):
            required += ["input_ids_masked", "mlm_labels"]
    for name in required:
        _require(batch, name, kind)
    image_targets = (kind == "image" and on("mim")) or (kind == "pair" and on("mmm_image"))
    if image_targets and not has_codebook and batch.get("mim_labels") is None:
        raise ValueError(
            f"a {kind!r} batch with the {'mim' if kind == 'image' else 'mmm_image'} loss on needs MIM targets: "
            "pass a codebook to FlavaForPretraining or batch['mim_labels'] (B, num_patches)"
        )


def check_images(img: ImageEncoderConfig, pixel_values: torch.Tensor, name: str) -> None:
    expected = ("B", img.num_channels, img.image_size, img.image_size)
    _check_shape(pixel_values, name, expected)
    if not pixel_values.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape {_fmt(expected)}, got {pixel_values.dtype}")


def check_text(
    txt: TextEncoderConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    ranges: RangeChecks | None = None,
) -> None:
    """Shapes and dtype of the ids and mask; the id range is added to ``ranges``, or checked now without it."""
    _check_shape(input_ids, "input_ids", ("B", "T"))
    _check_integer(input_ids, "input_ids")
    if input_ids.shape[1] > txt.max_position_embeddings:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} tokens per row; expected at most max_position_embeddings="
            f"{txt.max_position_embeddings}"
        )
    if attention_mask is not None:
        _check_shape(attention_mask, "attention_mask", (input_ids.shape[0], input_ids.shape[1]))
    own = ranges is None
    ranges = RangeChecks() if own else ranges
    ranges.add("input_ids", input_ids, txt.vocab_size, "vocab_size")
    if own:
        ranges.raise_if_violated()


def check_batch_sizes(tensors: Mapping[str, torch.Tensor]) -> None:
    sizes = {name: int(t.shape[0]) for name, t in tensors.items() if t.ndim > 0}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch tensors disagree on the batch size (dim 0): {sizes}")


class RangeChecks:
    """Integer tensors that must lie in [0, high) (ignoring one sentinel value), verified with one device sync."""

    def __init__(self) -> None:
        self.items: list[tuple[str, torch.Tensor, int, str, int | None]] = []

    def add(self, name: str, values: torch.Tensor, high: int, high_name: str, ignore: int | None = None) -> None:
        if values.numel():
            self.items.append((name, values, high, high_name, ignore))

    @staticmethod
    def _bad(values: torch.Tensor, high: int, ignore: int | None) -> torch.Tensor:
        bad = (values < 0) | (values >= high)
        if ignore is not None:
            bad &= values != ignore
        return bad.any()

    def raise_if_violated(self) -> None:
        if not self.items:
            return
        flags = torch.stack([self._bad(v, h, i).to(self.items[0][1].device) for _, v, h, _, i in self.items])
        if not bool(flags.any()):  # the one host sync
            return
        for (name, values, high, high_name, ignore), bad in zip(self.items, flags.tolist()):
            if bad:
                kept = values[values != ignore] if ignore is not None else values
                what = f"{name} (where != {ignore})" if ignore is not None else name
                raise ValueError(
                    f"{what} holds values in [{int(kept.min())}, {int(kept.max())}]; expected [0, {high_name}="
                    f"{high})" + (" (does the tokenizer match the model?)" if high_name == "vocab_size" else "")
                )


def _check_integer(tensor: torch.Tensor, name: str) -> None:
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {tensor.dtype}")


def _fmt(shape: Iterable[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _check_shape(tensor: torch.Tensor, name: str, expected: tuple[Any, ...]) -> None:
    """``expected`` holds ints (must match) and strings (any size)."""
    shape = tuple(tensor.shape)
    ok = len(shape) == len(expected) and all(
        isinstance(want, str) or got == want for got, want in zip(shape, expected)
    )
    if not ok:
        raise ValueError(f"{name} has shape {shape}; expected {_fmt(expected)}")


def _require(batch: Mapping[str, Any], name: str, kind: str) -> torch.Tensor:
    value = batch.get(name)
    if value is None:
        raise ValueError(f"a {kind!r} batch needs batch[{name!r}] for the objectives enabled in the config")
    return value
