"""MLflow Model Registry: register an evaluated model and promote it through a gate on its evaluation metrics.

Aliases: ``@champion`` (serving choice), ``@challenger`` (evaluated, did not pass), ``@previous`` (the champion
a newer model replaced). The gate (``eval.registry`` in params.yaml):

- no champion yet: the candidate becomes champion iff it is strictly above the chance-level baselines:
  ``score > chance + chance_margin + chance_tolerance`` on every task (``chance_rule: every_task``) or for the
  macro averages of tasks and baselines (``chance_rule: macro``). ``chance_tolerance`` (default 1e-6) absorbs
  the float32 rounding of scores in [0, 1]: a retrieval recall of 0.026666667 against a chance of 1/37.5 is at
  chance, not above it;
- otherwise: overall macro average strictly above the champion's and by at least ``margin`` AND no domain macro
  below the champion's by more than ``domain_tolerance`` (a tie never replaces the champion). Pass -> new
  ``@champion``, the old one gets ``@previous``. Fail -> ``@challenger``.

A version carries a few tags (``promotion.decision``, ``overall_macro``, ``weights_sha256``, ``eval_run_id``,
``promotion.compared_to``, ``promotion.reason`` after a manual action); the details (per-task scores, chance,
deltas, reasons, lineage) are its description (short markdown) and a JSON artifact of its evaluation run
(``registry/<name>-v<N>.json``). The metrics the gate re-reads are the artifact ``registry/metrics.json`` of that
run; versions registered before that carried them as ``macro.*``/``task.*``/``chance.*`` tags, still read.

Idempotent: a version is keyed by the evaluation run it came from (tag ``eval_run_id``) and by the sha256 of its
weights file (``weights_sha256``): promoting the same run, or another run of the same weights, returns the recorded
decision of the existing version and registers nothing. A crash between moving aliases and writing the decision
is repaired on the next call (a version already holding ``@champion`` is recorded as champion, never re-gated
against itself).

By hand (``flava registry promote VERSION`` / ``rollback`` / ``status``): the same gate (``--force`` bypasses it
and records that it did), the same lock, and the reason recorded on the version as a tag and in its description.

Concurrency: an alias names exactly one version, so "two champions" cannot exist in MLflow; the real hazard is a
lost update -- two candidates both read the same champion, both pass, and the second silently replaces the first
without being compared with it, leaving ``@previous`` wrong. The whole read-decide-write sequence therefore runs
under an exclusive lock held where the registry is (:func:`promotion_lock`): a PostgreSQL advisory lock in the
database named by ``eval.registry.lock_uri`` (team mode), or in the tracking store's own database when that is
PostgreSQL; an ``fcntl.flock`` on a file beside the database only for the embedded sqlite store. A lock file in a
checkout would not exclude a promoter on another machine, or one that spells the server's address differently.
An optimistic check-and-retry on a registered-model tag was the alternative, but MLflow's API has no
compare-and-swap, so a read-then-write of a counter tag is itself racy; the lock is simpler and correct.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import mlflow
import sqlalchemy
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from flava.config import PipelineConfig
from flava.dburl import check_database_url
from flava.distributed import ProcessInfo
from flava.eval.config import RegistryConfig
from flava.eval.gate import Decision, gate, macros
from flava.model.io import WEIGHTS
from flava.tracking.runs import DVC_EXP_ENV, stage_run, stage_tags, tracking_uri

EVAL_RUN_TAG = "eval_run_id"
WEIGHTS_TAG = "weights_sha256"
OVERALL_TAG = "overall_macro"
DECISION_TAG = "promotion.decision"
COMPARED_TAG = "promotion.compared_to"
REASON_TAG = "promotion.reason"  # why a person promoted or rolled back this version
ACTION_TAG = "promotion.action"  # what a person did last: promote, promote --force, rollback, rolled back
LEGACY_REASONS_TAG = "promotion.reasons"  # versions registered before the details moved to the description
METRICS_ARTIFACT = "registry/metrics.json"  # in the version's evaluation run: what the gate re-reads
SKIPPED = "skipped"
ROLLED_BACK = "rolled_back"


# ----------------------------------------------------------------------------------------------------- the lock
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


@dataclass(frozen=True)
class FileLock:
    """The embedded default's lock: a file next to the sqlite database, which only this machine writes."""

    path: Path

    def hold(self, timeout_s: float) -> contextlib.AbstractContextManager[None]:
        return exclusive_lock(self.path, timeout_s)


