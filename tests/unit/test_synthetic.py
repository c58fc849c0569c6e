"""The synthetic world: layout of ``paths.raw``, byte-identical output per seed, labels consistent with pixels."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from flava.config import PipelineConfig
from flava.data import world
from flava.data.prep_config import GenerateConfig
from flava.data.synthetic import MARKER, run_generate

SMALL = {
    "pairs": 24, "images_per_class": 2, "text_passages": 12, "text_files": 2,
    "zeroshot_per_class": {"train": 2, "val": 1, "test": 1}, "retrieval_images": 6,
    "text_cls": {"train": 20, "val": 5, "test": 5}, "vqa": {"train": 8, "val": 4, "test": 4},
    "colours": ["red", "green", "blue"], "shapes": ["circle", "square"], "image_size": 32,
}


def make_cfg(raw: Path, seed: int = 0, **gen) -> PipelineConfig:
    return PipelineConfig.model_validate({"seed": seed, "paths": {"raw": str(raw)},
                                          "data": {"generate": {**SMALL, **gen}}})


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_layout_and_counts(tmp_path):
    raw = tmp_path / "raw"
    result = run_generate(make_cfg(raw))
    counts = result["counts"]
    assert counts["pairs"] == 24 and counts["images"] == 6 * 2 and counts["text_passages"] == 12
    assert result["zeroshot_classes"] == 6 and result["zeroshot_chance"] == pytest.approx(1 / 6)

    pairs = read_jsonl(raw / "pairs" / "captions.jsonl")
    assert len(pairs) == 24 and len({p["key"] for p in pairs}) == 24
    for row in pairs:
        assert set(row) == {"key", "image", "caption"}
        img = Image.open(raw / "pairs" / row["image"])
        assert img.size == (32, 32) and img.mode == "RGB"
        assert row["caption"].strip()

    folders = sorted(p.name for p in (raw / "images").iterdir())
    assert folders == sorted(f"{c}_{s}" for c in SMALL["colours"] for s in SMALL["shapes"])
    assert all(len(list((raw / "images" / f).glob("*.png"))) == 2 for f in folders)

    paragraphs = [p for f in sorted((raw / "text").glob("*.txt")) for p in f.read_text().split("\n\n") if p.strip()]
    assert len(paragraphs) == 12

    classes = json.loads((raw / "eval" / "zeroshot" / "classes.json").read_text())
    assert classes["classnames"][0] == "red circle" and len(classes["classnames"]) == 6
    assert len(classes["templates"]) >= 3 and all("{}" in t for t in classes["templates"])
    for split, per_class in SMALL["zeroshot_per_class"].items():
        rows = read_jsonl(raw / "eval" / "zeroshot" / f"{split}.jsonl")
        assert sorted({r["label"] for r in rows}) == list(range(6)) and len(rows) == 6 * per_class
        assert all((raw / "eval" / "zeroshot" / r["image"]).is_file() for r in rows)

    retrieval = read_jsonl(raw / "eval" / "retrieval" / "test.jsonl")
    assert len(retrieval) == 6
    for row in retrieval:
        assert len(row["captions"]) == 5 and len(set(row["captions"])) == 5

    for split, n in SMALL["text_cls"].items():
        lines = (raw / "eval" / "text_cls" / f"{split}.tsv").read_text().splitlines()
        assert lines[0] == "sentence\tlabel" and len(lines) == n + 1
        assert all(int(line.split("\t")[1]) in range(len(world.TEXT_CLS_LABELS)) for line in lines[1:])

    answers = set(json.loads((raw / "eval" / "vqa" / "answers.json").read_text())["answers"])
    for split, n in SMALL["vqa"].items():
        rows = read_jsonl(raw / "eval" / "vqa" / f"{split}.jsonl")
        assert len(rows) == n and all(r["answer"] in answers and r["question"].endswith("?") for r in rows)


def test_zeroshot_rows_carry_their_scene_attributes(tmp_path):
    """Per-attribute accuracy reads the scene from the eval rows: colour and shape are the class's, the rest
    varies per image, position only for a single object; and the same seed writes the same attributes."""
    run_generate(make_cfg(tmp_path / "a", zeroshot_per_class={"train": 6, "val": 1, "test": 1}))
    run_generate(make_cfg(tmp_path / "b", zeroshot_per_class={"train": 6, "val": 1, "test": 1}))
    zs = tmp_path / "a" / "eval" / "zeroshot"
    classnames = json.loads((zs / "classes.json").read_text())["classnames"]
    rows = read_jsonl(zs / "train.jsonl")
    assert rows == read_jsonl(tmp_path / "b" / "eval" / "zeroshot" / "train.jsonl")
    for row in rows:
        attrs = row["attributes"]
        assert set(attrs) == {"colour", "shape", "size", "count", "position", "background"}
        assert f"{attrs['colour']} {attrs['shape']}" == classnames[row["label"]]
        assert attrs["size"] in world.SIZES and attrs["background"] in world.BACKGROUNDS
        assert 1 <= attrs["count"] <= GenerateConfig().max_count
        assert (attrs["position"] in world.POSITIONS) if attrs["count"] == 1 else attrs["position"] is None
    assert len({r["attributes"]["count"] for r in rows}) > 1 and len({r["attributes"]["size"] for r in rows}) > 1


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    run_generate(make_cfg(tmp_path / "a", seed=3))
    run_generate(make_cfg(tmp_path / "b", seed=3))
    run_generate(make_cfg(tmp_path / "c", seed=4))
    a, b, c = (digest_tree(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_regenerating_clears_stale_files_but_never_touches_foreign_data(tmp_path):
    raw = tmp_path / "raw"
    run_generate(make_cfg(raw, pairs=30))
    run_generate(make_cfg(raw, pairs=10))
    assert len(list((raw / "pairs" / "images").glob("*.png"))) == 10
    assert (raw / MARKER).is_file()

    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("real data")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        run_generate(make_cfg(foreign))
    assert (foreign / "mine.txt").read_text() == "real data"


def _object_colour(img: Image.Image) -> str:
    """The palette colour nearest to the image's saturated (non-grey) pixels."""
    arr = np.asarray(img, dtype=np.float32).reshape(-1, 3)
    saturated = arr[(arr.max(1) - arr.min(1)) > 60]
    mean = saturated.mean(0)
    return min(world.COLOURS, key=lambda name: np.sum((np.array(world.COLOURS[name]) - mean) ** 2))


