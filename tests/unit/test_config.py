import re
from pathlib import Path

import pytest
import yaml

from flava.config import PipelineConfig, apply_overrides, load_config, parse_override
from flava.model.config import preset

ROOT = Path(__file__).resolve().parents[2]


def test_params_yaml_validates():
    cfg = load_config(ROOT / "params.yaml")
    assert isinstance(cfg, PipelineConfig)
    assert cfg.flat()["tracking.experiment"] == cfg.tracking.experiment


def test_params_yaml_states_the_code_defaults():
    """params.yaml (what DVC tracks and users edit) and the typed defaults hold the same values: a default changed
    on one side only fails here, naming the keys."""
    stated, defaults = load_config(ROOT / "params.yaml").flat(), PipelineConfig().flat()
    drift = {k: (stated.get(k), defaults.get(k)) for k in stated.keys() | defaults.keys()
             if stated.get(k) != defaults.get(k)}
    assert not drift, f"params.yaml vs code defaults (key: (params.yaml, code)): {drift}"


def test_params_yaml_comment_example_validates():
    """The model-overrides example in params.yaml's comments is a valid config."""
    text = (ROOT / "params.yaml").read_text()
    example = re.search(r"# e\.g\. overrides: (\{.*\})\.", text)
    assert example, "params.yaml lost its model-overrides example"
    cfg = PipelineConfig.model_validate({"model": {"preset": "tiny", "overrides": yaml.safe_load(example.group(1))}})
    preset(cfg.model.preset, cfg.model.overrides)


def test_override_parses_yaml_values():
    assert parse_override("train.steps=20") == (["train", "steps"], 20)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ValueError, match="key.path=value"):
        parse_override("no-equals")
    with pytest.raises(ValueError, match="empty key"):
        parse_override("a..b=1")


def test_unknown_override_key_is_rejected_naming_the_field():
    with pytest.raises(ValueError, match="nonsense"):
        load_config(ROOT / "params.yaml", ["tracking.nonsense=1"])


def test_overrides_do_not_mutate_input_and_digest_changes():
    tree = {"seed": 0}
    out = apply_overrides(tree, ["seed=3"])
    assert tree == {"seed": 0} and out == {"seed": 3}
    a = load_config(ROOT / "params.yaml")
    b = load_config(ROOT / "params.yaml", ["seed=1"])
    assert a.digest() != b.digest()
