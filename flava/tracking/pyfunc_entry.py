"""The logged embedding model: the code MLflow runs to build it ("models from code", no pickle) and its class.

``StageRun.log_model`` hands MLflow this file and ships beside it the ``flava`` modules it imports (the model
side only: ``flava.model``, the image transform, the tokenizer loader) as the model's code paths, with pinned
requirements, so the logged model loads and serves from the registry alone, where this project is not installed.
Hence this file imports nothing from the pipeline side (config, tracking, training).

Input, one row per item: ``text`` (a caption) and/or ``image`` (a PNG/JPEG file's bytes: base64 text, as JSON
carries it, or raw bytes from Python). A missing key, null and an empty string all mean "absent"; a row needs at
least one of the two. Output, one row per input row: ``text_embedding`` and ``image_embedding``, each the
L2-normalised float32 ``projection_dim`` vector of that input, or null where the row has none. A bad request
raises ``MlflowException`` (INVALID_PARAMETER_VALUE), which the scoring server answers with a 400 and the message.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import sys
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from flava.data.tokenizer import load_tokenizer
from flava.data.transforms import decode_image, image_transform
from flava.model.io import load_model

TEXT, IMAGE = "text", "image"  # the input columns
OUTPUTS = {TEXT: "text_embedding", IMAGE: "image_embedding"}  # input column -> its output column
INPUT_HELP = ("each row needs a 'text' (a caption) and/or an 'image' (a PNG/JPEG file, base64-encoded); "
              "null, missing and empty values count as absent")


def _absent(value) -> bool:
    # NaN or NA: a key that some JSON records lack. "": an empty caption is no caption (it must not be embedded).
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, (str, bytes)) and len(value) == 0


def _image_bytes(value, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str):
        raise MlflowException.invalid_parameter_value(
            f"row {row}: 'image' must be a PNG/JPEG file as base64 text, got {type(value).__name__}")
    try:  # whitespace is dropped first: `base64` wraps its output at 76 columns
        return base64.b64decode("".join(value.split()), validate=True)
    except binascii.Error as err:
        raise MlflowException.invalid_parameter_value(f"row {row}: 'image' is not valid base64 ({err})") from err


class FlavaEmbedder(PythonModel):
    """pyfunc: rows of ``text`` and/or ``image`` -> their ``text_embedding`` and ``image_embedding``."""

    def load_context(self, context) -> None:
        self.model = load_model(context.artifacts["model"]).eval()
        self.pre = json.loads(Path(context.artifacts["preprocess"]).read_text())
        self.tokenizer = load_tokenizer(context.artifacts["tokenizer"]) if "tokenizer" in context.artifacts else None
        self.transform = image_transform(
            self.pre["image_size"], train=False, mean=self.pre["mean"], std=self.pre["std"],
            resample=self.pre["resample"],
        )

    # A DataFrame hint: MLflow then neither warns about a missing hint nor infers a schema from it (the logged
    # signature is the explicit one).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        rows = self._rows(frame)
        out = {column: [None] * len(frame) for column in OUTPUTS.values()}
        with torch.inference_mode():
            if rows[TEXT]:
                enc = self.tokenizer([text for _, text in rows[TEXT]], padding=True, truncation=True,
                                     max_length=self.pre["max_length"], return_tensors="pt")
                emb = self.model.encode_text(enc["input_ids"], enc["attention_mask"]).float().numpy()
                for (i, _), vector in zip(rows[TEXT], emb):
                    out[OUTPUTS[TEXT]][i] = vector
            if rows[IMAGE]:
                pixels = torch.stack([self._pixels(data, i) for i, data in rows[IMAGE]])  # (B, 3, H, W)
                emb = self.model.encode_image(pixels).float().numpy()
                for (i, _), vector in zip(rows[IMAGE], emb):
                    out[OUTPUTS[IMAGE]][i] = vector
        return pd.DataFrame(out)

    def _rows(self, frame: pd.DataFrame) -> dict[str, list[tuple[int, object]]]:
        """The (row, value) pairs to embed per input column; raises for a request the model cannot answer."""
        unknown = [str(c) for c in frame.columns if c not in OUTPUTS]
        if unknown:  # MLflow drops columns its signature lacks before predict; a direct caller may still send them
            raise MlflowException.invalid_parameter_value(f"unknown input columns {unknown}: {INPUT_HELP}")
        if not any(column in frame.columns for column in OUTPUTS):
            # What a request of only unknown columns (e.g. 'caption') becomes after MLflow's schema enforcement.
            raise MlflowException.invalid_parameter_value(f"the input has no 'text' or 'image' column: {INPUT_HELP}")
        rows: dict[str, list[tuple[int, object]]] = {TEXT: [], IMAGE: []}
        for column in OUTPUTS:
            if column in frame.columns:
                rows[column] = [(i, v) for i, v in enumerate(frame[column].tolist()) if not _absent(v)]
        given = {i for pairs in rows.values() for i, _ in pairs}
        empty = [i for i in range(len(frame)) if i not in given]
        if empty:
            raise MlflowException.invalid_parameter_value(f"rows {empty} have neither input: {INPUT_HELP}")
        wrong = [i for i, text in rows[TEXT] if not isinstance(text, str)]
        if wrong:
            raise MlflowException.invalid_parameter_value(f"rows {wrong}: 'text' must be a string")
        if rows[TEXT] and self.tokenizer is None:
            raise MlflowException.invalid_parameter_value(
                f"rows {[i for i, _ in rows[TEXT]]} have a 'text', but this model was logged without a tokenizer: "
                "it embeds images only")
        return rows

    def _pixels(self, value, row: int) -> torch.Tensor:
        try:
            return self.transform(decode_image(_image_bytes(value, row)))
        except ValueError as err:  # decode_image's "cannot decode image (N bytes): ..."
            raise MlflowException.invalid_parameter_value(f"row {row}: {err}") from err


def unshadow_running_flava() -> list[str]:
    """Drop the ``sys.path`` entries of MLflow model code directories that hold another ``flava`` than the one
    this process runs; returns them.

    MLflow puts the model's code directory (``<model>/code``: a copy of the serving modules only) first on
    ``sys.path`` before loading this file. Where the copy is what this process imported (a serving environment)
    it stays. In a process that already runs the project's own ``flava`` the copy is unused here, but every
    process started from this one with the spawn method (DataLoader workers, multiprocessing) would import the
    partial copy first and fail on the modules it leaves out."""
    import flava  # the package this process runs (already loaded by the imports above), read where it is used

    in_use = Path(flava.__file__).resolve().parent
    dropped = []
    for entry in list(sys.path):
        code = Path(entry or ".")
        copy = code / "flava" / "__init__.py"
        if (code.name == "code" and (code.parent / "MLmodel").is_file() and copy.is_file()
                and copy.resolve().parent != in_use):
            dropped.append(entry)
    if dropped:
        # A new list, never an in-place removal: another thread may be walking the old one this moment
        # (importlib.metadata does, for every version lookup), and removing an entry before its position makes
        # it skip one, so site-packages went unseen and a package "was not installed".
        sys.path = [entry for entry in sys.path if entry not in dropped]
    return dropped


unshadow_running_flava()
mlflow.models.set_model(FlavaEmbedder())
