"""Can the ``small`` image tower see shape at all? A supervised ceiling for the synthetic world's shape attribute.

The FLAVA recipe on the synthetic world learns colour but leaves shape at chance (benchmarks/README.md, "Learning
curves and the paper's ablations"). This script separates "the tower cannot learn shape at this budget" from "the
pretraining targets and the contrastive signal do not ask for shape": it trains the ``small`` preset's image encoder
plus a linear head on its CLS state with cross-entropy on the world's labelled ``images`` corpus (24 colour x shape
classes), with the joint stage's batch size and the ``small`` recipe's optimiser, schedule and gradient clipping,
from

- ``random``: the image tower as the model initialises it (``FlavaForPretraining(seed=...)``);
- ``mim``: the image tower after the unimodal image stage (MIM on the k-means codebook, run here through
  ``run_pretrain``),
- ``cnn``: not FLAVA's tower but a reference for how fast this data teaches shape to a network built for local
  structure: four 3x3 convolutions (GroupNorm, GELU, 2x2 max-pool each) to the tower's width, global average pool,
  the same head and recipe;

and reports, at each ``--eval-at`` step, held-out accuracy on the zero-shot ``test`` split: 24-class top-1 and the
colour and shape of the predicted class (``flava.eval.attributes``). Baselines that train nothing in the tower:
linear probes (``flava.eval.probe.linear_probe``: C swept on the zero-shot ``val`` split) on the frozen CLS state
of both initial towers, fitted to the 24 classes, to colour alone and to shape alone.

The world is made once with ``benchmarks/learning.py``'s helpers (``params.yaml`` plus ``--set`` overrides).

    python benchmarks/shape_ceiling.py --threads 1                       # 600 steps, evaluated at 150/300/600
    python benchmarks/shape_ceiling.py --steps 20 --eval-at 10,20 --unimodal-steps 10  # smoke
    python benchmarks/shape_ceiling.py --inits random,cnn --steps 300 --eval-at 100,200,300 \
        [--set model.overrides.image.stem=conv] [--pool mean]       # the tower's inductive bias
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import table  # noqa: E402
from benchmarks.learning import config, make_world  # noqa: E402
from flava.config import PipelineConfig, parse_override  # noqa: E402
from flava.data import jsonl  # noqa: E402
from flava.data.packs import read_ref  # noqa: E402
from flava.data.synthetic import class_folder  # noqa: E402
from flava.data.transforms import ImageTransform, decode_image, load_pixel_batch, transform_from_config  # noqa: E402
from flava.eval.attributes import attribute_accuracy, class_values  # noqa: E402
from flava.eval.datasets import ZeroShotSet, load_zeroshot  # noqa: E402
from flava.eval.probe import linear_probe  # noqa: E402
from flava.model.encoders import ImageEncoder  # noqa: E402
from flava.model.io import load_model  # noqa: E402
from flava.model.pretraining import FlavaForPretraining  # noqa: E402
from flava.train.optim import build_optimizer, build_scheduler  # noqa: E402
from flava.train.stages import run_pretrain, seed_dropout  # noqa: E402

ATTRIBUTES = ("colour", "shape")
INITS = ("random", "mim", "cnn")
POOLS = ("cls", "mean")


class ReferenceCNN(nn.Module):
    """The ``cnn`` reference: (conv 3x3, GroupNorm, GELU, max-pool 2x2) x 4, widths 32, 64, 128 and ``width``,
    then the mean over positions; PyTorch's default initialisation from ``generator``'s seed."""

    def __init__(self, width: int, generator: torch.Generator):
        super().__init__()
        with torch.random.fork_rng():  # default init draws from the global RNG: fork it, seeded from ours
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            widths, layers = (3, 32, 64, 128, width), []
            for c_in, c_out in zip(widths[:-1], widths[1:]):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(1, c_out), nn.GELU(), nn.MaxPool2d(2)]
            self.net = nn.Sequential(*layers)
        self.width = width

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, width)
        return self.net(pixel_values).mean(dim=(2, 3))


class Classifier(nn.Module):
    """The image tower and a linear head on its CLS state (after the final LayerNorm, as ``image_features``), or
    on the mean of its patch states (``pool="mean"``), or the reference CNN and the same head."""

    def __init__(self, encoder: ImageEncoder | ReferenceCNN, num_classes: int, generator: torch.Generator,
                 pool: str = "cls"):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        width = encoder.width if isinstance(encoder, ReferenceCNN) else encoder.cfg.hidden_size
        self.head = nn.Linear(width, num_classes)
        nn.init.normal_(self.head.weight, std=width ** -0.5, generator=generator)
        nn.init.zeros_(self.head.bias)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if isinstance(self.encoder, ReferenceCNN):
            return self.encoder(pixel_values)
        if self.pool == "mean":
            return self.encoder(pixel_values).hidden[:, 1:].mean(dim=1)
        return self.encoder(pixel_values, cls_only=True).cls

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes)
        return self.head(self.features(pixel_values))


def corpus_images(cfg: PipelineConfig, classnames: list[str]) -> tuple[list[str], list[int]]:
    """The validated ``images`` corpus (class-folder labels such as ``red_circle``) as paths and class indices of
    the zero-shot class list."""
    index = {class_folder(name): i for i, name in enumerate(classnames)}
    path = Path(cfg.paths.validated) / "images.jsonl"
    paths, labels = [], []
    for i, row in enumerate(jsonl.read_jsonl(path)):
        if row.get("label") not in index:
            raise ValueError(f"{path}: row {i} has label {row.get('label')!r}, not one of the zero-shot classes "
                             f"{sorted(index)}")
        paths.append(row["image"])
        labels.append(index[row["label"]])
    return paths, labels


def pixels(refs: list[str], transform: ImageTransform) -> torch.Tensor:
    """Every image (a path or a pack reference ``<tar>#<offset>+<size>``) decoded and transformed once:
    (N, 3, H, W); the world's few thousand 64 px images fit in memory."""
    return load_pixel_batch([decode_image(read_ref(ref)) for ref in refs], transform)


def scores(predictions: list[int], test: ZeroShotSet) -> dict[str, float]:
    """24-class top-1 and the colour and shape accuracy of the predicted class."""
    labels = test.labels
    attrs = attribute_accuracy(predictions, labels, test.classnames, test.attributes)
    out = {"top1": sum(p == t for p, t in zip(predictions, labels)) / len(labels)}
    out.update({name: attrs[name]["accuracy"] for name in ATTRIBUTES})
    return out


@torch.no_grad()
def predict(model: Classifier, x: torch.Tensor, batch_size: int) -> list[int]:
    model.eval()
    out = [model(x[i:i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)]
    model.train()
    return torch.cat(out).tolist()


def train_supervised(cfg: PipelineConfig, encoder: ImageEncoder | ReferenceCNN,
                     train: tuple[torch.Tensor, torch.Tensor], test_x: torch.Tensor, test: ZeroShotSet, *,
                     steps: int, eval_at: list[int], seed: int, pool: str = "cls") -> list[dict[str, Any]]:
    """Cross-entropy on ``train`` for ``steps`` with the joint stage's batch and the recipe's optimiser; one row of
    held-out scores per ``eval_at`` step."""
    tc = cfg.train
    generator = torch.Generator().manual_seed(seed)
    model = Classifier(encoder, len(test.classnames), generator, pool)
    optimizer = build_optimizer(model, tc.optimizer, tc.stage_lr("joint"), torch.device("cpu"))
    scheduler = build_scheduler(optimizer, tc.schedule, total_steps=steps, warmup_steps=tc.stage_warmup("joint"))
    seed_dropout(seed)  # dropout (off in the presets) is the only user of the global RNG
    x, y = train
    batch = tc.joint.batch_size
    order = torch.randperm(len(x), generator=generator)
    cursor, rows, train_s = 0, [], 0.0
    model.train()
    for step in range(1, steps + 1):
        start = time.perf_counter()
        if cursor + batch > len(order):  # a fresh permutation per epoch; the remainder is dropped
            order, cursor = torch.randperm(len(x), generator=generator), 0
        idx = order[cursor:cursor + batch]
        cursor += batch
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        scheduler.step()
        train_s += time.perf_counter() - start
        if step in eval_at:
            rows.append({"step": step, "loss": loss.item(), **scores(predict(model, test_x, tc.eval_batch_size), test),
                         "steps_per_s": step / train_s})
    return rows


def probes(cfg: PipelineConfig, encoder: ImageEncoder, sets: dict[str, tuple[torch.Tensor, list[int]]],
           test: ZeroShotSet, seed: int) -> dict[str, float]:
    """Linear probes on the frozen CLS state: 24 classes, colour alone, shape alone (test accuracy each)."""
    feats = {}
    with torch.no_grad():
        encoder.eval()
        for split, (x, _) in sets.items():
            feats[split] = torch.cat([encoder(x[i:i + 256], cls_only=True).cls for i in range(0, len(x), 256)])
    per_class = {name: class_values(name, test.classnames, test.labels, test.attributes) for name in ATTRIBUTES}
    out = {}
    for target in ("class", *ATTRIBUTES):
        def labels(classes: list[int]) -> np.ndarray:
            if target == "class":
                return np.asarray(classes)
            values = sorted(set(per_class[target]))
            return np.asarray([values.index(per_class[target][c]) for c in classes])

        data = [(feats[s].numpy().astype(np.float64), labels(sets[s][1])) for s in ("train", "val", "test")]
        out[target] = linear_probe(*data, cfg.eval.probe, seed=seed)["accuracy"]
    return out


def mim_encoder(root: Path, args: argparse.Namespace) -> tuple[Path, float]:
    """The unimodal image stage (MIM) of the recipe, run once; returns its model directory and seconds."""
    ucfg = config(root, args, root / "unimodal", args.seed, {})
    start = time.perf_counter()
    out = run_pretrain(ucfg, "image")
    return Path(out["model_dir"]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="supervised steps per run (one cosine schedule)")
    parser.add_argument("--eval-at", default="150,300,600", help="comma-separated steps to evaluate at")
    parser.add_argument("--unimodal-steps", type=int, default=None,
                        help="image (MIM) stage steps (default: the small train preset's)")
    parser.add_argument("--inits", default=",".join(INITS), help=f"comma-separated, from {', '.join(INITS)}")
    parser.add_argument("--pool", choices=POOLS, default="cls",
                        help="the supervised head reads the CLS state or the mean of the patch states")
    parser.add_argument("--seed", type=int, default=0, help="model init, batch order and MIM masking")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="results.json (default: a temp dir)")
    parser.add_argument("--workdir", type=Path, default=None, help="world and MIM model (default: temp)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml override (repeatable; the value is YAML)")
    args = parser.parse_args()
    try:
        args.set = {".".join(path): value for path, value in map(parse_override, args.set)}
        eval_at = sorted({int(s) for s in args.eval_at.split(",") if s.strip()})
    except ValueError as err:
        parser.error(str(err))
    if not eval_at or eval_at[-1] > args.steps or eval_at[0] < 1:
        parser.error(f"--eval-at {args.eval_at}: steps in [1, {args.steps}] expected")
    inits = [i.strip() for i in args.inits.split(",") if i.strip()]
    if not inits or set(inits) - set(INITS):
        parser.error(f"--inits {args.inits}: choose from {', '.join(INITS)}")
    args.eval_every = args.steps  # what learning.config needs for its joint-stage keys; no joint stage runs here
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="flava-shape-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flava-shape-work-") as tmp:
        root = args.workdir or Path(tmp)
        cfg = config(root, args, root / "world", None, {})  # params.yaml's seed: the world learning.py makes
        world_s = make_world(cfg)
        mim_dir, mim_s = mim_encoder(root, args)
        eval_root = Path(cfg.paths.prepared) / "eval"
        zs = {split: load_zeroshot(eval_root, split) for split in ("val", "test")}
        test = zs["test"]
        transform = transform_from_config(cfg, train=False)
        train_paths, train_labels = corpus_images(cfg, test.classnames)
        sets = {"train": (pixels(train_paths, transform), train_labels),
                **{s: (pixels(zs[s].images, transform), zs[s].labels) for s in zs}}
        mim = load_model(mim_dir)
        towers = {"random": lambda: FlavaForPretraining(mim.config, seed=args.seed).image_encoder,
                  "mim": lambda: load_model(mim_dir).image_encoder,
                  "cnn": lambda: ReferenceCNN(mim.config.image.hidden_size, torch.Generator().manual_seed(args.seed))}
        results: dict[str, Any] = {"probe": {}, "supervised": {}}
        for name in inits:
            if name != "cnn":  # the probes read the FLAVA tower's CLS state
                results["probe"][name] = probes(cfg, towers[name](), sets, test, args.seed)
        train = (sets["train"][0], torch.tensor(train_labels))
        for name in inits:
            start = time.perf_counter()
            results["supervised"][name] = train_supervised(cfg, towers[name](), train, sets["test"][0], test,
                                                           steps=args.steps, eval_at=eval_at, seed=args.seed,
                                                           pool=args.pool)
            results["supervised"][name][-1]["wall_s"] = time.perf_counter() - start
            (out / "results.json").write_text(json.dumps({"settings": {**vars(args), "out": str(out),
                                                                        "workdir": str(root)},
                                                          "world_s": world_s, "mim_s": mim_s, **results},
                                                         indent=2, default=str) + "\n")
    rows = [[f"probe (frozen CLS), {name} init", "0", f"{p['class']:.3f}", f"{p['colour']:.3f}",
             f"{p['shape']:.3f}", "", ""] for name, p in results["probe"].items()]
    for name, curve in results["supervised"].items():
        rows += [[f"supervised, {name} init", str(r["step"]), f"{r['top1']:.3f}", f"{r['colour']:.3f}",
                  f"{r['shape']:.3f}", f"{r['loss']:.3f}", f"{r['steps_per_s']:.2f}"] for r in curve]
    print(f"\nheld-out zero-shot test split ({len(test.labels)} images; chance: top-1 {1 / len(test.classnames):.3f}, "
          f"colour/shape of the predicted class ~1/6 and 1/4); train: images corpus ({len(train_labels)} images)")
    print("probe rows: colour and shape are probes fitted to that attribute alone\n")
    print(table(["arm", "step", "24-class top-1", "colour", "shape", "train loss", "steps/s"], rows))
    print(f"\nworld {world_s:.0f} s; MIM image stage {mim_s:.0f} s; results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
