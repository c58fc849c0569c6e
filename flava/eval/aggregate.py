"""Per-task headline scores, chance-level baselines and the paper's macro averages.

Each task contributes one number in [0, 1] to its domain (FLAVA paper, Table 1 groups tasks into vision,
language and multimodal): zero-shot top-1 and linear-probe accuracy (vision), text fine-tune accuracy or Pearson r
(language), retrieval mean recall per direction and VQA accuracy (multimodal). A domain's macro is the mean of its
tasks; ``overall`` is the mean of the domain macros, as the paper's "Macro Avg." averages its three domains.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

# task -> domain
TASK_DOMAINS = {
    "zeroshot": "vision",
    "linear_probe": "vision",
    "text_cls": "language",
    "retrieval_i2t": "multimodal",
    "retrieval_t2i": "multimodal",
    "vqa": "multimodal",
}
DOMAINS = ("vision", "language", "multimodal")


def majority_rate(labels: Sequence, top: int = 1) -> float:
    """Accuracy of always predicting the ``top`` most frequent labels (the best constant guess)."""
    if not labels:
        raise ValueError("majority_rate needs at least one label")
    counts = Counter(labels).most_common(top)
    return sum(c for _, c in counts) / len(labels)


def macro_averages(tasks: dict[str, float]) -> dict[str, float]:
    """``{"vision": ..., "language": ..., "multimodal": ..., "overall": ...}`` over the tasks that ran."""
    unknown = sorted(set(tasks) - set(TASK_DOMAINS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASK_DOMAINS)}")
    if not tasks:
        raise ValueError("no task scores to average")
    out: dict[str, float] = {}
    for domain in DOMAINS:
        scores = [v for t, v in tasks.items() if TASK_DOMAINS[t] == domain]
        if scores:
            out[domain] = sum(scores) / len(scores)
    out["overall"] = sum(out.values()) / len(out)
    return out