def test_labels_and_captions_agree_with_pixels(tmp_path):
    """Learnable by construction: the object colour in the pixels is the labelled/captioned one."""
    raw = tmp_path / "raw"
    run_generate(make_cfg(raw))
    classnames = json.loads((raw / "eval" / "zeroshot" / "classes.json").read_text())["classnames"]
    for row in read_jsonl(raw / "eval" / "zeroshot" / "train.jsonl"):
        colour = _object_colour(Image.open(raw / "eval" / "zeroshot" / row["image"]))
        assert classnames[row["label"]].startswith(colour)
    for row in read_jsonl(raw / "pairs" / "captions.jsonl"):
        assert _object_colour(Image.open(raw / "pairs" / row["image"])) in row["caption"]


def test_config_rejects_unknown_names_and_bad_splits():
    with pytest.raises(ValidationError, match="colours"):
        GenerateConfig(colours=["red", "chartreuse"])
    with pytest.raises(ValidationError, match="shapes"):
        GenerateConfig(shapes=["circle", "circle"])
    with pytest.raises(ValidationError, match="vqa"):
        GenerateConfig(vqa={"train": 1, "test": 1})
    with pytest.raises(ValidationError, match="prompt_templates"):
        GenerateConfig(prompt_templates=["no slot"])
    with pytest.raises(ValidationError, match="object_radius"):
        GenerateConfig(object_radius={"small": (0.12, 0.09)})
    with pytest.raises(ValidationError, match="object_radius"):
        GenerateConfig(object_radius={"small": (0.12, 0.09), "large": (0.6, 0.15)})


def _object_pixels(img: Image.Image) -> int:
    arr = np.asarray(img, dtype=np.int16)
    return int(((arr.max(2) - arr.min(2)) > 60).sum())


@pytest.mark.parametrize("count", [1, 3])
def test_object_radius_sets_the_drawn_size(count):
    """Twice the configured radius (alone or in the grid) draws about four times the object pixels."""
    scene = world.Scene(colour="red", shape="square", size="small", count=count,
                        position="center" if count == 1 else None, background="plain")
    base = {"small": (0.1, 0.07), "large": (0.2, 0.14)}
    twice = {"small": (0.2, 0.14), "large": (0.4, 0.28)}
    area, area_twice = (_object_pixels(world.render(scene, np.random.default_rng(5), 128, radii))
                        for radii in (base, twice))
    assert 3.5 < area_twice / area < 4.5


def test_object_radius_changes_only_the_pixels_and_the_marker_names_it_only_when_set(tmp_path):
    run_generate(make_cfg(tmp_path / "default"))
    run_generate(make_cfg(tmp_path / "larger", object_radius={"small": (0.18, 0.13), "large": (0.3, 0.2)}))
    default, larger = digest_tree(tmp_path / "default"), digest_tree(tmp_path / "larger")
    assert default.keys() == larger.keys()
    differ = {path for path in default if default[path] != larger[path]} - {MARKER}
    assert differ and all(path.endswith(".png") for path in differ)  # same scenes, captions, labels
    recorded = [json.loads((tmp_path / name / MARKER).read_text())["generate"] for name in ("default", "larger")]
    assert "object_radius" not in recorded[0]  # the default world's bytes (data.dvc) stay as recorded
    assert recorded[1]["object_radius"] == {"small": [0.18, 0.13], "large": [0.3, 0.2]}
