"""A local transformers FLAVA checkpoint (a tiny random ``FlavaForPreTraining`` saved with ``save_pretrained``
beside its ``FlavaProcessor``: WordPiece tokenizer, image processor) used three ways: its tokenizer and codebook
by ``flava data fit``, its weights as the joint stage's start (``train.joint.init_from``), and the checkpoint as an
evaluated, registered baseline (``flava evaluate --model``). Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from flava.cli import main  # noqa: E402
from flava.config import PipelineConfig, apply_overrides  # noqa: E402
from flava.data.tokenizer import fit_wordpiece, load_tokenizer  # noqa: E402
from flava.model import FlavaForPretraining  # noqa: E402
from flava.model.codebook import DalleCodebook, load_codebook  # noqa: E402
from flava.model.pretrained import checkpoint_sha256, load_pretrained_weights  # noqa: E402

pytestmark = pytest.mark.slow
# The checkpoint has the tiny preset's architecture (image 32 px / patch 8, width 32, 2 layers of 2 heads, MLP 64,
# 32 text positions, projection 16), its own 40-token vocabulary and a 24-code DALL-E codebook.
WIDTH, CODES, VOCAB = 32, 24, 40
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]  # the checkpoint's normalisation (not data.loader's)
CAPTIONS = ["a red circle left of a blue square", "the big green triangle above a small red square",
            "two blue circles", "one green square below the circle"]
DIRS = dict(raw="raw", prepared="prepared", validated="validated", shards="shards", artifacts="artifacts",
            models="models", checkpoints="checkpoints", reports="reports")


def _hf_config(vocab: int, width: int = WIDTH):
    tower = dict(hidden_size=width, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                 layer_norm_eps=1e-6)
    return transformers.FlavaConfig(
        image_config=dict(tower, image_size=32, patch_size=8, vocab_size=CODES),
        text_config=dict(tower, vocab_size=vocab, max_position_embeddings=32),
        multimodal_config=dict(tower),
        image_codebook_config=dict(hidden_size=8, vocab_size=CODES, num_blocks_per_group=1),
        hidden_size=width, projection_dim=16, layer_norm_eps=1e-6,
    )


def save_checkpoint(directory: Path, *, width: int = WIDTH, seed: int = 0) -> Path:
    """A random transformers FLAVA checkpoint with its processor (tokenizer + image processor) in ``directory``."""
    tokenizer = fit_wordpiece(CAPTIONS, VOCAB, directory / "_tokenizer")
    torch.manual_seed(seed)
    model = transformers.FlavaForPreTraining(_hf_config(len(tokenizer), width)).eval()
    with torch.no_grad():  # transformers starts biases/norms at 0/1: make every tensor distinct
        for name, param in model.named_parameters():
            if not name.endswith("logit_scale"):
                param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(str(directory))
    image_processor = transformers.FlavaImageProcessor(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD)
    transformers.FlavaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(directory))
    for path in (directory / "_tokenizer").iterdir():
        path.unlink()
    (directory / "_tokenizer").rmdir()
    return directory


def _tree(root: Path, checkpoint: Path) -> dict:
    return {
        "paths": {k: str(root / v) for k, v in DIRS.items()},
        "model": {"preset": "tiny"},
        "data": {
            "generate": {"image_size": 32, "pairs": 48, "images_per_class": 2, "text_passages": 32,
                         "zeroshot_per_class": {"train": 2, "val": 1, "test": 1}, "retrieval_images": 6,
                         "text_cls": {"train": 8, "val": 6, "test": 6}, "vqa": {"train": 8, "val": 6, "test": 6}},
            # the data stages take the checkpoint's tokenizer and codebook
            "tokenizer": {"pretrained_dir": str(checkpoint), "max_length": 16},
            "codebook": {"kind": "dalle", "dalle_dir": str(checkpoint)},
        },
        "train": {"joint": {"steps": 2, "batch_size": 8, "init_from": str(checkpoint)}, "log_every": 1,
                  "eval_every": 2, "checkpoint_every": 2, "eval_batch_size": 16},
        "eval": {"batch_size": 16, "probe": {"c_grid": [1.0], "max_iter": 100},
                 "text_finetune": {"epochs": 1, "batch_size": 8},
                 "multimodal_finetune": {"epochs": 1, "batch_size": 8},
                 "registry": {"model_name": "flava-pretrained-test"}, "plot_dpi": 30},
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "mlartifacts"),
                     "log_system_metrics": False, "experiment": "pretrained-tests"},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The generated world prepared, validated, sharded and fitted with the checkpoint's tokenizer and codebook."""
    from flava.data.fit import run_fit
    from flava.data.ingest import run_prepare
    from flava.data.shards import run_shard
    from flava.data.synthetic import run_generate
    from flava.data.validate import run_validate

    root = tmp_path_factory.mktemp("pretrained")
    checkpoint = save_checkpoint(root / "flava-tiny")
    cfg = PipelineConfig.model_validate(_tree(root, checkpoint))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("FLAVA_PARENT_RUN_ID", raising=False)
        for stage in (run_generate, run_prepare, run_validate, run_shard, run_fit):
            stage(cfg)
    return root, checkpoint


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FLAVA_PARENT_RUN_ID", raising=False)


def test_data_fit_takes_the_checkpoints_tokenizer_and_codebook(world):
    root, checkpoint = world
    artifacts = root / "artifacts"
    assert load_tokenizer(artifacts / "tokenizer").get_vocab() == load_tokenizer(checkpoint).get_vocab()
    assert not (artifacts / "tokenizer" / "model.safetensors").exists()  # the tokenizer's files, not the weights
    codebook = load_codebook(artifacts / "codebook")
    hf = transformers.FlavaForPreTraining.from_pretrained(str(checkpoint), local_files_only=True)
    assert isinstance(codebook, DalleCodebook) and codebook.num_codes == CODES
    theirs = hf.image_codebook.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in codebook.state_dict().items())


