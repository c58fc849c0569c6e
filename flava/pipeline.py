"""The main job and what every route of it shares: raw data in place, the workspace lock, one stage through DVC.

``dvc.yaml`` is the single description of the stage graph and DVC's stage hashes the one rule of "up to date":
``flava pipeline run`` runs ``dvc repro``; the Prefect flow (``flows/pipeline.py``) runs each stage as
``dvc repro --single-item <stage>`` (:func:`run_stage`), so both routes re-run exactly the same stages and
produce the same bytes. This module makes sure the raw data is in place (pulled from the DVC remote, else the
embedded synthetic world when ``data.dvc`` records it), holds the workspace lock (one pipeline per workspace,
whichever route started it), reads the graph and each stage's metrics from ``dvc.yaml``, applies overrides to
``params.yaml`` as ``dvc exp run -S`` does, and tells a person what came out (:func:`outcome_lines`).
No Prefect here.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from dvc.utils.hydra import apply_overrides
from mlflow import MlflowClient

from flava.config import PipelineConfig, flatten, load_config
from flava.data.synthetic import generate
from flava.launch.config import launch_section
from flava.tracking import lineage
from flava.tracking.registry import metrics_from_tags
from flava.tracking.runs import parent_run, tracking_uri
from flava.workspace import LOCK_FILE, WorkspaceBusy, workspace_lock  # noqa: F401 - this module's API too

log = logging.getLogger(__name__)

# The md5 DVC records for the default synthetic world (seed and data.generate as shipped): `data.dvc` as
# committed. Generating is a stand-in for pulling only when data.dvc records exactly this world.
SYNTHETIC_WORLD_MD5 = "e5f2785bb23b3f55c9bf86c30b2e81e8.dir"
PARAMS_FILE = "params.yaml"  # the file DVC's params deps and `dvc exp run -S` read and write
RAW_DATA_NODE = "raw_data"  # the graph node that puts paths.raw in place before the first stage


# ------------------------------------------------------------------------------------------------ tools
def dvc_executable() -> str:
    """This interpreter's dvc (the virtualenv's), not whichever one PATH finds first."""
    return str(Path(sys.executable).parent / "dvc")


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin dir first, so `flava` and `dvc` resolve to ours;
    unbuffered Python so a stage's lines stream as they are written."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _dvc(args: Sequence[str], root: Path, env: dict[str, str] | None = None, check: bool = True,
         capture: bool = False) -> subprocess.CompletedProcess:
    log.info("running: dvc %s", " ".join(args))
    return subprocess.run([dvc_executable(), *args], cwd=root, env=env or tool_env(), check=check,
                          capture_output=capture, text=True)


# ---------------------------------------------------------------------------------------------- raw data
def default_remote(root: Path) -> str:
    """``name (url)`` of the default DVC remote, or a sentence saying there is none (read with `dvc config`:
    `dvc remote list` wraps long URLs at the terminal width)."""
    name = _dvc(["config", "core.remote"], root, check=False, capture=True).stdout.strip()
    if not name:
        return "(none: no default DVC remote is configured)"
    url = _dvc(["config", f"remote.{name}.url"], root, check=False, capture=True).stdout.strip()
    return f"{name} ({url})"


def ensure_raw_data(cfg: PipelineConfig, root: str | Path) -> str:
    """Make ``paths.raw`` present: keep it, else pull it from the DVC remote, else generate the synthetic world,
    but only when ``data.dvc`` records that world (or there is no data.dvc): generating anything else would
    replace the user's data and make the next ``dvc repro`` rewrite data.dvc.

    Returns how it got there: ``present``, ``pulled`` or ``generated``; raises FileNotFoundError naming the
    remote and the missing hash when data.dvc points at other data that no remote returned.
    """
    root = Path(root)
    raw = root / cfg.paths.raw
    if raw.is_dir() and any(raw.iterdir()):
        return "present"
    recorded = lineage.data_version(root)
    if recorded != "untracked":
        pulled = _dvc(["pull", "-q", "data.dvc"], root, check=False)
        if pulled.returncode == 0 and raw.is_dir() and any(raw.iterdir()):
            return "pulled"
        if recorded != SYNTHETIC_WORLD_MD5:
            raise FileNotFoundError(
                f"{cfg.paths.raw} is missing and `dvc pull data.dvc` from remote {default_remote(root)} did not "
                f"bring it: data.dvc records md5 {recorded}, which is not the embedded synthetic world "
                f"({SYNTHETIC_WORLD_MD5}), so nothing is generated in its place. Make that remote reachable "
                f"(`dvc remote list`, `dvc pull data.dvc`) or put the data at {cfg.paths.raw}.")
        log.info("no DVC remote holds %s; data.dvc records the synthetic world: generating it", cfg.paths.raw)
    generate(cfg.data.generate, cfg.seed, raw)
    return "generated"


# -------------------------------------------------------------------------------------- dvc.yaml, resolved
@dataclass(frozen=True)
class DvcStage:
    name: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]  # every output, metrics included
    metrics: tuple[str, ...]


_TEMPLATE = re.compile(r"\$\{\s*([^}\s]+)\s*\}")


def _entries(items: list | None) -> list[str]:
    """Paths of a dvc.yaml list, whose entries are strings or ``{path: {options}}``."""
    return [item if isinstance(item, str) else next(iter(item)) for item in items or []]


def _resolve(text: str, values: dict[str, Any], where: str) -> str:
    def lookup(match: re.Match) -> str:
        if match.group(1) not in values:
            raise ValueError(f"dvc.yaml {where}: ${{{match.group(1)}}} is not defined in params.yaml or vars")
        return str(values[match.group(1)])

    return _TEMPLATE.sub(lookup, text)


def dvc_stages(root: str | Path) -> dict[str, DvcStage]:
    """The stages of ``dvc.yaml`` in file order, with ``${...}`` resolved against params.yaml and ``vars``."""
    root = Path(root)
    spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    values: dict[str, Any] = {}
    if (root / PARAMS_FILE).exists():
        values.update(flatten(yaml.safe_load((root / PARAMS_FILE).read_text()) or {}))
    for item in spec.get("vars") or []:
        if isinstance(item, dict):
            values.update(flatten(item))
    stages = {}
    for name, body in (spec.get("stages") or {}).items():
        if "foreach" in body or "matrix" in body:
            raise ValueError(f"dvc.yaml stage {name!r}: foreach/matrix stages are not supported by the flow")
        paths = {key: tuple(_resolve(p, values, f"{name}.{key}") for p in _entries(body.get(key)))
                 for key in ("deps", "outs", "metrics", "plots")}
        # A params file other than params.yaml is read like a dep (the resolved config another stage writes).
        params_files = tuple(_resolve(p, values, f"{name}.params") for p in _entries(
            [item for item in body.get("params") or [] if isinstance(item, dict)]) if p != PARAMS_FILE)
        stages[name] = DvcStage(name, paths["deps"] + params_files,
                                paths["outs"] + paths["metrics"] + paths["plots"], paths["metrics"])
    return stages


def _covers(out: str, dep: str) -> bool:
    out, dep = out.rstrip("/"), dep.rstrip("/")
    return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")


def stage_graph(stages: dict[str, DvcStage], raw_path: str) -> dict[str, tuple[str, ...]]:
    """Each stage's direct predecessors (``{stage: (stage, ...)}``), topologically ordered: stage B follows A
    when B reads a path A writes; the ``raw_data`` node writes ``raw_path``. Edges implied by a longer path are
    dropped (transitive reduction), so the graph shows the pipeline's edges and nothing more."""
    producers = {RAW_DATA_NODE: (raw_path,), **{s.name: s.outs for s in stages.values()}}
    direct = {RAW_DATA_NODE: set()}
    for stage in stages.values():
        direct[stage.name] = {p for p, outs in producers.items() if p != stage.name
                              and any(_covers(o, d) for o in outs for d in stage.deps)}
    ancestors: dict[str, set[str]] = {}

    def above(name: str, trail: tuple[str, ...] = ()) -> set[str]:
        if name in trail:
            raise ValueError(f"dvc.yaml has a cycle: {' -> '.join(trail + (name,))}")
        if name not in ancestors:
            ancestors[name] = set().union(*({p} | above(p, trail + (name,)) for p in direct[name]))
        return ancestors[name]

    order = sorted(direct, key=lambda n: (len(above(n)), list(direct).index(n)))
    return {n: tuple(p for p in order if p in direct[n] and not any(p in above(q) for q in direct[n] - {p}))
            for n in order}


