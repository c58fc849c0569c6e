"""Zero-shot accuracy per attribute: which parts of a scene the model gets right, from the eval set's own labels.

A zero-shot set whose rows carry ``attributes`` (the synthetic world's ``{"colour", "shape", "size", "count",
"position", "background"}``) is scored two ways:

- an attribute the class name names (every row's value is a word of its class name, and each class name holds
  exactly one of the attribute's values: colour and shape in "red circle") gets an *attribute accuracy*: the share
  of images whose predicted class has the right value (a "blue circle" for a red circle is right on shape, wrong on
  colour), its chance level (a uniformly random class), and the same per true value;
- any other attribute (count, size, position, background: properties of the image, not of its class) gets top-1
  accuracy broken down by value: does the model fail on four small shapes more than on one large one?

Sets without attributes (real datasets) have no such block. Values are keyed by ``str(value)``; a null value (the
synthetic world's position when several objects are drawn) leaves that row out of that attribute's breakdown.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence


def _value_key(value: Any) -> tuple[int, Any]:
    """Sort integers numerically before strings alphabetically (counts 1, 2, ..., 10; sizes large, small)."""
    return (0, value) if isinstance(value, int) else (1, str(value))


def _rates(hits: dict[Any, list[bool]]) -> dict[str, float]:
    """``{str(value): share of hits}`` in value order."""
    return {str(v): sum(h) / len(h) for v, h in sorted(hits.items(), key=lambda kv: _value_key(kv[0]))}


def class_values(name: str, classnames: Sequence[str], labels: Sequence[int],
                 attributes: Sequence[dict[str, Any]]) -> list[str] | None:
    """Each class's value of attribute ``name`` when the class names name it, else None."""
    observed = {str(row[name]) for row in attributes if row.get(name) is not None}
    if not observed:
        return None
    words = [set(c.split()) for c in classnames]
    if any(row.get(name) is None or str(row[name]) not in words[label] for row, label in zip(attributes, labels)):
        return None
    values = []
    for class_words in words:
        named = class_words & observed
        if len(named) != 1:
            return None
        values.append(named.pop())
    return values


def attribute_accuracy(predictions: Sequence[int], labels: Sequence[int], classnames: Sequence[str],
                       attributes: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per attribute: ``{accuracy, chance, by_value}`` (class-named) or ``{top1_by_value}`` (per image); see the
    module docstring. ``predictions`` and ``labels`` are class indices, one per row of ``attributes``."""
    if not len(predictions) == len(labels) == len(attributes):
        raise ValueError(f"predictions, labels and attributes must have one entry per image, got "
                         f"{len(predictions)}, {len(labels)} and {len(attributes)}")
    if not attributes:
        raise ValueError("cannot compute attribute accuracy on an empty set")
    names = sorted({name for row in attributes for name in row})
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        per_class = class_values(name, classnames, labels, attributes)
        hits: dict[Any, list[bool]] = defaultdict(list)
        if per_class is not None:
            for pred, label in zip(predictions, labels):
                hits[per_class[label]].append(per_class[pred] == per_class[label])
            share = {v: per_class.count(v) / len(per_class) for v in set(per_class)}
            everything = [h for values in hits.values() for h in values]
            out[name] = {
                "accuracy": sum(everything) / len(everything),
                "chance": sum(share[per_class[label]] for label in labels) / len(labels),
                "by_value": _rates(hits),
            }
        else:
            for pred, label, row in zip(predictions, labels, attributes):
                if row.get(name) is not None:
                    hits[row[name]].append(pred == label)
            if hits:
                out[name] = {"top1_by_value": _rates(hits)}
    return out
