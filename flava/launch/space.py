"""The sweep's search space: which Optuna params a trial draws and the config values they stand for.

A ``float``/``int``/``categorical`` param is its config value; a conditional one (``when``) only where its
condition holds. A ``simplex`` (the corpus ratios) is drawn as one uniform
``u`` per part and applied as the normalised exponentials ``-log(1-u)``: a uniform point on the simplex
(Dirichlet(1)). A ``fraction_of`` param is applied as that share of another key's value, rounded (a warm-up found
on short trials keeps its share of the steps when applied to the full stage).
"""
from __future__ import annotations

import json
import math
from typing import Any

from flava.config import apply_overrides
from flava.launch.config import SearchParam

_EPS = 1e-12  # keeps the simplex's exponential draws finite


def _lookup(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def check_space(cfg, space: list[SearchParam]) -> None:
    """Every searched key (and ``fraction_of`` key) must name an existing params value."""
    tree = cfg.model_dump(mode="json")
    missing = []
    for p in space:
        for key in filter(None, (p.key, p.fraction_of)):
            try:
                _lookup(tree, key)
            except KeyError:
                missing.append(key)
    if missing:
        raise ValueError(f"launch.sweep.space keys {missing} are not params keys of this config")
    earlier: dict[str, SearchParam] = {}
    for p in space:
        for key, value in p.when.items():
            cond = earlier.get(key)
            if cond is None or cond.kind not in ("categorical", "int"):
                raise ValueError(f"launch.sweep.space[{p.key}].when names {key}: it must be a categorical or int "
                                 f"param earlier in the space")
            if cond.kind == "categorical" and value not in cond.choices:
                raise ValueError(f"launch.sweep.space[{p.key}].when: {value!r} is not among {key}'s choices "
                                 f"{cond.choices}")
        earlier[p.key] = p


def _active(p: SearchParam, params: dict[str, Any]) -> bool:
    """A conditional param's condition holds for the params drawn so far (always for an unconditional one)."""
    return all(key in params and params[key] == value for key, value in p.when.items())


def suggest(trial, space: list[SearchParam]) -> dict[str, float | int]:
    """Draw the trial's Optuna params (what the sampler models); ``applied`` turns them into config values."""
    for p in space:
        if not _active(p, trial.params):
            continue
        if p.kind == "simplex":
            for part in p.parts:
                trial.suggest_float(f"{p.key}.{part}:u", 0.0, 1.0)
        elif p.kind == "categorical":
            trial.suggest_categorical(p.key, p.choices)
        elif p.kind == "int":
            trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
        else:
            trial.suggest_float(p.key, p.low, p.high, log=p.log)
    return dict(trial.params)


def applied(tree: dict[str, Any], space: list[SearchParam], params: dict[str, Any]) -> dict[str, Any]:
    """The config values of a trial's params, for the config ``tree`` they are applied to: simplex draws become
    shares summing to 1 (``-log(1-u)`` is an exponential draw; normalised, Dirichlet(1)), fractions become
    counts of their ``fraction_of`` key."""
    values: dict[str, Any] = {}
    for p in space:
        if not _active(p, params):
            continue  # a conditional param this trial did not draw: the config keeps its value
        if p.kind == "simplex":
            draws = {part: -math.log(max(1.0 - params[f"{p.key}.{part}:u"], _EPS)) for part in p.parts}
            total = sum(draws.values()) or 1.0
            values.update({f"{p.key}.{part}": draw / total for part, draw in draws.items()})
        elif p.fraction_of:
            values[p.key] = int(round(params[p.key] * float(_lookup(tree, p.fraction_of))))
        else:
            values[p.key] = params[p.key]
    return values


def as_overrides(values: dict[str, Any]) -> list[str]:
    """``{"a.b": 1}`` -> ``["a.b=1"]`` (what `--set` and `load_config(..., overrides)` take)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def apply_best(cfg, result: dict[str, Any]):
    """``cfg`` with a sweep's best params applied (what the joint stage trains with after a sweep)."""
    return type(cfg).model_validate(apply_overrides(cfg.model_dump(mode="json"), result["best_overrides"]))
