"""MLflow Model Registry: register an evaluated model and promote it through a gate on its evaluation metrics.

Aliases: ``@champion`` (serving choice), ``@challenger`` (evaluated, did not pass), ``@previous`` (the champion
a newer model replaced). The gate (``eval.registry`` in params.yaml):

- no champion yet: the candidate becomes champion iff it beats the chance-level baselines by more than
  ``chance_margin``: every task its own (``chance_rule: every_task``) or the macro average of the baselines
  (``chance_rule: macro``);
- otherwise: overall macro average strictly above the champion's and by at least ``margin`` AND no domain macro
  below the champion's by more than ``domain_tolerance`` (a tie never replaces the champion). Pass -> new ``@champion``, the old one gets ``@previous``. Fail -> ``@challenger``
  and a ``promotion.reasons`` tag.

Idempotent: a version is keyed by the evaluation run it came from (tag ``eval_run_id``); promoting the same run
again returns the recorded decision and changes nothing. A crash between moving aliases and writing the decision
is repaired on the next call (a version already holding ``@champion`` is recorded as champion, never re-gated
against itself).

Concurrency: an alias names exactly one version, so "two champions" cannot exist in MLflow; the real hazard is a
lost update -- two candidates both read the same champion, both pass, and the second silently replaces the first
without being compared with it, leaving ``@previous`` wrong. The whole read-decide-write sequence therefore runs
under an exclusive ``fcntl.flock`` on a lock file: next to the database for a ``sqlite:///`` store, else in
``eval.registry.lock_dir`` (which must be on a filesystem shared by all promoters when they run on several hosts).
An optimistic check-and-retry on a registered-model tag was the alternative, but MLflow's API has no
compare-and-swap, so a read-then-write of a counter tag is itself racy; the lock is simpler and correct.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from flava.config import PipelineConfig
from flava.eval.config import RegistryConfig

DOMAINS = ("vision", "language", "multimodal")
EVAL_RUN_TAG = "eval_run_id"
DECISION_TAG = "promotion.decision"
REASONS_TAG = "promotion.reasons"
COMPARED_TAG = "promotion.compared_to"


# ----------------------------------------------------------------------------------------------- the gate (pure)
@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    deltas: dict[str, float] = field(default_factory=dict)


def _macro(metrics: dict[str, Any]) -> dict[str, float]:
    macro = metrics.get("macro")
    if not isinstance(macro, dict) or "overall" not in macro:
        raise ValueError("evaluation metrics lack 'macro.overall' (run `flava evaluate` first)")
    return {k: float(v) for k, v in macro.items() if isinstance(v, (int, float))}


def gate(candidate: dict[str, Any], champion: dict[str, Any] | None, rcfg: RegistryConfig) -> Decision:
    """Decide whether ``candidate`` (an evaluation metrics dict) replaces ``champion`` (or becomes the first)."""
    cand = _macro(candidate)
    if champion is None:
        tasks, chance = candidate.get("tasks") or {}, candidate.get("chance") or {}
        if not tasks:
            raise ValueError("evaluation metrics lack per-task scores 'tasks'")
        missing = sorted(set(tasks) - set(chance))
        if missing:
            raise ValueError(f"evaluation metrics lack the chance baseline of tasks {missing}")
        deltas = {task: float(tasks[task]) - float(chance[task]) for task in tasks}
        suffix = f" + {rcfg.chance_margin}" if rcfg.chance_margin else ""
        if rcfg.chance_rule == "macro":
            from flava.eval.aggregate import macro_averages

            cand_macro = macro_averages({t: float(v) for t, v in tasks.items()})["overall"]
            chance_macro = macro_averages({t: float(chance[t]) for t in tasks})["overall"]
            deltas["overall"] = cand_macro - chance_macro
            ok = cand_macro > chance_macro + rcfg.chance_margin
            reasons = [] if ok else [
                f"overall macro {cand_macro:.4f} does not beat the chance macro {chance_macro:.4f}{suffix}"]
            return Decision(ok, reasons, deltas)
        reasons = [
            f"{task}: {float(tasks[task]):.4f} does not beat chance {float(chance[task]):.4f}{suffix}"
            for task in sorted(tasks) if not float(tasks[task]) > float(chance[task]) + rcfg.chance_margin
        ]
        return Decision(not reasons, reasons, deltas)

    champ = _macro(champion)
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


# ----------------------------------------------------------------------------------------------------- the lock
def lock_path(tracking_uri: str, rcfg: RegistryConfig, root: str | Path = ".") -> Path:
    """Lock file next to a local sqlite store, else under ``rcfg.lock_dir`` (shared across promoters)."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative.db -> path "/relative.db"; sqlite:////abs/x.db -> "//abs/x.db"
        db = tracking_uri[len("sqlite:///"):]
        return Path(db).with_name(Path(db).name + ".promote.lock")
    directory = Path(rcfg.lock_dir)
    if not directory.is_absolute():
        directory = Path(root) / directory
    safe = "".join(c if c.isalnum() else "_" for c in tracking_uri)[:120]
    return directory / f"{safe}.promote.lock"


