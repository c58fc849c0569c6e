"""The pure parts of flava.pipeline: the stage graph read from dvc.yaml, log levels of a stage's lines, the
decision line a person reads."""
from __future__ import annotations

import logging

import pytest
import yaml

from flava import pipeline as pl


def _dvc_yaml(tmp_path, stages: dict, params: dict | None = None):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    if params is not None:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return pl.dvc_stages(tmp_path)


def test_graph_keeps_direct_edges_only_and_resolves_templates(tmp_path):
    stages = _dvc_yaml(tmp_path, {
        "a": {"cmd": "x", "deps": ["${paths.raw}"], "outs": ["${paths.out}/a"]},
        "b": {"cmd": "x", "deps": ["${paths.out}/a"], "metrics": [{"reports/b.json": {"cache": False}}]},
        # reads a's output too, but through b: the a -> c edge is implied and dropped
        "c": {"cmd": "x", "deps": ["${paths.out}/a/part", "reports/b.json", "code/c.py"], "outs": ["c.bin"]},
        "d": {"cmd": "x", "deps": ["code/d.py"], "outs": ["d.bin"]},
    }, {"paths": {"raw": "data/raw", "out": "data/out"}})
    assert stages["b"].metrics == ("reports/b.json",) and stages["a"].outs == ("data/out/a",)
    graph = pl.stage_graph(stages, "data/raw")
    assert graph == {"raw_data": (), "d": (), "a": ("raw_data",), "b": ("a",), "c": ("b",)}
    assert list(graph).index("a") < list(graph).index("b") < list(graph).index("c")


def test_graph_names_an_undefined_template_and_a_cycle(tmp_path):
    with pytest.raises(ValueError, match=r"a\.deps: \$\{paths\.nope\} is not defined"):
        _dvc_yaml(tmp_path, {"a": {"cmd": "x", "deps": ["${paths.nope}"]}}, {"paths": {}})
    stages = _dvc_yaml(tmp_path, {"a": {"cmd": "x", "deps": ["b.out"], "outs": ["a.out"]},
                                  "b": {"cmd": "x", "deps": ["a.out"], "outs": ["b.out"]}}, {})
    with pytest.raises(ValueError, match="cycle"):
        pl.stage_graph(stages, "data/raw")


def test_the_project_graph_is_the_pipeline():
    graph = pl.stage_graph(pl.dvc_stages(pl.Path(__file__).resolve().parents[2]), "data/raw")
    assert graph["pretrain_text"] == ("shard", "fit") and graph["joint"] == ("pretrain_text", "pretrain_image")
    assert graph["evaluate"] == ("joint",) and graph["promote"] == ("evaluate",)


@pytest.mark.parametrize("line, level", [
    ("2026-12-03 09:00:00,000 WARNING flava.train: nonfinite loss", logging.WARNING),
    ("ERROR: failed to reproduce 'joint'", logging.ERROR),
    ("step 4 loss 1.25", logging.INFO),
    ("WARNING:root:a bare logging.warning", logging.WARNING),
    ("Running stage 'shard': ERROR handling is fine", logging.INFO),
])
def test_line_level(line, level):
    assert pl.line_level(line) == level


def test_decision_line_says_version_alias_scores_and_why_not():
    promoted = {"model_name": "flava", "version": 3, "decision": "champion", "promoted": True, "reasons": [],
                "compared_to": "2"}
    assert pl.decision_line(promoted, 0.5212, 0.48) == "flava v3 is @champion; overall 0.5212 vs 0.48 (v2)"
    held = dict(promoted, decision="challenger", promoted=False, reasons=["overall below champion + margin"])
    assert pl.decision_line(held, 0.47, 0.48) == ("flava v3 is @challenger; overall 0.47 vs 0.48 (v2); because: "
                                                  "overall below champion + margin")
    assert pl.decision_line({}, None, None).startswith("no promotion decision")
