"""The promotion gate as a pure function, and where the promotion lock is."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from flava.eval.config import RegistryConfig
from flava.eval.gate import gate
from flava.tracking.registry import AdvisoryLock, FileLock, exclusive_lock, metrics_from_tags, promotion_lock


def _metrics(overall, vision=None, language=None, multimodal=None, tasks=None, chance=None):
    macro = {"overall": overall}
    for name, value in (("vision", vision), ("language", language), ("multimodal", multimodal)):
        if value is not None:
            macro[name] = value
    return {"macro": macro, "tasks": tasks or {}, "chance": chance or {}}


RCFG = RegistryConfig(margin=0.01, domain_tolerance=0.02)


def test_first_model_needs_to_beat_chance_on_every_task():
    good = _metrics(0.6, tasks={"zeroshot": 0.5, "vqa": 0.4}, chance={"zeroshot": 0.1, "vqa": 0.25})
    assert gate(good, None, RCFG).promote
    bad = _metrics(0.6, tasks={"zeroshot": 0.5, "vqa": 0.25}, chance={"zeroshot": 0.1, "vqa": 0.25})
    decision = gate(bad, None, RCFG)
    assert not decision.promote
    assert len(decision.reasons) == 1 and "vqa" in decision.reasons[0]
    strict = RegistryConfig(chance_margin=0.5)
    assert not gate(good, None, strict).promote
    # The macro rule: one task at chance is fine when the tasks' macro beats the baselines' macro.
    assert gate(bad, None, RegistryConfig(chance_rule="macro")).promote
    at_chance = _metrics(0.2, tasks={"zeroshot": 0.1, "vqa": 0.25}, chance={"zeroshot": 0.1, "vqa": 0.25})
    decision = gate(at_chance, None, RegistryConfig(chance_rule="macro"))
    assert not decision.promote and "chance macro" in decision.reasons[0]
    with pytest.raises(ValueError, match="chance baseline"):
        gate(_metrics(0.6, tasks={"zeroshot": 0.5}), None, RCFG)


def test_margin_on_overall_macro():
    champ = _metrics(0.50, 0.5, 0.5, 0.5)
    assert gate(_metrics(0.515, 0.52, 0.5, 0.52), champ, RCFG).promote
    decision = gate(_metrics(0.505, 0.51, 0.5, 0.505), champ, RCFG)
    assert not decision.promote and "overall" in decision.reasons[0]
    assert decision.deltas["overall"] == pytest.approx(0.005)
    # With no margin a strictly better model passes, an equal one does not (no churn on identical re-runs).
    no_margin = RegistryConfig(margin=0.0)
    assert gate(_metrics(0.501, 0.5, 0.5, 0.5), champ, no_margin).promote
    assert not gate(_metrics(0.50, 0.5, 0.5, 0.5), champ, no_margin).promote


def test_no_domain_may_regress_beyond_tolerance():
    champ = _metrics(0.50, 0.5, 0.5, 0.5)
    # Much better overall, but language dropped by 0.03 > 0.02.
    decision = gate(_metrics(0.60, 0.8, 0.47, 0.53), champ, RCFG)
    assert not decision.promote
    assert decision.reasons == [
        "language macro 0.4700 is worse than champion 0.5000 by more than tolerance 0.02"
    ]
    # Within tolerance passes.
    assert gate(_metrics(0.60, 0.8, 0.485, 0.515), champ, RCFG).promote
    # A domain the champion had but the candidate skipped is a failure, not a pass by omission.
    assert not gate(_metrics(0.9, 0.9, None, 0.9), champ, RCFG).promote


def test_gate_rejects_metrics_without_macro():
    with pytest.raises(ValueError, match="macro.overall"):
        gate({"tasks": {}}, None, RCFG)


def test_exactly_at_chance_in_float32_is_not_above_chance():
    # Seen: retrieval_t2i 0.026666667 (a float32 score) vs chance 0.02666666666666667 passed as "above chance".
    tasks = {"zeroshot": 0.5, "retrieval_t2i": 0.026666667}
    chance = {"zeroshot": 0.1, "retrieval_t2i": 0.02666666666666667}
    assert tasks["retrieval_t2i"] > chance["retrieval_t2i"]  # the float comparison alone says "above"
    decision = gate(_metrics(0.3, tasks=tasks, chance=chance), None, RCFG)
    assert not decision.promote
    assert decision.reasons == ["retrieval_t2i: 0.026667 does not beat chance 0.026667 by more than 0.0 + "
                                "tolerance 1e-06"]
    # Just above the tolerance is above chance; the macro rule uses the same strict bar.
    tasks["retrieval_t2i"] = chance["retrieval_t2i"] + 2e-6
    assert gate(_metrics(0.3, tasks=tasks, chance=chance), None, RCFG).promote
    at = {"zeroshot": 0.1, "vqa": 0.25}
    macro = RegistryConfig(chance_rule="macro", chance_tolerance=1e-3)
    assert not gate(_metrics(0.2, tasks={"zeroshot": 0.1005, "vqa": 0.25}, chance=at), None, macro).promote
    assert RegistryConfig().chance_tolerance == 1e-6


def test_metrics_of_versions_registered_by_the_old_code_are_read_from_their_tags():
    tags = {"macro.overall": "0.500000", "macro.vision": "0.400000", "task.zeroshot": "0.300000",
            "chance.zeroshot": "0.100000", "git_commit": "abc", "promotion.delta.overall": "0.1"}
    assert metrics_from_tags(tags) == _metrics(0.5, 0.4, tasks={"zeroshot": 0.3}, chance={"zeroshot": 0.1})


def test_promotion_lock_is_a_file_beside_sqlite_and_a_postgresql_lock_otherwise():
    assert promotion_lock("sqlite:////tmp/x/mlflow.db", RCFG) == FileLock(Path("/tmp/x/mlflow.db.promote.lock"))
    assert promotion_lock("sqlite:///mlflow.db", RCFG) == FileLock(Path("mlflow.db.promote.lock"))
    # The tracking store's own PostgreSQL database, or the one lock_uri names, whatever the tracking URI says.
    own = promotion_lock("postgresql+psycopg://u@db:5432/mlflow", RCFG)
    assert own == AdvisoryLock("postgresql+psycopg://u@db:5432/mlflow", f"flava.promote:{RCFG.model_name}")
    team = RegistryConfig(lock_uri="postgresql://u:secret@db:5432/mlflow")
    for uri in ("http://localhost:5000", "http://127.0.0.1:5000", "sqlite:///mlflow.db"):
        assert promotion_lock(uri, team) == AdvisoryLock("postgresql://u:secret@db:5432/mlflow", "flava.promote:flava")
    assert -2**63 <= own.key < 2**63 and own.key != AdvisoryLock(own.url, "flava.promote:other").key
    # A tracking server hides its database: a lock file in one checkout would exclude nobody else.
    with pytest.raises(ValueError, match="eval.registry.lock_uri"):
        promotion_lock("http://mlflow:5000", RegistryConfig())


def test_lock_uri_must_be_postgresql_with_its_driver_installed():
    with pytest.raises(ValueError, match="eval.registry.lock_uri must be a PostgreSQL URL"):
        RegistryConfig(lock_uri="mysql://u@db/mlflow")
    with pytest.raises(ValueError, match="eval.registry.lock_uri: postgresql\\+pg8000://u:\\*\\*\\*@db/m needs "
                                         "the postgresql driver 'pg8000', which is not installed"):
        promotion_lock("http://mlflow:5000", RegistryConfig(lock_uri="postgresql+pg8000://u:pw@db/m"))


def test_exclusive_lock_serialises_threads_and_times_out(tmp_path):
    path = tmp_path / "l.lock"
    inside, overlap = [], []

    def worker():
        with exclusive_lock(path, timeout_s=10):
            inside.append(1)
            if len(inside) > 1:
                overlap.append(1)
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap
    with exclusive_lock(path, timeout_s=5):
        with pytest.raises(TimeoutError, match="still held"):
            with exclusive_lock(path, timeout_s=0.2):
                pass