@contextlib.contextmanager
def exclusive_lock(path: Path, timeout_s: float, poll_s: float = 0.05) -> Iterator[None]:
    """Exclusive advisory lock; separate ``open()`` calls exclude each other across threads and processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"promotion lock {path} still held after {timeout_s}s") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------- registry operations
def _metric_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """Version tags carrying what a later gate needs: the macro averages, per-task scores and baselines."""
    tags = {f"macro.{k}": f"{v:.6f}" for k, v in _macro(metrics).items()}
    tags.update({f"task.{k}": f"{float(v):.6f}" for k, v in (metrics.get("tasks") or {}).items()})
    tags.update({f"chance.{k}": f"{float(v):.6f}" for k, v in (metrics.get("chance") or {}).items()})
    return tags


def metrics_from_tags(tags: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"macro": {}, "tasks": {}, "chance": {}}
    for key, value in tags.items():
        head, _, name = key.partition(".")
        section = {"macro": "macro", "task": "tasks", "chance": "chance"}.get(head)
        if section and name:
            out[section][name] = float(value)
    return out


def _champion(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="FLAVA models promoted by `flava promote`")
        except MlflowException:
            client.get_registered_model(name)  # created meanwhile by a promoter without the lock


def _version_for_run(client, name: str, eval_run_id: str):
    """The version registered from ``eval_run_id`` (the idempotency key), if any."""
    for value in (name, eval_run_id):
        if "'" in value:
            raise ValueError(f"registry names and run ids may not contain quotes: {value!r}")
    matches = client.search_model_versions(f"name='{name}' and tags.{EVAL_RUN_TAG} = '{eval_run_id}'")
    return min(matches, key=lambda v: int(v.version)) if matches else None


def _result(version, rcfg: RegistryConfig, *, changed: bool, champion_version: str | None) -> dict[str, Any]:
    tags = version.tags or {}
    return {
        "model_name": version.name,
        "version": int(version.version),
        "decision": tags.get(DECISION_TAG),
        "promoted": tags.get(DECISION_TAG) == rcfg.champion_alias,
        "reasons": json.loads(tags.get(REASONS_TAG, "[]")),
        "compared_to": tags.get(COMPARED_TAG) or None,
        "champion_version": int(champion_version) if champion_version else None,
        "changed": changed,
    }


def promote(
    client,
    *,
    metrics: dict[str, Any],
    eval_run_id: str,
    model_source: str,
    rcfg: RegistryConfig,
    lock_file: Path,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Register (once) the model evaluated in ``eval_run_id`` and gate it against ``@champion``.

    ``model_source`` is the artifact URI of the model directory; ``tags`` are lineage tags for the version.
    Returns a JSON-serialisable summary (also written to ``promotion.json`` by :func:`run_promote`).
    """
    name = rcfg.model_name
    _macro(metrics)  # fail early, before taking the lock, on metrics that cannot be gated
    with exclusive_lock(lock_file, rcfg.lock_timeout_s):
        _ensure_registered_model(client, name)
        version = _version_for_run(client, name, eval_run_id)
        if version is not None and (version.tags or {}).get(DECISION_TAG):
            champion = _champion(client, name, rcfg.champion_alias)
            return _result(version, rcfg, changed=False, champion_version=champion.version if champion else None)
        if version is None:
            version = client.create_model_version(name, model_source, run_id=eval_run_id, tags={
                EVAL_RUN_TAG: eval_run_id, **(tags or {}), **_metric_tags(metrics),
            })
        champion = _champion(client, name, rcfg.champion_alias)
        if champion is not None and str(champion.version) == str(version.version):
            decision = Decision(True, [])  # repaired after a crash: it already won its gate
            compared = (version.tags or {}).get(COMPARED_TAG, "")
        else:
            champion_metrics = metrics_from_tags(champion.tags or {}) if champion is not None else None
            decision = gate(metrics, champion_metrics, rcfg)
            compared = str(champion.version) if champion is not None else ""
        for key, delta in decision.deltas.items():
            client.set_model_version_tag(name, version.version, f"promotion.delta.{key}", f"{delta:.6f}")
        client.set_model_version_tag(name, version.version, COMPARED_TAG, str(compared))
        if decision.promote:
            if champion is not None and str(champion.version) != str(version.version):
                # Order matters: @previous first, then move @champion in one call, so that at every instant
                # exactly one version is champion.
                client.set_registered_model_alias(name, rcfg.previous_alias, champion.version)
            client.set_registered_model_alias(name, rcfg.champion_alias, version.version)
            challenger = _champion(client, name, rcfg.challenger_alias)
            if challenger is not None and str(challenger.version) == str(version.version):
                client.delete_registered_model_alias(name, rcfg.challenger_alias)
            label = rcfg.champion_alias
        else:
            client.set_registered_model_alias(name, rcfg.challenger_alias, version.version)
            label = rcfg.challenger_alias
        client.set_model_version_tag(name, version.version, REASONS_TAG, json.dumps(decision.reasons))
        client.set_model_version_tag(name, version.version, DECISION_TAG, label)  # written last: "done"
        version = client.get_model_version(name, version.version)
        champion = _champion(client, name, rcfg.champion_alias)
        return _result(version, rcfg, changed=True, champion_version=champion.version if champion else None)