def test_joint_starts_from_the_checkpoints_weights(world, tmp_path, clean_env, monkeypatch):
    from flava.model.hf import read_transformers_checkpoint
    from flava.train import stages

    root, checkpoint = world
    tree = _tree(root, checkpoint)
    for key in ("models", "checkpoints", "reports"):
        tree["paths"][key] = str(tmp_path / key)  # no models/text or models/image: the unimodal stages never ran
    cfg = PipelineConfig.model_validate(tree)
    assert cfg.train.joint.init_from_unimodal  # init_from takes precedence over it

    _, expected, _ = read_transformers_checkpoint(checkpoint)
    seen = {}
    original = stages.Trainer.fit

    def fit(self):  # the weights the first step starts from
        seen.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return original(self)

    monkeypatch.setattr(stages.Trainer, "fit", fit)
    result = stages.run_pretrain(cfg, "joint")
    assert set(expected) <= set(seen)
    assert all(torch.equal(seen[k], v) for k, v in expected.items())
    assert result["init_from"]["text_encoder"] == sum(v.numel() for k, v in expected.items()
                                                       if k.startswith("text_encoder."))
    assert "init_from_unimodal" not in result
    record = json.loads((tmp_path / "reports" / "joint.run.json").read_text())
    assert record["init_from_checkpoint"] == {"source": str(checkpoint), "sha256": checkpoint_sha256(checkpoint)}
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(result["mlflow_run_id"])
    assert run.data.tags["init_from.sha256"] == checkpoint_sha256(checkpoint)


def test_a_checkpoint_of_another_shape_is_refused_by_name(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "wide", width=48)
    vocab = len(load_tokenizer(checkpoint))
    cfg = PipelineConfig.model_validate({"model": {"preset": "tiny"}})
    model = FlavaForPretraining(cfg.model.build(vocab_size=vocab + 5, codebook_size=CODES))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_pretrained_weights(model, checkpoint)
    message = str(err.value)
    assert "tensors of another shape" in message and "image_encoder.cls_token (1, 1, 48) vs (1, 1, 32)" in message
    for field in ("image.hidden_size: 48 != 32", "text.hidden_size: 48 != 32", f"text.vocab_size: {vocab} != "
                  f"{vocab + 5}"):
        assert field in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_evaluate_a_pretrained_checkpoint_and_register_it(world, tmp_path, monkeypatch, clean_env):
    root, checkpoint = world
    monkeypatch.chdir(tmp_path)
    tree = _tree(root, checkpoint)
    for key in ("models", "reports"):
        tree["paths"][key] = str(tmp_path / key)
    tree = apply_overrides(tree, ["eval.text_finetune.enabled=false", "eval.multimodal_finetune.enabled=false"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))

    from flava.eval import pretrained

    vocabularies = []
    evaluate_model = pretrained.evaluate_model

    def spy(model, tokenizer, *args, **kwargs):  # the tokenizer the evaluation really uses
        vocabularies.append(tokenizer.get_vocab())
        return evaluate_model(model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(pretrained, "evaluate_model", spy)
    (root / "artifacts" / "tokenizer").rename(tmp_path / "pipeline-tokenizer")  # ours is never consulted
    try:
        assert main(["evaluate", "--model", str(checkpoint)]) == 0
    finally:
        (tmp_path / "pipeline-tokenizer").rename(root / "artifacts" / "tokenizer")
    assert vocabularies == [load_tokenizer(checkpoint).get_vocab()]
    out = tmp_path / "reports" / "baselines" / checkpoint.name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"zeroshot", "retrieval_i2t", "retrieval_t2i", "linear_probe"}
    assert set(metrics["macro"]) == {"vision", "multimodal", "overall"}
    assert not (tmp_path / "reports" / "eval").exists()  # the DVC stage's outputs are left alone
    run_info = json.loads((out / "run.json").read_text())
    sha = checkpoint_sha256(checkpoint)
    assert run_info["source_sha256"] == sha and run_info["source_dir"] == str(checkpoint)

    # the checkpoint's own tokenizer and normalisation went with the converted model
    model_dir = tmp_path / "models" / "baselines" / checkpoint.name
    assert load_tokenizer(model_dir / "tokenizer").get_vocab() == load_tokenizer(checkpoint).get_vocab()
    client = MlflowClient(tree["tracking"]["tracking_uri"])
    run = client.get_run(run_info["run_id"])
    assert run.data.tags["pretrained.sha256"] == sha and run.data.metrics["macro.overall"] >= 0
    logged = Path(mlflow.artifacts.download_artifacts(run_info["model_uri"], dst_path=str(tmp_path / "logged"),
                                                      tracking_uri=tree["tracking"]["tracking_uri"]))
    preprocess = json.loads(next(logged.rglob("preprocess.json")).read_text())
    assert preprocess["mean"] == pytest.approx(MEAN) and preprocess["std"] == pytest.approx(STD)

    # registered like our own models: a version through the gate, tagged with where it came from
    registration = run_info["registration"]
    assert registration["decision"] in ("champion", "challenger")
    version = client.get_model_version("flava-pretrained-test", registration["version"])
    assert version.tags["pretrained.source_dir"] == str(checkpoint)
    assert version.tags["pretrained.sha256"] == sha and version.tags["eval_run_id"] == run_info["run_id"]