# ---------------------------------------------------------------------------------------------- one stage
class StageFailed(RuntimeError):
    """``dvc repro`` of one stage failed; ``exit_code`` is the stage command's (2: bad input or config)."""

    def __init__(self, stage: str, returncode: int, exit_code: int | None, tail: list[str]):
        self.stage, self.returncode, self.exit_code = stage, returncode, exit_code
        super().__init__(f"stage {stage} failed (dvc exit {returncode}, command exit {exit_code}):\n"
                         + "\n".join(tail[-15:]))


# A level where log formats put it: first (DVC's "ERROR: ...", logging's "WARNING:root:...") or after the date and
# time (flava's "%(asctime)s %(levelname)s %(name)s: ...").
_LEVEL = re.compile(r"^(?:\d{4}-\d\d-\d\d \S+ )?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")


def line_level(line: str) -> int:
    """The logging level a stage's output line carries (``... WARNING flava.x: ...``, DVC's ``ERROR: ...``)."""
    match = _LEVEL.match(line)
    return logging.getLevelName(match.group(1)) if match else logging.INFO


def read_metrics(root: str | Path, stage: DvcStage) -> dict[str, Any]:
    """The metrics files ``dvc.yaml`` declares for ``stage`` (path -> parsed JSON/YAML), those that exist."""
    out = {}
    for rel in stage.metrics:
        path = Path(root) / rel
        if path.is_file():
            out[rel] = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    return out