@dataclass(frozen=True)
class AdvisoryLock:
    """A PostgreSQL session-level advisory lock named after the registered model, in the team's database: every
    promoter that reaches that database excludes every other, whatever its checkout or its spelling of the
    tracking server's address. A promoter that dies loses its connection, and with it the lock."""

    url: str  # SQLAlchemy URL of the database (postgresql:// or postgresql+psycopg://)
    name: str  # what is locked, e.g. "flava.promote:flava"

    @property
    def key(self) -> int:
        """The lock's bigint key: the first 8 bytes of sha256(name), signed."""
        return int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:8], "big", signed=True)

    @contextlib.contextmanager
    def hold(self, timeout_s: float, poll_s: float = 0.1) -> Iterator[None]:
        engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                deadline = time.monotonic() + timeout_s
                try_lock = sqlalchemy.text("SELECT pg_try_advisory_lock(:key)")
                while not conn.execute(try_lock, {"key": self.key}).scalar():
                    if time.monotonic() > deadline:
                        where = sqlalchemy.engine.make_url(self.url).render_as_string(hide_password=True)
                        raise TimeoutError(f"promotion lock {self.name!r} (PostgreSQL advisory lock {self.key} in "
                                           f"{where}) still held after {timeout_s}s")
                    time.sleep(poll_s)
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        finally:
            engine.dispose()


PromotionLock = FileLock | AdvisoryLock


def promotion_lock(tracking_uri: str, rcfg: RegistryConfig) -> PromotionLock:
    """Where promotions of ``rcfg.model_name`` are serialised: ``eval.registry.lock_uri`` when set (team mode:
    a PostgreSQL database every promoter reaches); else the tracking store itself when it is a PostgreSQL
    database; else, for the embedded sqlite store, a file next to the database. A tracking server (http) hides
    its database, so promoting through one needs ``lock_uri``: a lock file in one checkout would not exclude a
    promoter on another machine, or one that spells the server's address differently."""
    name = f"flava.promote:{rcfg.model_name}"
    if rcfg.lock_uri:
        return AdvisoryLock(str(check_database_url(rcfg.lock_uri, "eval.registry.lock_uri")
                                .render_as_string(hide_password=False)), name)
    scheme = urlparse(tracking_uri).scheme
    if scheme == "sqlite":
        # sqlite:///relative.db -> "relative.db"; sqlite:////abs/x.db -> "/abs/x.db"
        db = tracking_uri[len("sqlite:///"):]
        return FileLock(Path(db).with_name(Path(db).name + ".promote.lock"))
    if scheme.startswith("postgresql"):
        return AdvisoryLock(tracking_uri, name)
    raise ValueError(
        f"promotion through the tracking store {tracking_uri} needs eval.registry.lock_uri: the PostgreSQL database "
        "where promoters serialise (e.g. the tracking server's own, postgresql+psycopg://user@host:5432/mlflow). "
        "Only the embedded sqlite store is locked with a file")


# ------------------------------------------------------------------------------------------ what a version holds
def metrics_from_tags(tags: dict[str, str]) -> dict[str, Any]:
    """Metrics of a version registered by the earlier code, which kept them as ``macro.*``/``task.*``/``chance.*``."""
    out: dict[str, Any] = {"macro": {}, "tasks": {}, "chance": {}}
    for key, value in tags.items():
        head, _, name = key.partition(".")
        section = {"macro": "macro", "task": "tasks", "chance": "chance"}.get(head)
        if section and name:
            out[section][name] = float(value)
    return out


def _load_artifact(client, run_id: str, path: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(local).read_text())


def version_metrics(client, version) -> dict[str, Any]:
    """The evaluation metrics a version was registered with (what the gate compares a candidate against)."""
    tags = version.tags or {}
    run_id = tags.get(EVAL_RUN_TAG) or version.run_id
    metrics = _load_artifact(client, run_id, METRICS_ARTIFACT) if run_id else None
    if metrics is None and "macro.overall" in tags:
        metrics = metrics_from_tags(tags)
    if metrics is None:
        raise ValueError(f"registry version {version.name} v{version.version} has no metrics: neither "
                         f"{METRICS_ARTIFACT} in run {run_id} nor macro.* tags")
    return metrics


