"""`flava data generate`: write the embedded synthetic world into ``paths.raw`` in the layout real data uses.

```
pairs/captions.jsonl + pairs/images/*.png         image-text pairs     {key, image (relative), caption}
images/<class>/*.png                               unpaired images      (ImageNet class-folder layout)
text/part-*.txt                                    unpaired text        (paragraphs separated by blank lines)
eval/zeroshot/classes.json, {train,val,test}.jsonl zero-shot classes + prompts; rows {image, label, attributes}
eval/retrieval/test.jsonl                          rows {image, captions: [5 captions]}
eval/text_cls/{train,val,test}.tsv (+ labels.json) "sentence<TAB>label": which attribute a sentence is about
eval/vqa/{train,val,test}.jsonl (+ answers.json)   rows {image, question, answer} with a closed answer set
```
Every sample is drawn from its own generator seeded by ``(seed, stream, index)``, PNGs carry no timestamps and
JSON keys are sorted, so the same seed gives byte-identical files.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from flava.data import world
from flava.data.jsonl import write_jsonl
from flava.data.prep_config import GenerateConfig

log = logging.getLogger(__name__)

MARKER = ".synthetic.json"  # marks a directory this generator owns (and may overwrite)
GENERATED = ("pairs", "images", "text", "eval")
SPLITS = ("train", "val", "test")
# One independent random stream per corpus / eval split, so changing one size never shifts another's samples.
_STREAMS = {"pairs": 1, "images": 2, "text": 3, "zeroshot": 10, "retrieval": 20, "text_cls": 30, "vqa": 40}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# Generator keys added after data.dvc was recorded: the marker names them only when they differ from their
# default, so the default world stays byte-identical (data.dvc's md5, ``flava.pipeline.SYNTHETIC_WORLD_MD5``).
_RECORDED_ONLY_WHEN_SET = ("object_radius",)


def _rng(seed: int, stream: str, index: int, split: str = "train") -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], _SPLIT_IDS[split], index])


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def class_folder(classname: str) -> str:
    """Folder name of a zero-shot class in the class-folder layout ("red circle" -> "red_circle")."""
    return classname.replace(" ", "_")


class _Writer:
    def __init__(self, gen: GenerateConfig, seed: int, root: Path):
        self.gen, self.seed, self.root = gen, seed, root
        self.classnames = [f"{c} {s}" for c in gen.colours for s in gen.shapes]  # label = index here

    def scene(self, rng: np.random.Generator, classname: str | None = None) -> world.Scene:
        colour, shape = classname.split(" ", 1) if classname else (None, None)
        return world.sample_scene(rng, self.gen.colours, self.gen.shapes, self.gen.max_count, colour, shape)

    def image(self, scene: world.Scene, rng: np.random.Generator, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        world.render(scene, rng, self.gen.image_size, self.gen.object_radius).save(
            path, format="PNG", compress_level=self.gen.png_compress_level
        )

    # ------------------------------------------------------------------ corpora
    def pairs(self) -> int:
        base = self.root / "pairs"

        def rows():
            for i in range(self.gen.pairs):
                rng = _rng(self.seed, "pairs", i)
                scene = self.scene(rng)
                rel = f"images/pair-{i:07d}.png"
                self.image(scene, rng, base / rel)
                yield {"key": f"pair-{i:07d}", "image": rel, "caption": world.captions(scene, rng)[0]}

        base.mkdir(parents=True, exist_ok=True)
        return write_jsonl(base / "captions.jsonl", rows())

    def images(self) -> int:
        n = 0
        for c, classname in enumerate(self.classnames):
            for j in range(self.gen.images_per_class):
                rng = _rng(self.seed, "images", c * self.gen.images_per_class + j)
                self.image(self.scene(rng, classname), rng,
                           self.root / "images" / class_folder(classname) / f"img-{j:06d}.png")
                n += 1
        return n

    def text(self) -> int:
        base = self.root / "text"
        base.mkdir(parents=True, exist_ok=True)
        files = [[] for _ in range(self.gen.text_files)]
        for i in range(self.gen.text_passages):
            rng = _rng(self.seed, "text", i)
            files[i % self.gen.text_files].append(world.passage(self.scene(rng), rng))
        for k, paragraphs in enumerate(files):
            (base / f"part-{k:03d}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
        return self.gen.text_passages

    # ------------------------------------------------------------------ evaluation sets
    def zeroshot(self) -> dict[str, int]:
        base = self.root / "eval" / "zeroshot"
        base.mkdir(parents=True, exist_ok=True)
        _write_json(base / "classes.json",
                    {"classnames": self.classnames, "templates": list(self.gen.prompt_templates)})
        counts = {}
        for split in SPLITS:
            per_class = self.gen.zeroshot_per_class[split]

            def rows():
                for label, classname in enumerate(self.classnames):
                    for j in range(per_class):
                        i = label * per_class + j
                        rng = _rng(self.seed, "zeroshot", i, split)
                        rel = f"images/{split}-{i:06d}.png"
                        scene = self.scene(rng, classname)
                        self.image(scene, rng, base / rel)
                        yield {"image": rel, "label": label, "attributes": scene.attributes}

            counts[split] = write_jsonl(base / f"{split}.jsonl", rows())
        return counts

    def retrieval(self) -> int:
        base = self.root / "eval" / "retrieval"

        def rows():
            for i in range(self.gen.retrieval_images):
                rng = _rng(self.seed, "retrieval", i, "test")
                scene = self.scene(rng)
                rel = f"images/test-{i:06d}.png"
                self.image(scene, rng, base / rel)
                yield {"image": rel, "captions": world.captions(scene, rng, self.gen.retrieval_captions)}

        base.mkdir(parents=True, exist_ok=True)
        return write_jsonl(base / "test.jsonl", rows())

    def text_cls(self) -> dict[str, int]:
        base = self.root / "eval" / "text_cls"
        base.mkdir(parents=True, exist_ok=True)
        _write_json(base / "labels.json", {"labels": list(world.TEXT_CLS_LABELS)})
        counts = {}
        for split in SPLITS:
            lines = ["sentence\tlabel"]
            for i in range(self.gen.text_cls[split]):
                sentence, label = world.text_cls_example(_rng(self.seed, "text_cls", i, split),
                                                         self.gen.colours, self.gen.shapes)
                lines.append(f"{sentence}\t{label}")
            (base / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
            counts[split] = len(lines) - 1
        return counts

    def vqa(self) -> dict[str, int]:
        base = self.root / "eval" / "vqa"
        base.mkdir(parents=True, exist_ok=True)
        _write_json(base / "answers.json",
                    {"answers": world.vqa_answers(self.gen.colours, self.gen.shapes, self.gen.max_count)})
        counts = {}
        for split in SPLITS:
            def rows():
                for i in range(self.gen.vqa[split]):
                    rng = _rng(self.seed, "vqa", i, split)
                    scene = self.scene(rng)
                    rel = f"images/{split}-{i:06d}.png"
                    self.image(scene, rng, base / rel)
                    question, answer = world.vqa_example(scene, rng)
                    yield {"image": rel, "question": question, "answer": answer}

            counts[split] = write_jsonl(base / f"{split}.jsonl", rows())
        return counts


def _recorded_config(gen: GenerateConfig) -> dict[str, Any]:
    """The generator config as the marker records it (see ``_RECORDED_ONLY_WHEN_SET``)."""
    at_default = {key for key in _RECORDED_ONLY_WHEN_SET
                  if getattr(gen, key) == GenerateConfig.model_fields[key].get_default(call_default_factory=True)}
    return gen.model_dump(mode="json", exclude=at_default)


def _prepare_root(root: Path) -> None:
    """Create ``root``, or clear what an earlier generation wrote there. A non-empty directory that this
    generator did not write (real data) is never touched."""
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise ValueError(
            f"{root} holds data that `flava data generate` did not write (no {MARKER}); refusing to overwrite it. "
            "Point paths.raw elsewhere or remove the directory."
        )
    for name in GENERATED:
        if (root / name).exists():
            shutil.rmtree(root / name)
    root.mkdir(parents=True, exist_ok=True)


def generate(gen: GenerateConfig, seed: int, root: str | Path) -> dict[str, Any]:
    """Write the synthetic world for ``seed`` into ``root``; returns the counts written."""
    root = Path(root)
    _prepare_root(root)
    start = time.perf_counter()
    writer = _Writer(gen, seed, root)
    counts = {
        "pairs": writer.pairs(),
        "images": writer.images(),
        "text_passages": writer.text(),
        "zeroshot": writer.zeroshot(),
        "retrieval": writer.retrieval(),
        "text_cls": writer.text_cls(),
        "vqa": writer.vqa(),
    }
    num_classes = len(writer.classnames)
    result = {
        "counts": counts,
        "zeroshot_classes": num_classes,
        "zeroshot_chance": 1.0 / num_classes,
        "text_cls_chance": 1.0 / len(world.TEXT_CLS_LABELS),
        "vqa_answers": len(world.vqa_answers(gen.colours, gen.shapes, gen.max_count)),
    }
    _write_json(root / MARKER, {"seed": seed, "generate": _recorded_config(gen), **result})
    result["seconds"] = round(time.perf_counter() - start, 3)
    log.info("synthetic world written to %s in %.1fs: %s", root, result["seconds"], counts)
    return result


def run_generate(cfg) -> dict[str, Any]:
    """Stage function of ``flava data generate`` (``cfg``: a ``PipelineConfig``)."""
    return generate(cfg.data.generate, cfg.seed, cfg.paths.raw)