# ------------------------------------------------------------------------------------------------ the stage
def run_promote(cfg: PipelineConfig, root: str | Path = ".") -> dict[str, Any]:
    """``flava promote``: register the evaluated model and gate it; writes ``paths.reports/promotion.json``."""
    import mlflow
    from mlflow import MlflowClient

    from flava.distributed import ProcessInfo
    from flava.tracking.runs import stage_tags, tracking_uri

    root = Path(root)
    reports = root / cfg.paths.reports
    metrics_file = reports / "eval" / "metrics.json"
    run_file = reports / "eval" / "run.json"
    for path in (metrics_file, run_file):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `flava evaluate` first")
    metrics = json.loads(metrics_file.read_text())
    run_info = json.loads(run_file.read_text())
    eval_run_id = run_info.get("run_id")
    if not eval_run_id:
        raise ValueError(f"{run_file} has no MLflow 'run_id' of the evaluation")
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    eval_run = client.get_run(eval_run_id)
    source = run_info.get("model_uri")
    if not source:
        raise ValueError(f"{run_file}: the evaluation logged no model (eval.log_model is false), "
                         "so there is nothing to register")
    tags = stage_tags(cfg, "promote", ProcessInfo(), root)
    for key in ("flava.stage", "world_size"):
        tags.pop(key, None)
    tags["eval_params_hash"] = eval_run.data.tags.get("params_hash", "")
    parents = [p for p in (eval_run.data.tags.get("mlflow.parentRunId"), tags.pop("parent_run_id", None)) if p]
    tags["parent_run_ids"] = ",".join(dict.fromkeys(parents))
    tags["model_dir"] = str(run_info.get("model_dir", ""))
    result = promote(
        client, metrics=metrics, eval_run_id=eval_run_id, model_source=source, rcfg=cfg.eval.registry,
        lock_file=lock_path(uri, cfg.eval.registry, root), tags=tags,
    )
    result["eval_run_id"] = eval_run_id
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "promotion.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result