def version_details(client, version) -> dict[str, Any]:
    """The JSON record of a version's automatic decision (reasons, deltas, ...); {} when there is none."""
    tags = version.tags or {}
    run_id = tags.get(EVAL_RUN_TAG) or version.run_id
    details = _load_artifact(client, run_id, _details_artifact(version.name, version.version)) if run_id else None
    if details is None and LEGACY_REASONS_TAG in tags:
        details = {"reasons": json.loads(tags[LEGACY_REASONS_TAG])}
    return details or {}


def _details_artifact(name: str, version: int | str) -> str:
    return f"registry/{name}-v{version}.json"


def _description(details: dict[str, Any]) -> str:
    """A version's description: the decision, what it was compared with, per-task scores and the reasons."""
    metrics = details["metrics"]
    macro = macros(metrics)
    head = f"**{details['decision']}**: overall macro {macro['overall']:.4f}"
    if details.get("compared_to"):
        delta = details["deltas"].get("overall")  # none when a crashed promotion is repaired
        head += (f", {delta:+.4f}" if delta is not None else "") + f" vs champion v{details['compared_to']}"
    lines = [head, ""]
    chance = metrics.get("chance") or {}
    if metrics.get("tasks"):
        lines += ["| task | score | chance |", "|---|---:|---:|"]
        lines += [f"| {t} | {float(s):.4f} | {float(chance[t]):.4f} |" if t in chance else f"| {t} | {float(s):.4f} | |"
                  for t, s in sorted(metrics["tasks"].items())]
        lines.append("")
    if details["reasons"]:
        lines += ["Reasons:", ""] + [f"- {r}" for r in details["reasons"]] + [""]
    lineage = details.get("lineage") or {}
    lines.append(f"Weights sha256 `{details.get('weights_sha256') or 'unknown'}`; evaluation run "
                 f"`{details['eval_run_id']}`; git `{lineage.get('git_commit', 'unknown')}`; params "
                 f"`{lineage.get('params_hash', 'unknown')}`.")
    return "\n".join(lines)


