"""The promotion gate: does a candidate's evaluation beat the champion's, or chance when there is no champion?

Pure: it reads the ``metrics.json`` dicts that ``flava evaluate`` writes (``macro``, ``tasks``, ``chance``) and the
``eval.registry`` settings, and returns a :class:`Decision` with its reasons; ``flava.tracking.registry`` applies it
to the MLflow registry. The rules are in that module's docstring.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flava.eval.aggregate import DOMAINS, macro_averages
from flava.eval.config import RegistryConfig


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    deltas: dict[str, float] = field(default_factory=dict)


def macros(metrics: dict[str, Any]) -> dict[str, float]:
    """The ``macro`` averages of an evaluation's metrics as floats; ValueError when ``macro.overall`` is missing."""
    macro = metrics.get("macro")
    if not isinstance(macro, dict) or "overall" not in macro:
        raise ValueError("evaluation metrics lack 'macro.overall' (run `flava evaluate` first)")
    return {k: float(v) for k, v in macro.items() if isinstance(v, (int, float))}


def above_chance(score: float, chance: float, rcfg: RegistryConfig) -> bool:
    """Strictly above chance: by more than ``chance_margin`` plus the stated float tolerance ``chance_tolerance``."""
    return score > chance + rcfg.chance_margin + rcfg.chance_tolerance


def gate(candidate: dict[str, Any], champion: dict[str, Any] | None, rcfg: RegistryConfig) -> Decision:
    """Decide whether ``candidate`` (an evaluation metrics dict) replaces ``champion`` (or becomes the first)."""
    cand = macros(candidate)
    if champion is None:
        return _chance_gate(candidate, rcfg)
    champ = macros(champion)
    reasons = []
    deltas = {"overall": cand["overall"] - champ["overall"]}
    if deltas["overall"] < rcfg.margin or deltas["overall"] <= 0:
        reasons.append(
            f"overall macro {cand['overall']:.4f} is not better than champion {champ['overall']:.4f} "
            f"by margin {rcfg.margin}"
        )
    for domain in DOMAINS:
        if domain not in champ:
            continue
        if domain not in cand:
            reasons.append(f"{domain}: not evaluated, champion has {champ[domain]:.4f}")
            continue
        deltas[domain] = cand[domain] - champ[domain]
        if deltas[domain] < -rcfg.domain_tolerance:
            reasons.append(
                f"{domain} macro {cand[domain]:.4f} is worse than champion {champ[domain]:.4f} "
                f"by more than tolerance {rcfg.domain_tolerance}"
            )
    return Decision(not reasons, reasons, deltas)


def _chance_gate(candidate: dict[str, Any], rcfg: RegistryConfig) -> Decision:
    tasks, chance = candidate.get("tasks") or {}, candidate.get("chance") or {}
    if not tasks:
        raise ValueError("evaluation metrics lack per-task scores 'tasks'")
    missing = sorted(set(tasks) - set(chance))
    if missing:
        raise ValueError(f"evaluation metrics lack the chance baseline of tasks {missing}")
    deltas = {task: float(tasks[task]) - float(chance[task]) for task in tasks}
    bar = f"by more than {rcfg.chance_margin} + tolerance {rcfg.chance_tolerance}"
    if rcfg.chance_rule == "macro":
        cand_macro = macro_averages({t: float(v) for t, v in tasks.items()})["overall"]
        chance_macro = macro_averages({t: float(chance[t]) for t in tasks})["overall"]
        deltas["overall"] = cand_macro - chance_macro
        ok = above_chance(cand_macro, chance_macro, rcfg)
        reasons = [] if ok else [f"overall macro {cand_macro:.6f} does not beat the chance macro "
                                 f"{chance_macro:.6f} {bar}"]
        return Decision(ok, reasons, deltas)
    reasons = [
        f"{task}: {float(tasks[task]):.6f} does not beat chance {float(chance[task]):.6f} {bar}"
        for task in sorted(tasks) if not above_chance(float(tasks[task]), float(chance[task]), rcfg)
    ]
    return Decision(not reasons, reasons, deltas)