def read_run_files(root: str | Path, stage: DvcStage) -> dict[str, Any]:
    """The stage's JSON records that are not metrics (``*run.json``: MLflow run ids, model URIs;
    ``promotion.json``: the registry decision), those that exist."""
    return {rel: json.loads((Path(root) / rel).read_text()) for rel in stage.outs
            if rel.endswith(".json") and rel not in stage.metrics and (Path(root) / rel).is_file()}


def run_stage(stage: str, root: str | Path, *, force: bool = False, env: dict[str, str] | None = None,
              echo: Callable[[int, str], None] | None = None) -> dict[str, Any]:
    """``dvc --wait-for-lock repro --single-item <stage> [--force]`` in ``root``, every output line passed to
    ``echo(level, line)`` as it comes. DVC releases its repo lock while the stage command runs, so two stages
    run side by side; ``--wait-for-lock`` waits for the other's short locked phases.

    Returns ``{stage, status: ran | up to date | restored, metrics: {path: content}, runs: {path: content}}``."""
    root = Path(root)
    spec = dvc_stages(root)
    if stage not in spec:
        raise ValueError(f"dvc.yaml has no stage {stage!r}; stages: {', '.join(spec)}")
    cmd = [dvc_executable(), "--wait-for-lock", "repro", "--single-item", stage] + (["--force"] if force else [])
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=root, env=env or tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1, errors="replace") as proc:
        for raw in proc.stdout:
            line = raw.rstrip("\n").split("\r")[-1]  # a progress bar redraws with \r: keep its last state
            lines.append(line)
            if echo is not None:
                echo(line_level(line), line)
    text = "\n".join(lines)
    if proc.returncode != 0:
        exited = re.search(r"exited with (-?\d+)", text)
        raise StageFailed(stage, proc.returncode, int(exited.group(1)) if exited else None, lines)
    status = ("ran" if f"Running stage '{stage}'" in text
              else "restored" if f"Stage '{stage}' is cached" in text else "up to date")
    return {"stage": stage, "status": status, "metrics": read_metrics(root, spec[stage]),
            "runs": read_run_files(root, spec[stage])}


def commit_stage(stage: str, root: str | Path, env: dict[str, str] | None = None) -> None:
    """Record in dvc.lock the outputs a stage produced outside DVC (the joint stage as a Kubernetes Job on the
    shared workspace), so the next ``dvc repro`` counts it as up to date instead of training again."""
    _dvc(["--wait-for-lock", "commit", "--force", stage], Path(root), env=env)


# ------------------------------------------------------------------------------------------------ params
def set_params(root: str | Path, overrides: Sequence[str]) -> PipelineConfig:
    """Apply ``key.path=value`` overrides to params.yaml the way ``dvc exp run -S`` does (DVC's own Hydra-based
    modifier, so the file looks as DVC leaves it). Validated first: a bad override fails before anything is
    written; the written file must load to the same config, else it is put back and the call fails."""
    path = Path(root) / PARAMS_FILE
    expected = load_config(path, list(overrides))
    if not overrides:
        return expected
    before = path.read_text()
    try:
        # `++key=value`: Hydra's set-or-add, so a key params.yaml leaves to its default can be set too.
        apply_overrides(str(path), [o if o.startswith(("+", "~")) else f"++{o.strip()}" for o in overrides])
        written = load_config(path)
    except Exception:
        path.write_text(before)
        raise
    if written.model_dump(mode="json") != expected.model_dump(mode="json"):
        path.write_text(before)
        raise ValueError(f"overrides {list(overrides)} mean different values to DVC's parser and to flava's "
                         "(quote strings, write lists as [a, b]); params.yaml is unchanged")
    return written