def _note(version, line: str) -> str:
    """The version's description with one more line of its history (a manual action)."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return ((version.description or "").rstrip() + f"\n\n{stamp}: {line}").lstrip()


# ------------------------------------------------------------------------------------------- registry operations
def _alias_version(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _ensure_registered_model(client, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="FLAVA models promoted by `flava promote`")
        except MlflowException:
            client.get_registered_model(name)  # created meanwhile by a promoter without the lock


def _quoted(value: str) -> str:
    if "'" in value:
        raise ValueError(f"registry names, run ids and digests may not contain quotes: {value!r}")
    return value


def _version_tagged(client, name: str, tag: str, value: str):
    """The oldest version of ``name`` whose tag ``tag`` is ``value``, if any."""
    matches = client.search_model_versions(f"name='{_quoted(name)}' and tags.{tag} = '{_quoted(value)}'")
    return min(matches, key=lambda v: int(v.version)) if matches else None


def _result(version, rcfg: RegistryConfig, *, changed: bool, champion, reasons: list[str]) -> dict[str, Any]:
    tags = version.tags or {}
    return {
        "model_name": version.name,
        "version": int(version.version),
        "decision": tags.get(DECISION_TAG),
        "promoted": tags.get(DECISION_TAG) == rcfg.champion_alias,
        "reasons": reasons,
        "compared_to": tags.get(COMPARED_TAG) or None,
        "champion_version": int(champion.version) if champion is not None else None,
        "weights_sha256": tags.get(WEIGHTS_TAG),
        "changed": changed,
    }


def _recorded(client, version, rcfg: RegistryConfig) -> dict[str, Any]:
    champion = _alias_version(client, version.name, rcfg.champion_alias)
    reasons = version_details(client, version).get("reasons", [])
    return _result(version, rcfg, changed=False, champion=champion, reasons=reasons)


def promote(
    client,
    *,
    metrics: dict[str, Any],
    eval_run_id: str,
    model_source: str,
    rcfg: RegistryConfig,
    lock: PromotionLock,
    tags: dict[str, str] | None = None,
    weights_sha256: str | None = None,
    version_tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Register (once) the model evaluated in ``eval_run_id`` and gate it against ``@champion``.

    ``model_source`` is the artifact URI of the model; ``tags`` are lineage facts, kept in the version's
    description and JSON record (not as tags); ``weights_sha256`` identifies the weights: a version of the same
    weights is reused with its recorded decision; ``version_tags`` are set on a newly created version besides the
    registry's own (e.g. where a pretrained baseline came from). Returns a JSON-serialisable summary
    (``promotion.json``).
    """
    name = rcfg.model_name
    macros(metrics)  # fail early, before taking the lock, on metrics that cannot be gated
    with lock.hold(rcfg.lock_timeout_s):
        _ensure_registered_model(client, name)
        version = _version_tagged(client, name, EVAL_RUN_TAG, eval_run_id)
        if version is None and weights_sha256:
            version = _version_tagged(client, name, WEIGHTS_TAG, weights_sha256)
        if version is not None and (version.tags or {}).get(DECISION_TAG):
            return _recorded(client, version, rcfg)
        if version is None:
            client.log_dict(eval_run_id, metrics, METRICS_ARTIFACT)  # before the version exists: never without it
            # A tracking server (REST store) refuses a `models:/m-...` source without the logged model's id.
            model_id = model_source.removeprefix("models:/") if model_source.startswith("models:/m-") else None
            version = client.create_model_version(name, model_source, run_id=eval_run_id, model_id=model_id, tags={
                **(version_tags or {}), EVAL_RUN_TAG: eval_run_id, WEIGHTS_TAG: weights_sha256 or "unknown",
                OVERALL_TAG: f"{macros(metrics)['overall']:.4f}",
            })
        else:
            metrics = version_metrics(client, version)  # a crashed earlier call: gate what was registered
        return _decide(client, version, metrics, rcfg, tags or {})


def _decide(client, version, metrics: dict[str, Any], rcfg: RegistryConfig, lineage: dict[str, str]):
    name = version.name
    champion = _alias_version(client, name, rcfg.champion_alias)
    if champion is not None and str(champion.version) == str(version.version):
        decision = Decision(True, [])  # repaired after a crash: it already won its gate
        compared = (version.tags or {}).get(COMPARED_TAG, "")
    else:
        decision = gate(metrics, version_metrics(client, champion) if champion is not None else None, rcfg)
        compared = str(champion.version) if champion is not None else ""
    client.set_model_version_tag(name, version.version, COMPARED_TAG, compared)
    if decision.promote:
        if champion is not None and str(champion.version) != str(version.version):
            # Order matters: @previous first, then move @champion in one call, so that at every instant
            # exactly one version is champion.
            client.set_registered_model_alias(name, rcfg.previous_alias, champion.version)
        client.set_registered_model_alias(name, rcfg.champion_alias, version.version)
        challenger = _alias_version(client, name, rcfg.challenger_alias)
        if challenger is not None and str(challenger.version) == str(version.version):
            client.delete_registered_model_alias(name, rcfg.challenger_alias)
        label = rcfg.champion_alias
    else:
        client.set_registered_model_alias(name, rcfg.challenger_alias, version.version)
        label = rcfg.challenger_alias
    tags = version.tags or {}
    details = {
        "model_name": name, "version": int(version.version), "decision": label, "reasons": decision.reasons,
        "deltas": decision.deltas, "compared_to": compared or None, "metrics": metrics,
        "weights_sha256": tags.get(WEIGHTS_TAG), "eval_run_id": tags.get(EVAL_RUN_TAG), "lineage": lineage,
        "gate": rcfg.model_dump(mode="json"),
    }
    client.log_dict(tags.get(EVAL_RUN_TAG) or version.run_id, details, _details_artifact(name, version.version))
    client.update_model_version(name, version.version, description=_description(details))
    client.set_model_version_tag(name, version.version, DECISION_TAG, label)  # written last: "done"
    version = client.get_model_version(name, version.version)
    champion = _alias_version(client, name, rcfg.champion_alias)
    return _result(version, rcfg, changed=True, champion=champion, reasons=decision.reasons)


