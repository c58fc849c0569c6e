"""A real git + DVC workspace whose dvc.yaml has the project's stages, edges, outputs and metrics files, but
light commands: each stage runs ``fake_stage.py <stage>``, which logs a few lines like a stage does, writes its
outputs and metrics, and records when it ran. The Prefect flow and ``flava pipeline run`` drive it through the
real ``dvc repro`` in seconds.

Knobs (environment, passed through DVC to the stage): ``FAKE_FAIL=<stage>`` and ``FAKE_FAIL_CODE`` make a stage
fail (``FAKE_FAIL_ONCE=1``: only the first time); ``FAKE_BARRIER=<dir>`` makes pretrain_text and pretrain_image wait for each other (they must overlap);
``FAKE_SLEEP`` seconds every stage sleeps.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from flava import pipeline as pl

ROOT = Path(__file__).resolve().parents[2]
CALLS = "fake_calls.jsonl"  # one line per stage run: stage, start, end (not a DVC output)

FAKE_STAGE = r'''
import json, os, sys, time
from pathlib import Path

stage = sys.argv[1]
spec = json.loads(Path("fake_stages.json").read_text())[stage]
start = time.time()
say = lambda level, text: print(f"2026-12-03 09:00:00,000 {level} flava.fake: {text}", flush=True)
say("INFO", f"{stage}: starting")
once = Path(f"failed-once-{stage}")
if os.environ.get("FAKE_FAIL") == stage and not (os.environ.get("FAKE_FAIL_ONCE") and once.exists()):
    once.touch()
    say("ERROR", f"{stage}: exploded on purpose")
    sys.exit(int(os.environ.get("FAKE_FAIL_CODE", "1")))
barrier = os.environ.get("FAKE_BARRIER")
if barrier and stage in ("pretrain_text", "pretrain_image"):
    Path(barrier).mkdir(parents=True, exist_ok=True)
    (Path(barrier) / stage).touch()
    other = Path(barrier) / ("pretrain_image" if stage == "pretrain_text" else "pretrain_text")
    deadline = time.time() + 60
    while not other.exists():
        if time.time() > deadline:
            say("ERROR", f"{stage}: {other.name} never started alongside")
            sys.exit(3)
        time.sleep(0.05)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
for out in spec["outs"]:
    path = Path(out)
    if path.suffix:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{stage}\n")
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / "part-0").write_text(f"{stage}\n")
for metrics in spec["metrics"]:
    if stage == "evaluate":
        content = {"macro": {"overall": 0.52, "vision": 0.5, "language": 0.5, "multimodal": 0.56}}
    elif stage.startswith("pretrain") or stage == "joint":
        content = {"steps": 4, "final_loss": 2.5 if stage == "joint" else 1.25}
        if stage == "joint":
            content["best_zeroshot_top1"] = 0.4
    else:
        content = {"rows": 10}
    Path(metrics).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics).write_text(json.dumps(content))
for out in spec["outs"]:
    if out.endswith("run.json"):
        Path(out).write_text(json.dumps({"run_id": f"fake-run-{stage}"}))
    elif out.endswith("promotion.json"):
        Path(out).write_text(json.dumps({"model_name": "flava", "version": 1, "decision": "champion",
                                         "promoted": True, "reasons": [], "compared_to": None}))
say("INFO", f"{stage}: step 4 loss 1.25")
say("WARNING", f"{stage}: a warning the stage logged")
if stage == "promote":
    say("INFO", "promotion: flava v1 is @champion")
with open(os.environ.get("FAKE_CALLS", "fake_calls.jsonl"), "a") as calls:
    calls.write(json.dumps({"stage": stage, "start": start, "end": time.time(), "pid": os.getpid()}) + "\n")
'''


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def make_workspace(path: Path) -> Path:
    """``path`` becomes a git + DVC workspace with the project's params.yaml and the fake dvc.yaml."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", path / "params.yaml")
    stages = pl.dvc_stages(ROOT)
    raw = pl.load_config(ROOT / "params.yaml").paths.raw
    produced = [raw] + [o for s in stages.values() for o in s.outs]
    spec, dvc_yaml = {}, {"stages": {}}
    for stage in stages.values():
        data_deps = [d for d in stage.deps if any(pl._covers(o, d) for o in produced)]
        outs = [o for o in stage.outs if o not in stage.metrics]
        spec[stage.name] = {"outs": outs, "metrics": list(stage.metrics)}
        body = {"cmd": f"{sys.executable} fake_stage.py {stage.name}", "deps": ["fake_stage.py", *data_deps]}
        if outs:
            body["outs"] = outs
        if stage.metrics:
            body["metrics"] = [{m: {"cache": False}} for m in stage.metrics]
        dvc_yaml["stages"][stage.name] = body
    (path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    (path / "fake_stages.json").write_text(json.dumps(spec, indent=1))
    (path / "fake_stage.py").write_text(FAKE_STAGE)
    (path / raw / "eval").mkdir(parents=True, exist_ok=True)  # the joint and evaluate stages read raw/eval
    (path / raw / "eval" / "labels.txt").write_text("raw data\n")
    (path / ".gitignore").write_text(f"/{CALLS}\n/mlflow.db\n/mlruns/\n")
    _git(path, "init", "-q")
    subprocess.run([pl.dvc_executable(), "init", "-q"], cwd=path, check=True, capture_output=True)
    _git(path, "add", "-A")
    _git(path, "commit", "-qm", "fake workspace")
    return path


def calls(path: Path) -> list[dict]:
    file = path / CALLS
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []
