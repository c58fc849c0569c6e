"""Which attributes does a trained model's joint embedding space keep apart, on each tower?

For every class-named attribute of the zero-shot set (``flava.eval.attributes.class_values``: on the synthetic
world, colour and shape), it compares classes that differ *only* in that attribute. On the text side a class is
its zero-shot class embedding (``flava.eval.zeroshot.class_embeddings``: the prompts' mean); on the image side it
is the renormalised mean embedding of that class's images in ``--split``. A mean cosine near 1 between classes
that differ only in ``shape`` means that tower maps them to one point: the attribute has collapsed there, and no
zero-shot classifier over that space can tell them apart, however the other tower does.

    cd <run> && python <repo>/benchmarks/attribute_collapse.py --model models/joint/best --eval-root data/prepared/eval

Run it in the run's root directory: the evaluation rows name their images relative to it.

Not a test: it reads a model and an evaluation set that a run wrote (``flava pipeline run`` or
``benchmarks/learning.py --workdir``) and prints one table.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flava.data.tokenizer import load_tokenizer  # noqa: E402
from flava.eval.attributes import class_values  # noqa: E402
from flava.eval.datasets import load_zeroshot  # noqa: E402
from flava.eval.features import default_transform, encode_images  # noqa: E402
from flava.eval.zeroshot import class_embeddings  # noqa: E402
from flava.model.io import load_model  # noqa: E402


def differing_only_in(values: dict[str, list[str]], attribute: str) -> list[tuple[int, int]]:
    """Class index pairs whose value of ``attribute`` differs while every other class-named attribute agrees."""
    n = len(values[attribute])
    return [(i, j) for i, j in itertools.combinations(range(n), 2)
            if values[attribute][i] != values[attribute][j]
            and all(v[i] == v[j] for name, v in values.items() if name != attribute)]


def mean_cosine(embeddings: torch.Tensor, pairs: list[tuple[int, int]]) -> float:
    return float(torch.stack([embeddings[i] @ embeddings[j] for i, j in pairs]).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a saved model directory (with tokenizer/)")
    parser.add_argument("--eval-root", required=True, type=Path, help="paths.prepared/eval of the run")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64, help="data.tokenizer.max_length of the run")
    args = parser.parse_args(argv)

    model = load_model(args.model).eval()
    tokenizer = load_tokenizer(args.model / "tokenizer")
    data = load_zeroshot(args.eval_root, args.split)
    if data.attributes is None:
        raise SystemExit(f"{args.eval_root}: the {args.split} rows carry no attributes: nothing to compare")
    names = sorted({name for row in data.attributes for name in row})
    values = {name: v for name in names
              if (v := class_values(name, data.classnames, data.labels, data.attributes)) is not None}
    if len(values) < 2:
        raise SystemExit(f"the class names name {sorted(values)} only: need two attributes to hold one fixed")

    with torch.no_grad():
        text = class_embeddings(model, tokenizer, data.classnames, data.templates, batch_size=args.batch_size,
                                device="cpu", max_length=args.max_length)
        images = F.normalize(encode_images(model, data.images, default_transform(model),
                                           batch_size=args.batch_size, device="cpu"), dim=-1)
    labels = torch.tensor(data.labels)
    present = [k for k in range(len(data.classnames)) if bool((labels == k).any())]
    image = torch.zeros_like(text)
    for k in present:
        image[k] = F.normalize(images[labels == k].mean(dim=0), dim=-1)

    print(f"model {args.model}, {args.split}: {len(data.labels)} images, {len(data.classnames)} classes")
    print("| classes differing only in | pairs | text cosine | image cosine |")
    print("|---|---|---|---|")
    for attribute in values:
        pairs = [(i, j) for i, j in differing_only_in(values, attribute) if i in present and j in present]
        if pairs:
            print(f"| {attribute} | {len(pairs)} | {mean_cosine(text, pairs):.3f} | {mean_cosine(image, pairs):.3f} |")


if __name__ == "__main__":
    main()