# ------------------------------------------------------------------------------------------------ by hand
def _need_reason(reason: str) -> str:
    if not reason or not reason.strip():
        raise ValueError("a reason is required (--reason TEXT): it is recorded on the version")
    return reason.strip()


def _get_version(client, name: str, version: int | str):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name='{_quoted(name)}'"))
        raise ValueError(f"registered model {name!r} has no version {version}; versions: {known}") from None


def promote_version(client, version: int | str, *, reason: str, rcfg: RegistryConfig, lock: PromotionLock,
                    force: bool = False) -> dict[str, Any]:
    """Make ``version`` the champion by hand: gated against the current champion unless ``force`` (which records
    that the gate was bypassed and why). The old champion gets ``@previous``."""
    reason, name = _need_reason(reason), rcfg.model_name
    with lock.hold(rcfg.lock_timeout_s):
        target = _get_version(client, name, version)
        champion = _alias_version(client, name, rcfg.champion_alias)
        if champion is not None and str(champion.version) == str(target.version):
            raise ValueError(f"{name} v{target.version} is already @{rcfg.champion_alias}")
        decision = gate(version_metrics(client, target),
                        version_metrics(client, champion) if champion is not None else None, rcfg)
        if not decision.promote and not force:
            raise ValueError(f"{name} v{target.version} does not pass the gate: {'; '.join(decision.reasons)} "
                             "(--force bypasses the gate and records that it did)")
        if champion is not None:
            client.set_registered_model_alias(name, rcfg.previous_alias, champion.version)
        client.set_registered_model_alias(name, rcfg.champion_alias, target.version)
        challenger = _alias_version(client, name, rcfg.challenger_alias)
        if challenger is not None and str(challenger.version) == str(target.version):
            client.delete_registered_model_alias(name, rcfg.challenger_alias)
        action = "promote --force" if force else "promote"
        gate_text = ("gate passed" if decision.promote
                     else f"gate BYPASSED with --force: {'; '.join(decision.reasons)}")
        over = f" over v{champion.version}" if champion is not None else ""
        client.update_model_version(name, target.version, description=_note(
            target, f"promoted to @{rcfg.champion_alias} by hand{over} ({gate_text}). Reason: {reason}"))
        for key, value in ((COMPARED_TAG, str(champion.version) if champion is not None else ""),
                           (REASON_TAG, reason), (ACTION_TAG, action), (DECISION_TAG, rcfg.champion_alias)):
            client.set_model_version_tag(name, target.version, key, value)
        target = client.get_model_version(name, target.version)
        result = _result(target, rcfg, changed=True, champion=target, reasons=decision.reasons)
        return {**result, "action": action, "reason": reason, "gate_passed": decision.promote}


def rollback(client, *, reason: str, rcfg: RegistryConfig, lock: PromotionLock) -> dict[str, Any]:
    """Give ``@champion`` back to ``@previous``. Not gated: ``@previous`` passed the gate when it became champion.

    The demoted version is marked ``rolled_back`` (a later ``flava promote`` of its weights returns that, and
    does not promote it again); ``@previous`` moves to the champion the restored version had replaced, if any."""
    reason, name = _need_reason(reason), rcfg.model_name
    with lock.hold(rcfg.lock_timeout_s):
        champion = _alias_version(client, name, rcfg.champion_alias)
        previous = _alias_version(client, name, rcfg.previous_alias)
        if champion is None or previous is None:
            raise ValueError(f"nothing to roll back to: {name} has no @{rcfg.champion_alias} and "
                             f"@{rcfg.previous_alias} (aliases: {_aliases(client, name)})")
        before = (previous.tags or {}).get(COMPARED_TAG)
        older = None
        if before and before not in (str(previous.version), str(champion.version)):
            with contextlib.suppress(MlflowException):  # a deleted version: no @previous then
                older = client.get_model_version(name, before)
        client.set_registered_model_alias(name, rcfg.champion_alias, previous.version)
        if older is not None:
            client.set_registered_model_alias(name, rcfg.previous_alias, older.version)
        else:
            client.delete_registered_model_alias(name, rcfg.previous_alias)
        for version, line, decision in (
            (champion, f"rolled back: @{rcfg.champion_alias} returned to v{previous.version}", ROLLED_BACK),
            (previous, f"restored as @{rcfg.champion_alias} by rollback from v{champion.version}",
             rcfg.champion_alias),
        ):
            client.update_model_version(name, version.version, description=_note(version, f"{line}. Reason: {reason}"))
            for key, value in ((REASON_TAG, reason), (ACTION_TAG, "rollback" if decision != ROLLED_BACK else
                                                      "rolled back"), (DECISION_TAG, decision)):
                client.set_model_version_tag(name, version.version, key, value)
        return {"model_name": name, "action": "rollback", "reason": reason, "champion_version": int(previous.version),
                "rolled_back_version": int(champion.version),
                "previous_version": int(older.version) if older is not None else None, "changed": True}


