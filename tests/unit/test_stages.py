"""The stage registry (flava/stages.py): dvc.yaml is its rendering, declared keys exist, the read recorder sees
what code reads, and a stage's identity moves exactly with what it computes from."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from dvc.utils.serialize import modify_yaml

from flava import stages
from flava.config import PipelineConfig, ReadRecorder, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_dvc_yaml_is_the_registry_rendered():
    assert (ROOT / "dvc.yaml").read_text() == stages.render_dvc_yaml(), (
        "dvc.yaml differs from the registry: run `flava stages dvc-yaml > dvc.yaml`")


def test_declared_params_keys_exist():
    tree = PipelineConfig().model_dump(mode="json")
    for stage in stages.STAGES:
        for key in stages.params_keys(stage):
            node = tree
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{stage.name}: {key} is not a config key"
                node = node[part]
    for key in stages.NOT_DEPENDENCIES:
        node = tree
        for part in key.split("."):
            assert part in node, f"NOT_DEPENDENCIES names {key}, which is not a config key"
            node = node[part]


def test_speed_knobs_and_gate_keys_are_not_dependencies_of_training():
    joint = stages.params_keys(stages.get("joint"))
    assert "data.loader.num_workers" not in joint and "data.loader.mean" in joint
    assert not any(k.startswith("eval") for k in joint)
    text = stages.params_keys(stages.get("pretrain_text"))
    assert "train.joint" not in text and "data.mixing" not in text
    evaluate = stages.params_keys(stages.get("evaluate"))
    assert not any(k.startswith("eval.registry") for k in evaluate)
    promote = stages.params_keys(stages.get("promote"))
    assert all(k.startswith("eval.registry.") for k in promote) and "eval.registry.margin" in promote
    assert "eval.registry.lock_timeout_s" not in promote


def test_code_deps_follow_function_level_imports():
    joint = stages.code_files(stages.get("joint"))
    # imported inside run_pretrain's body, not at module level
    assert {"flava/eval/zeroshot.py", "flava/eval/features.py", "flava/eval/datasets.py"} <= set(joint)
    assert "flava/train/loop.py" in joint and "flava/config.py" in joint and "flava/cli/__init__.py" in joint
    prepare = stages.code_files(stages.get("prepare"))
    assert "flava/train/loop.py" not in prepare and "flava/eval/run.py" not in prepare


def test_the_logged_model_entry_is_code_of_the_stages_that_log_models():
    from flava.tracking import runs

    assert runs.PYFUNC_MODULE in stages.LOADED_BY_PATH["flava.tracking.runs"]
    for name in ("evaluate", "joint"):
        assert "flava/tracking/pyfunc_entry.py" in stages.code_files(stages.get(name)), name


def test_params_yaml_survives_dvc_set_param_round_trip(tmp_path):
    """`dvc exp run -S key=value` rewrites params.yaml through this same function: nothing else may change."""
    copy = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", copy)
    with modify_yaml(copy) as tree:
        tree["seed"] = tree["seed"]
    assert copy.read_text() == (ROOT / "params.yaml").read_text()


def test_read_recorder_records_leaves_not_dumps():
    cfg = load_config(ROOT / "params.yaml")
    recorder = ReadRecorder()
    recorder.watch(cfg)
    try:
        cfg.flat(), cfg.digest()  # logging and hashing the whole config are not reads
        loader = cfg.data.loader
        _ = loader.mean, cfg.train.joint.steps, cfg.data.ingest.pairs[0].path
    finally:
        recorder.stop()
    _ = cfg.seed  # after stop: not recorded
    assert recorder.keys == {"data.loader.mean", "train.joint.steps", "data.ingest.pairs.path"}


@pytest.fixture
def workspace(tmp_path):
    cfg = load_config(ROOT / "params.yaml", [f"paths.{k}={tmp_path / v}" for k, v in
                                              PipelineConfig().paths.model_dump().items()])
    for dep in stages.get("pretrain_text").deps:
        path = Path(stages.resolve(dep, cfg))
        path.mkdir(parents=True)
        (path / "part-0").write_bytes(b"x")
    return cfg


def test_stage_identity_moves_with_inputs_and_declared_params(workspace, tmp_path):
    cfg = workspace
    base = stages.stage_identity(cfg, "pretrain_text")
    assert stages.stage_identity(cfg, "pretrain_text") == base
    # not dependencies: loader parallelism, tracking, another stage's keys
    for override in ("data.loader.num_workers=3", "tracking.experiment=other", "train.joint.steps=999",
                     "eval.registry.margin=0.5"):
        other = load_config(ROOT / "params.yaml", [*_paths(cfg), override])
        assert stages.stage_identity(other, "pretrain_text") == base, override
    for override in ("train.text.steps=999", "seed=7", "data.masking.text_mask_prob=0.3"):
        other = load_config(ROOT / "params.yaml", [*_paths(cfg), override])
        assert stages.stage_identity(other, "pretrain_text") != base, override
    # byte-code next to a dependency does not count; a changed byte of data does
    shard_dir = Path(stages.resolve("${paths.shard_index}/text", cfg))
    (shard_dir / "__pycache__").mkdir()
    (shard_dir / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert stages.stage_identity(cfg, "pretrain_text") == base
    (shard_dir / "part-0").write_bytes(b"y")
    assert stages.stage_identity(cfg, "pretrain_text") != base


def _paths(cfg: PipelineConfig) -> list[str]:
    return [f"paths.{k}={v}" for k, v in cfg.paths.model_dump().items()]


def test_stage_identity_moves_with_code(workspace, monkeypatch, tmp_path):
    cfg = workspace
    base = stages.stage_identity(cfg, "pretrain_text")
    fake_root = tmp_path / "project"
    shutil.copytree(ROOT / "flava", fake_root / "flava", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(stages, "PROJECT_ROOT", fake_root)
    assert stages.stage_identity(cfg, "pretrain_text") == base
    loop = fake_root / "flava" / "train" / "loop.py"
    loop.write_text(loop.read_text() + "\n# an edit\n")
    assert stages.stage_identity(cfg, "pretrain_text") != base
    monkeypatch.setattr(stages, "PROJECT_ROOT", ROOT)
    assert stages.stage_identity(cfg, "pretrain_text") == base


def test_unknown_stage_is_named():
    with pytest.raises(ValueError, match="unknown stage 'pretrain'"):
        stages.get("pretrain")


def test_dvc_yaml_declares_every_stage_output_dir_as_templates():
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in doc["stages"].items():
        for out in stage.get("outs", []):
            path = next(iter(out)) if isinstance(out, dict) else out
            assert path.startswith("${paths."), f"{name}: {path} should be templated from params.yaml"
