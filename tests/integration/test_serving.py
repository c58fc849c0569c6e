"""Serving the registered embedding model: a tiny FLAVA logged by ``StageRun.log_model`` into a real SQLite MLflow
store with its registry, aliased ``@champion``, then loaded without this project (its own code paths) and, in the
slow test, served by ``mlflow models serve`` from a fresh virtualenv holding only the model's requirements."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from flava.config import PipelineConfig  # noqa: E402
from flava.data.tokenizer import fit_wordpiece  # noqa: E402
from flava.data.transforms import decode_image, image_transform  # noqa: E402
from flava.model import FlavaForPretraining, preset  # noqa: E402
from flava.model.io import save_model  # noqa: E402
from flava.tracking.lineage import PARENT_RUN_ENV  # noqa: E402
from flava.tracking.runs import StageRun, serving_modules, serving_requirements  # noqa: E402
from tests.helpers import tracking_in  # noqa: E402

NAME = "flava-serving-test"
URI = f"models:/{NAME}@champion"
CAPTIONS = ["a photo of a red circle", "a photo of a blue square", "two green triangles"]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _png(colour: tuple[int, int, int], size: int = 40) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def champion(tmp_path, monkeypatch):
    """A tiny model and tokenizer logged as a pyfunc and registered as ``NAME@champion``; returns the store URI,
    the model and the tokenizer (the reference the served embeddings are checked against)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    model_dir = tmp_path / "model"
    tokenizer = fit_wordpiece(CAPTIONS, 40, model_dir / "tokenizer")
    torch.manual_seed(0)
    model = FlavaForPretraining(preset("tiny", {"text": {"vocab_size": len(tokenizer)}})).eval()
    save_model(model, model_dir)
    cfg = PipelineConfig.model_validate({"tracking": {**tracking_in(tmp_path), "experiment": "serving"}})
    with StageRun(cfg, "joint", root=tmp_path) as run:
        uri = run.log_model(model_dir, tokenizer_dir=model_dir / "tokenizer",
                            embedding_dim=model.config.projection_dim,
                            preprocess={"image_size": model.config.image.image_size, "mean": list(MEAN),
                                        "std": list(STD), "resample": "bicubic", "max_length": 16})
    store = cfg.tracking.tracking_uri
    client = MlflowClient(store)
    client.create_registered_model(NAME)
    version = client.create_model_version(NAME, uri, run_id=run.run_id)
    client.set_registered_model_alias(NAME, "champion", version.version)
    return store, model, tokenizer


def _reference(model, tokenizer, texts=(), images=()):
    """What the served model must answer: the model's own text and image embeddings."""
    with torch.inference_mode():
        text = image = None
        if texts:
            enc = tokenizer(list(texts), padding=True, truncation=True, max_length=16, return_tensors="pt")
            text = model.encode_text(enc["input_ids"], enc["attention_mask"]).numpy()
        if images:
            transform = image_transform(model.config.image.image_size, train=False, mean=MEAN, std=STD)
            image = model.encode_image(torch.stack([transform(decode_image(b)) for b in images])).numpy()
    return text, image