def _aliases(client, name: str) -> dict[str, int]:
    model = client.get_registered_model(name)
    return {alias: int(version) for alias, version in sorted(model.aliases.items())}


def status(client, rcfg: RegistryConfig) -> dict[str, Any]:
    """Aliases and every version with its decision, overall macro, what it was compared with, the reasons of its
    gate and the reason of the last manual action."""
    name = rcfg.model_name
    try:
        aliases = _aliases(client, name)
    except MlflowException:
        raise ValueError(f"no registered model {name!r} in this tracking store: run `flava promote` first") from None
    by_version: dict[int, list[str]] = {}
    for alias, number in aliases.items():
        by_version.setdefault(number, []).append(alias)
    versions = []
    for v in sorted(client.search_model_versions(f"name='{_quoted(name)}'"), key=lambda v: int(v.version)):
        tags = v.tags or {}
        versions.append({
            "version": int(v.version), "aliases": by_version.get(int(v.version), []),
            "decision": tags.get(DECISION_TAG), "overall_macro": tags.get(OVERALL_TAG) or tags.get("macro.overall"),
            "compared_to": tags.get(COMPARED_TAG) or None, "reason": tags.get(REASON_TAG),
            "action": tags.get(ACTION_TAG), "weights_sha256": tags.get(WEIGHTS_TAG),
            "eval_run_id": tags.get(EVAL_RUN_TAG) or v.run_id,
            "gate_reasons": version_details(client, v).get("reasons", []),
        })
    return {"model_name": name, "aliases": aliases, "versions": versions}


# ------------------------------------------------------------------------------------------------ the stages
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``path`` whole or not at all (a temporary file in the same directory, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _eval_run(client, run_id: str, uri: str, run_file: Path):
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        raise ValueError(
            f"the evaluation run {run_id} named in {run_file} was not found in the tracking store {uri}. The "
            "reports came from another machine or clone (e.g. `dvc pull`), whose MLflow store this one does not have. "
            "Point MLFLOW_TRACKING_URI at the store that holds the run (the team's tracking server), or evaluate "
            "here: `dvc repro -f evaluate` (then `dvc repro promote`)."
        ) from None


def run_promote(cfg: PipelineConfig, root: str | Path = ".") -> dict[str, Any]:
    """``flava promote``: register the evaluated model and gate it; writes ``paths.reports/promotion.json``.

    Under ``dvc exp run`` (``$DVC_EXP_NAME``) the shared registry is left alone unless
    ``eval.registry.register_experiments`` is true: the decision is ``skipped``, with the reason."""
    root = Path(root)
    reports = root / cfg.paths.reports
    run_file = reports / "eval" / "run.json"
    metrics, run_info = _read_evaluation(reports / "eval" / "metrics.json", run_file)
    eval_run_id = run_info["run_id"]
    rcfg = cfg.eval.registry
    experiment = os.environ.get(DVC_EXP_ENV)
    if experiment and not rcfg.register_experiments:
        return _skip_experiment(cfg, root, experiment, eval_run_id)
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)  # model sources such as models:/m-... resolve through the fluent store
    client = MlflowClient(uri)
    eval_run = _eval_run(client, eval_run_id, uri, run_file)
    model_dir = Path(run_info.get("model_dir") or Path(cfg.paths.models) / "joint" / "best")
    weights = (model_dir if model_dir.is_absolute() else root / model_dir) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"weights {weights} of the evaluated model not found (model_dir in {run_file}): "
                                "`dvc pull` or `dvc repro joint`")
    lineage = _promotion_lineage(cfg, root, eval_run, model_dir)
    with stage_run(cfg, "promote", root) as run:
        result = promote(
            client, metrics=metrics, eval_run_id=eval_run_id, model_source=run_info["model_uri"], rcfg=rcfg,
            lock=promotion_lock(uri, rcfg), tags=lineage, weights_sha256=sha256_file(weights),
        )
        result["eval_run_id"] = eval_run_id
        run.set_tags({DECISION_TAG: result["decision"], "registry.version": result["version"],
                      "registry.model_name": result["model_name"]})
        run.log_metrics({"promoted": int(result["promoted"]), "version": result["version"],
                         "changed": int(result["changed"])})
        write_json_atomic(reports / "promotion.json", result)
        run.log_artifact(reports / "promotion.json")
    return result


