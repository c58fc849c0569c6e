"""Report figures (matplotlib, Agg backend; no display needed): per-task bars against chance, retrieval recall
curves, zero-shot accuracy per attribute value and the zero-shot confusion matrix. Each function writes one PNG
and returns its path."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def task_bars(tasks: dict[str, float], chance: dict[str, float], path: Path, dpi: int) -> Path:
    names = list(tasks)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names)), 3.2))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [tasks[n] for n in names], width=0.4, label="model")
    ax.bar([x + 0.2 for x in xs], [chance.get(n, 0.0) for n in names], width=0.4, label="chance", color="0.7")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title("Evaluation tasks")
    ax.legend(loc="upper right", fontsize="small")
    return _save(fig, path, dpi)


def recall_curves(curves: dict[str, list[float]], chance: dict[str, list[float]] | None, path: Path,
                  dpi: int) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    labels = {"i2t": "image -> text", "t2i": "text -> image"}
    for key, curve in curves.items():
        ks = list(range(1, len(curve) + 1))
        (line,) = ax.plot(ks, curve, marker="o", markersize=3, label=labels.get(key, key))
        if chance and key in chance:
            ax.plot(ks, chance[key][: len(ks)], linestyle="--", color=line.get_color(), alpha=0.6,
                    label=f"chance {labels.get(key, key)}")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1.02)
    ax.set_title("Zero-shot retrieval")
    ax.legend(fontsize="small")
    return _save(fig, path, dpi)


def confusion(matrix: Sequence[Sequence[int]], classnames: Sequence[str], path: Path, dpi: int) -> Path:
    n = len(classnames)
    size = min(12.0, 2.0 + 0.35 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classnames, rotation=90, fontsize="x-small")
    ax.set_yticks(range(n), classnames, fontsize="x-small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Zero-shot confusion matrix")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path, dpi)


def attribute_bars(attributes: dict[str, dict[str, Any]], path: Path, dpi: int) -> Path:
    """One panel per attribute, one bar per value (``flava.eval.attributes`` layout): attribute accuracy with its
    chance level dashed for attributes the class names name, top-1 accuracy for the others."""
    names = sorted(attributes, key=lambda n: "by_value" not in attributes[n])  # class attributes first
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 3.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        block = attributes[name]
        named = "by_value" in block
        values = block["by_value"] if named else block["top1_by_value"]
        ax.bar(range(len(values)), list(values.values()), color="tab:blue" if named else "tab:orange")
        ax.set_xticks(range(len(values)), list(values), rotation=45, ha="right", fontsize="small")
        if named:
            ax.axhline(block["chance"], linestyle="--", color="0.4")
            ax.set_title(f"{name}: {block['accuracy']:.2f} (chance {block['chance']:.2f}, dashed)", fontsize="small")
        else:
            ax.set_title(f"top-1 by {name}", fontsize="medium")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    fig.suptitle("Zero-shot: predicted class right on the attribute (blue), top-1 per image attribute (orange)",
                 fontsize="small")
    return _save(fig, path, dpi)


def _save(fig, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