def test_logged_model_carries_its_code_and_pinned_requirements(champion, tmp_path):
    store, model, tokenizer = champion
    local = Path(mlflow.artifacts.download_artifacts(URI, tracking_uri=store, dst_path=str(tmp_path / "dl")))
    requirements = (local / "requirements.txt").read_text().split()
    assert set(serving_requirements()) <= set(requirements)
    assert all("==" in line for line in requirements), requirements  # nothing unpinned, no `flava`
    shipped = {p.relative_to(local / "code").as_posix() for p in (local / "code").rglob("*.py")}
    assert {"flava/model/io.py", "flava/data/transforms.py", "flava/data/tokenizer.py"} <= shipped
    assert not any(p.startswith(("flava/train/", "flava/tracking/", "flava/cli/")) for p in shipped)  # model side
    assert len(shipped) == len(serving_modules()) and (local / "pyfunc_entry.py").is_file()  # + the code file

    # A fresh interpreter loads the registered model from the registry and imports flava from the model's own
    # code: the editable install of this project sits behind it on the import path and is never reached.
    red = _png((200, 30, 30))
    script = f"""
import json, mlflow, pandas as pd
model = mlflow.pyfunc.load_model({URI!r})
out = model.predict(pd.DataFrame({{"text": [{CAPTIONS[0]!r}, None], "image": [None, {red!r}]}}))
import flava.model.io
print(json.dumps({{"flava": flava.model.io.__file__, "text": out["text_embedding"][0].tolist(),
                  "image": out["image_embedding"][1].tolist(),
                  "nulls": [out["text_embedding"][1] is None, out["image_embedding"][0] is None]}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": store}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    project = Path(__file__).resolve().parents[2]
    assert "/code/flava/model/io.py" in got["flava"] and not got["flava"].startswith(str(project / "flava"))
    text, image = _reference(model, tokenizer, [CAPTIONS[0]], [red])
    np.testing.assert_allclose(got["text"], text[0], atol=1e-5)
    np.testing.assert_allclose(got["image"], image[0], atol=1e-5)
    assert got["nulls"] == [True, True]


def test_rows_mix_text_and_images_and_bad_requests_name_the_problem(champion):
    store, model, tokenizer = champion
    mlflow.set_tracking_uri(store)
    loaded = mlflow.pyfunc.load_model(URI)
    red, blue = _png((200, 30, 30)), _png((20, 40, 220), size=50)
    frame = pd.DataFrame({
        "text": [CAPTIONS[0], None, "", CAPTIONS[1]],
        # raw bytes from Python, base64 text as JSON carries it; "" is no image (not an empty text's embedding)
        "image": [None, red, base64.b64encode(blue).decode(), ""],
    })
    out = loaded.predict(frame)
    assert list(out.columns) == ["text_embedding", "image_embedding"] and len(out) == 4
    text, image = _reference(model, tokenizer, [CAPTIONS[0], CAPTIONS[1]], [red, blue])
    np.testing.assert_allclose(np.stack(out["text_embedding"][[0, 3]]), text, atol=1e-5)
    np.testing.assert_allclose(np.stack(out["image_embedding"][[1, 2]]), image, atol=1e-5)
    assert out["text_embedding"][[1, 2]].isna().all() and out["image_embedding"][[0, 3]].isna().all()
    both = loaded.predict(pd.DataFrame({"text": [CAPTIONS[0]], "image": [red]}))
    assert both["text_embedding"][0] is not None and both["image_embedding"][0] is not None

    bad = {
        "rows [1] have neither input": pd.DataFrame({"text": ["x", None], "image": [None, ""]}),
        "no 'text' or 'image' column": pd.DataFrame({"caption": ["a red circle"]}),  # MLflow drops 'caption'
        "row 0: 'image' is not valid base64": pd.DataFrame({"image": ["not base64!"]}),
        "row 0: cannot decode image": pd.DataFrame({"image": [b"not a png"]}),
    }
    for message, request in bad.items():
        with pytest.raises(MlflowException, match=re.escape(message)) as err:
            loaded.predict(request)
        assert err.value.get_http_status_code() == 400


# ------------------------------------------------------------------------------------- the real scoring server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_until_serving(port: int, server: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise AssertionError(f"no answer on port {port} after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_champion_serves_from_a_fresh_virtualenv_with_only_its_requirements(champion, tmp_path):
    store, model, tokenizer = champion
    local = Path(mlflow.artifacts.download_artifacts(f"{URI}/requirements.txt", tracking_uri=store,
                                                     dst_path=str(tmp_path / "req")))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    started = time.monotonic()
    # pip's own configuration (indexes, find-links) applies; nothing of this project is installed.
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-cache-dir", "-q",
                              "-r", str(local)], capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stderr[-4000:]
    print(f"venv install of the model's requirements: {time.monotonic() - started:.0f} s")
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout
    assert not any(line.lower().startswith("flava==") for line in listed.splitlines())

    port = _free_port()
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MLFLOW_TRACKING_URI=store, PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(venv / "bin" / "mlflow"), "models", "serve", "-m", URI, "--env-manager", "local",
             "-p", str(port), "-h", "127.0.0.1"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_serving(port, server, log)
        red, blue = _png((200, 30, 30)), _png((20, 40, 220), size=50)
        b64 = {k: base64.b64encode(v).decode("ascii") for k, v in {"red": red, "blue": blue}.items()}
        text, image = _reference(model, tokenizer, CAPTIONS[:2], [red, blue])

        status, body = _post(port, {"dataframe_records": [{"text": CAPTIONS[0]}, {"text": CAPTIONS[1]}]})
        assert status == 200, body
        np.testing.assert_allclose([r["text_embedding"] for r in body["predictions"]], text, atol=1e-5)
        assert all(r["image_embedding"] is None for r in body["predictions"])

        status, body = _post(port, {"dataframe_records": [{"image": b64["red"]}, {"image": b64["blue"]}]})
        assert status == 200, body
        np.testing.assert_allclose([r["image_embedding"] for r in body["predictions"]], image, atol=1e-5)

        # mixed rows, in both DataFrame formats; a row may carry both inputs
        mixed = [{"text": CAPTIONS[0]}, {"image": b64["blue"]}, {"text": CAPTIONS[1], "image": b64["red"]}]
        split = {"columns": ["text", "image"], "data": [[CAPTIONS[0], None], [None, b64["blue"]],
                                                        [CAPTIONS[1], b64["red"]]]}
        for payload in ({"dataframe_records": mixed}, {"dataframe_split": split}):
            status, body = _post(port, payload)
            assert status == 200, body
            rows = body["predictions"]
            np.testing.assert_allclose([rows[0]["text_embedding"], rows[2]["text_embedding"]], text, atol=1e-5)
            np.testing.assert_allclose([rows[1]["image_embedding"], rows[2]["image_embedding"]],
                                       [image[1], image[0]], atol=1e-5)
            assert rows[0]["image_embedding"] is None and rows[1]["text_embedding"] is None

        for payload, message in (
            ({"dataframe_records": [{"text": CAPTIONS[0]}, {"text": "", "image": None}]}, "rows [1] have neither"),
            ({"dataframe_records": [{"caption": CAPTIONS[0]}]}, "no 'text' or 'image' column"),
        ):
            status, body = _post(port, payload)
            assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", body
            assert message in body["message"], body["message"]
    finally:
        # The server leads its own process group: stop it with the workers it started.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        shutil.rmtree(venv, ignore_errors=True)