# ---------------------------------------------------------------------------------------------- outcome
def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def outcome(cfg: PipelineConfig, root: str | Path) -> dict[str, Any]:
    """What a person wants to know after a run, from the stages' report files."""
    reports = Path(root) / cfg.paths.reports
    text, image = _read(reports / "pretrain_text.json"), _read(reports / "pretrain_image.json")
    joint, evaluation = _read(reports / "joint.json"), _read(reports / "eval" / "metrics.json")
    return {
        "final_loss": {"text": text.get("final_loss"), "image": image.get("final_loss"),
                       "joint": joint.get("final_loss")},
        "best_zeroshot_top1": joint.get("best_zeroshot_top1"),
        "macro_overall": (evaluation.get("macro") or {}).get("overall"),
        "promotion": _read(reports / "promotion.json"),
        "report": str(Path(cfg.paths.reports) / "eval" / "report.md"),  # as the user's shell sees it from root
    }


def mlflow_ui(uri: str, experiment_id: str, run_id: str) -> tuple[str, str | None]:
    """The URL of a run in the MLflow UI, and the command that serves that UI (None for a tracking server)."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}", None
    return (f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}",
            f"mlflow ui --backend-store-uri {uri}")


def fmt_number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def decision_line(promotion: dict[str, Any], overall: Any, champion_overall: Any) -> str:
    """``flava v3 is @champion; overall 0.52 vs 0.48`` (with the reasons when it was not promoted)."""
    if not promotion:
        return "no promotion decision (the promote stage did not run)"
    line = f"{promotion.get('model_name')} v{promotion.get('version')} is @{promotion.get('decision')}"
    if promotion.get("compared_to"):
        line += f"; overall {fmt_number(overall)} vs {fmt_number(champion_overall)} (v{promotion['compared_to']})"
    else:
        line += f"; overall {fmt_number(overall)}, no earlier champion"
    reasons = promotion.get("reasons") or []
    return line + (f"; because: {'; '.join(map(str, reasons))}" if reasons and not promotion.get("promoted")
                   else "")


def outcome_lines(result: dict[str, Any], champion_overall: Any = None) -> list[str]:
    """The few lines ``flava pipeline run`` ends with (the full JSON stays in the reports)."""
    loss = {k: fmt_number(v) for k, v in result["final_loss"].items()}
    url, command = result["mlflow_url"], result.get("mlflow_command")
    return [
        decision_line(result["promotion"], result["macro_overall"], champion_overall),
        f"final loss text {loss['text']}, image {loss['image']}, joint {loss['joint']}; best zero-shot top-1 "
        f"{fmt_number(result['best_zeroshot_top1'])}; macro overall {fmt_number(result['macro_overall'])}",
        f"report: {result['report']}",
        f"MLflow: {command} then open {url}" if command else f"MLflow: {url}",
    ]


def compared_overall(uri: str, promotion: dict[str, Any]) -> float | None:
    """The macro overall of the version the candidate was gated against, from its registry tags."""
    if not promotion.get("compared_to"):
        return None
    version = MlflowClient(uri).get_model_version(promotion["model_name"], str(promotion["compared_to"]))
    return metrics_from_tags(version.tags or {})["macro"].get("overall")


# ------------------------------------------------------------------------------------------- the main job
def run_pipeline(cfg: PipelineConfig, root: str | Path = ".", *, force: bool = False, dry: bool = False,
                 lock_timeout_s: float | None = None) -> dict[str, Any]:
    """Run every stage of ``dvc.yaml`` that is not up to date, nested under one MLflow parent run, holding the
    workspace lock. Returns the parent run, the raw data's source and :func:`outcome` with the MLflow UI link."""
    root = Path(root).resolve()
    timeout = launch_section(cfg).schedule.lock_timeout_s if lock_timeout_s is None else lock_timeout_s
    with workspace_lock(root, "flava pipeline run", timeout):
        source = ensure_raw_data(cfg, root)
        uri = tracking_uri(cfg)
        with parent_run(cfg, {"raw_data": source}, trigger="cli", root=root) as run_id:
            env = tool_env({"MLFLOW_TRACKING_URI": uri})  # after parent_run: carries $FLAVA_PARENT_RUN_ID
            result = _dvc(["repro"] + (["--force"] if force else []) + (["--dry"] if dry else []), root,
                          env=env, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"dvc repro failed with exit code {result.returncode}; see the stage output above")
    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    url, command = mlflow_ui(uri, experiment_id, run_id)
    return {"parent_run_id": run_id, "raw_data": source, **outcome(cfg, root), "mlflow_url": url,
            "mlflow_command": command}