def _read_evaluation(metrics_file: Path, run_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``flava evaluate``'s metrics and run record, checked to name an MLflow run that logged a model."""
    for path in (metrics_file, run_file):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `flava evaluate` first")
    metrics = json.loads(metrics_file.read_text())
    run_info = json.loads(run_file.read_text())
    if not run_info.get("run_id"):
        raise ValueError(f"{run_file} has no MLflow 'run_id' of the evaluation")
    if not run_info.get("model_uri"):
        raise ValueError(f"{run_file}: the evaluation logged no model (eval.log_model is false), "
                         "so there is nothing to register")
    return metrics, run_info


def _skip_experiment(cfg: PipelineConfig, root: Path, experiment: str, eval_run_id: str) -> dict[str, Any]:
    """The ``skipped`` decision of a DVC experiment, recorded in ``promotion.json`` and a promote run."""
    rcfg = cfg.eval.registry
    result = {
        "model_name": rcfg.model_name, "version": None, "decision": SKIPPED, "promoted": False, "changed": False,
        "reasons": [f"DVC experiment {experiment!r}: the shared registry is left alone "
                    "(set eval.registry.register_experiments=true to register experiments)"],
        "eval_run_id": eval_run_id,
    }
    reports = root / cfg.paths.reports
    with stage_run(cfg, "promote", root) as run:
        run.set_tags({DECISION_TAG: SKIPPED, "dvc_experiment": experiment})
        write_json_atomic(reports / "promotion.json", result)
        run.log_artifact(reports / "promotion.json")
    return result


def _promotion_lineage(cfg: PipelineConfig, root: Path, eval_run, model_dir: Path) -> dict[str, str]:
    """Lineage facts kept with the version: this run's tags, the evaluation's params hash and parent runs."""
    lineage = stage_tags(cfg, "promote", ProcessInfo(), root)
    for key in ("flava.stage", "world_size"):
        lineage.pop(key, None)
    lineage["eval_params_hash"] = eval_run.data.tags.get("params_hash", "")
    parents = [p for p in (eval_run.data.tags.get("mlflow.parentRunId"), lineage.pop("parent_run_id", None)) if p]
    lineage["parent_run_ids"] = ",".join(dict.fromkeys(parents))
    lineage["model_dir"] = str(model_dir)
    return lineage


def _client_and_lock(cfg: PipelineConfig) -> tuple[MlflowClient, PromotionLock]:
    uri = tracking_uri(cfg)
    return MlflowClient(uri), promotion_lock(uri, cfg.eval.registry)


def run_registry_promote(cfg: PipelineConfig, version: int, reason: str, force: bool = False) -> dict[str, Any]:
    """``flava registry promote VERSION --reason TEXT [--force]``."""
    client, lock = _client_and_lock(cfg)
    return promote_version(client, version, reason=reason, rcfg=cfg.eval.registry, lock=lock, force=force)


def run_registry_rollback(cfg: PipelineConfig, reason: str) -> dict[str, Any]:
    """``flava registry rollback --reason TEXT``."""
    client, lock = _client_and_lock(cfg)
    return rollback(client, reason=reason, rcfg=cfg.eval.registry, lock=lock)


def run_registry_status(cfg: PipelineConfig) -> dict[str, Any]:
    """``flava registry status``."""
    return status(MlflowClient(tracking_uri(cfg)), cfg.eval.registry)
