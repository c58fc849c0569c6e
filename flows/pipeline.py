"""The whole FLAVA recipe as one Prefect flow over ``dvc.yaml``: every stage task runs
``dvc --wait-for-lock repro --single-item <stage>`` in the workspace (the flow run's working directory).

    raw data -> prepare -> validate -> shard || fit -> pretrain_text || pretrain_image -> [sweep] -> joint
    (DVC, or a Kubernetes Job) -> evaluate -> promote

DVC decides what is up to date, for this route as for ``dvc repro`` and ``flava pipeline run``; each stage is its
own process, so the flow produces exactly the bytes ``dvc repro`` does, and the concurrent text and image stages
share no state. The task graph is ``dvc.yaml``'s (each task waits for the stages whose outputs it reads) and its
tasks take no result of another as input, so Prefect draws exactly the pipeline's edges.

Prefect adds what DVC leaves out: parameters in the UI, schedules (``infra/prefect.yaml``, ``flows/serve.py``),
retries for the stages that can fail transiently, the stage's own log lines in the run logs, a summary artifact,
one run per workspace (a global concurrency limit for served and deployed runs, and the workspace lock every
route takes) and a failure notification. Overrides are written to params.yaml as ``dvc exp run -S`` writes them,
and stay there after the run, as with ``dvc exp run`` in the workspace.

The data stages spread their own partitions over ``data.engine`` (a Dask scheduler with ``dask_address``), so the
flow runs its tasks on Prefect's default runner: a Dask task runner would move whole stage processes, not a
stage's work.
"""
import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.core import Block
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.futures import wait
from prefect.runtime import deployment, flow_run
from prefect.states import Completed
from prefect.utilities.annotations import quote

from flava import pipeline as pl
from flava.config import PipelineConfig, load_config
from flava.launch.config import launch_section
from flava.launch.k8s import run_joint
from flava.launch.sweep import run_sweep
from flava.model.config import ModelSection
from flava.tracking.runs import experiment_id, parent_run, tracking_uri

# The model presets, as the run form's choice list: the Literal of `model.preset`.
Preset = ModelSection.model_fields["preset"].annotation
# Retries for the stages that can fail for passing reasons: S3 uploads (shard), training that resumes from its
# checkpoints, the registry (lock timeouts, tracking-server hiccups). A stage command exiting 2 (bad input or
# config) is never retried.
RETRIES = {"shard": 2, "pretrain_text": 1, "pretrain_image": 1, "joint": 1, "promote": 2}


def transient(task, task_run, state) -> bool:
    """Retry condition: a stage whose command exited 2 (bad input or config), a ValueError or a
    FileNotFoundError fails at once; other errors retry."""
    try:
        state.result()
    except pl.StageFailed as err:
        return err.exit_code != 2
    except (ValueError, FileNotFoundError):
        return False
    except Exception:
        return True
    return False


def _stage_message(result: dict[str, Any], root: Path) -> str:
    """The task's state message: DVC's verdict, and for promote the decision."""
    text = f"{result['stage']}: {result['status']}"
    promotion = next((m for p, m in result["runs"].items() if p.endswith("promotion.json")), None)
    if promotion:
        cfg = load_config(root / pl.PARAMS_FILE)
        evaluation = pl.outcome(cfg, root)
        text += "; " + pl.decision_line(promotion, evaluation["macro_overall"],
                                        pl.compared_overall(tracking_uri(cfg), promotion))
    return text


@task(name="stage", cache_policy=NO_CACHE, retry_condition_fn=transient, retry_delay_seconds=10)
def dvc_stage(stage: str, force: bool):
    """One stage of dvc.yaml through ``dvc repro --single-item``; its output lines go to this task's log."""
    logger = get_run_logger()
    root = Path.cwd()
    result = pl.run_stage(stage, root, force=force, echo=logger.log)
    message = _stage_message(result, root)
    logger.info(message)
    return Completed(message=message, data=result)


@task(name=pl.RAW_DATA_NODE, task_run_name=pl.RAW_DATA_NODE, cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=30, retry_condition_fn=transient)
def raw_data() -> dict[str, Any]:
    """``paths.raw`` in place: kept, pulled from the DVC remote (data.dvc), else the synthetic world."""
    cfg = load_config(pl.PARAMS_FILE)
    source = pl.ensure_raw_data(cfg, Path.cwd())
    get_run_logger().info("raw data %s: %s", cfg.paths.raw, source)
    return {"stage": pl.RAW_DATA_NODE, "status": source, "metrics": {}}


# Retried: the study resumes by name from its storage.
@task(name="sweep", task_run_name="sweep", cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient)
def sweep_task() -> dict[str, Any]:
    """The Optuna study over the joint stage; its best params are then written to params.yaml (as `-S` would),
    so the joint stage that follows, run by DVC, trains with them and dvc.lock records them."""
    cfg = load_config(pl.PARAMS_FILE)
    result = run_sweep(cfg)
    pl.set_params(Path.cwd(), result["best_overrides"])
    get_run_logger().info("sweep: best %s, params.yaml set to %s", result["best_value"], result["best_overrides"])
    create_markdown_artifact(key="flava-sweep", markdown=sweep_markdown(result, cfg),
                             description="What the sweep learned")
    return result


def sweep_markdown(result: dict[str, Any], cfg: PipelineConfig) -> str:
    """The study in short: trial counts, the winner's values, links to its MLflow run and the sweep's plots."""
    uri = tracking_uri(cfg)
    exp = experiment_id(MlflowClient(uri), cfg)
    run = result["mlflow_run_id"]
    best = result.get("best_mlflow_run_id")
    lines = [
        f"# Sweep: best {_cell(result['best_value'])}", "",
        f"{result['n_complete']} complete, {result['n_pruned']} pruned, {result['n_failed']} failed "
        f"({result['n_lost']} lost with their worker); {result['trial_steps']} trial-steps.", "",
        f"MLflow sweep run: [{run}]({_ui_url(uri, f'experiments/{exp}/runs/{run}')})"
        + (f"; best trial: [{best}]({_ui_url(uri, f'experiments/{exp}/runs/{best}')})" if best else ""), "",
        "| params key | best value (written to params.yaml) |", "|---|---:|",
        *(f"| `{key}` | {_cell(value)} |" for key, value in result["best_values"].items()),
        "", "Plots (artifacts of the sweep run, under `plots/`): "
        + ", ".join(Path(p).stem.replace("_", " ") for p in result.get("plots", [])),
    ]
    return "\n".join(lines)


# Retried: a new Job resumes from the checkpoints on the shared workspace.
@task(name="joint-k8s", task_run_name="joint-k8s", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=60,
      retry_condition_fn=transient)
def joint_on_kubernetes() -> dict[str, Any]:
    """The joint stage as a Kubernetes Job on the shared workspace, then recorded in dvc.lock (`dvc commit`)."""
    root = Path.cwd()
    job = run_joint(load_config(pl.PARAMS_FILE))
    pl.commit_stage("joint", root)
    spec = pl.dvc_stages(root)["joint"]
    metrics = pl.read_metrics(root, spec)
    return {"stage": "joint", "status": "ran", "metrics": metrics, "runs": pl.read_run_files(root, spec),
            "job": job}


@contextlib.contextmanager
def _workspace_slot(name: str) -> Iterator[None]:
    """A slot of the global concurrency limit ``name`` (one slot, created if missing) for served and deployed
    runs; runs started in-process have no deployment and rely on the workspace lock alone."""
    if not deployment.id:
        yield
        return
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    get_run_logger().info("taking the slot of global concurrency limit %r (waits while another run holds it)", name)
    with concurrency(name, occupy=1):
        yield


def _submit_graph(sweep: bool, joint_on_k8s: bool, force: bool) -> dict[str, Any]:
    """Submit every stage of dvc.yaml, each waiting for the stages whose outputs it reads; returns the futures."""
    root = Path.cwd()
    cfg = load_config(pl.PARAMS_FILE)
    futures: dict[str, Any] = {}
    for name, preds in pl.stage_graph(pl.dvc_stages(root), cfg.paths.raw).items():
        upstream = [futures[p] for p in preds]
        if name == pl.RAW_DATA_NODE:
            futures[name] = raw_data.submit()
            continue
        if name == "joint" and sweep:
            futures["sweep"] = sweep_task.submit(wait_for=upstream)
            upstream = upstream + [futures["sweep"]]
        if name == "joint" and joint_on_k8s:
            futures[name] = joint_on_kubernetes.submit(wait_for=upstream)
            continue
        stage = dvc_stage.with_options(name=name, task_run_name=name, retries=RETRIES.get(name, 0))
        # quote: the arguments are plain values, not results of other tasks, so Prefect draws no edge from them.
        futures[name] = stage.submit(quote(name), quote(force), wait_for=upstream)
    return futures


def engine_overrides(dask_address: Optional[str]) -> list[str]:
    """The params of the data stages' engine for a Dask scheduler address (none without one). They are not DVC
    params of any stage (where partitions run does not change their bytes), so setting them re-runs nothing."""
    if not dask_address:
        return []
    return ["data.engine.kind=address", f"data.engine.address={dask_address}"]


def _ui_url(uri: str, path: str) -> str:
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/{path}"


def _cell(value: Any) -> str:
    return pl.fmt_number(value) if value is not None else ""


def _row(name: str, result: dict[str, Any], uri: str, exp: str) -> str:
    values: dict[str, Any] = {}
    for content in list(result.get("metrics", {}).values()) + list(result.get("runs", {}).values()):
        if isinstance(content, dict):
            values.update(content)
    run_id = values.get("mlflow_run_id") or values.get("run_id")
    links = [f"[run]({_ui_url(uri, f'experiments/{exp}/runs/{run_id}')})"] if run_id else []
    decision = ""
    if values.get("decision"):
        model, version = values.get("model_name"), values.get("version")
        decision = f"@{values['decision']} v{version}"
        links.append(f"[{model} v{version}]({_ui_url(uri, f'models/{model}/versions/{version}')})")
    macro = values.get("macro") if isinstance(values.get("macro"), dict) else {}
    cells = [name, result.get("status", ""), _cell(values.get("steps")), _cell(values.get("final_loss")),
             _cell(values.get("best_zeroshot_top1")), _cell(macro.get("overall")), decision, " ".join(links)]
    return "| " + " | ".join(cells) + " |"


def summary_markdown(results: dict[str, Any], cfg: PipelineConfig, parent_id: str, root: Path) -> str:
    """A table of the numbers that matter per stage, with links to the MLflow runs and the registered version."""
    uri = tracking_uri(cfg)
    exp = experiment_id(MlflowClient(uri), cfg)
    out = pl.outcome(cfg, root)
    decision = pl.decision_line(out["promotion"], out["macro_overall"], pl.compared_overall(uri, out["promotion"]))
    return "\n".join([
        f"# FLAVA pipeline: {decision}", "",
        f"MLflow pipeline run: [{parent_id}]({_ui_url(uri, f'experiments/{exp}/runs/{parent_id}')})", "",
        "| stage | DVC | steps | final loss | best zero-shot top-1 | macro overall | decision | MLflow |",
        "|---|---|---:|---:|---:|---:|---|---|",
        *(_row(name, result, uri, exp) for name, result in results.items()),
        "", f"Evaluation report: `{out['report']}`",
    ])


def notify_failure(flow, run, state) -> None:
    """Flow hook (failed or crashed): a message through the notification block ``launch.schedule.notify_block``
    names, when it names one (see infra/README.md for Slack, webhook and e-mail blocks)."""
    logger = logging.getLogger("flava.flows")
    try:
        block_ref = launch_section(load_config(pl.PARAMS_FILE)).schedule.notify_block
    except (ValueError, FileNotFoundError) as err:
        logger.warning("no failure notification: params.yaml does not load (%s)", err)
        return
    if not block_ref:
        return
    subject = f"flava-pipeline run {run.name} {state.type.value.lower()}"
    body = f"{subject}: {state.message or ''}\n{flow_run.ui_url or ''}".strip()
    Block.load(block_ref).notify(body=body, subject=subject)


@flow(name="flava-pipeline", on_failure=[notify_failure], on_crashed=[notify_failure])
def flava_pipeline(
    overrides: Optional[list[str]] = None,
    preset: Optional[Preset] = None,
    force: bool = False,
    sweep: bool = False,
    joint_on_k8s: bool = False,
    dask_address: Optional[str] = None,
) -> dict[str, Any]:
    """Run every stage of dvc.yaml that DVC does not find up to date, in the flow run's working directory.

    Args:
        overrides: params.yaml overrides, one `key.path=value` per item, e.g. `train.joint.steps=200` or
            `data.mixing.ratios.pair=0.6`. Validated before anything runs, then written to params.yaml as
            `dvc exp run -S` writes them; they stay there after the run.
        preset: The model preset (`model.preset`); empty keeps params.yaml's.
        force: Re-run every stage even when DVC finds it up to date (`dvc repro --force`).
        sweep: Run the Optuna sweep (`launch.sweep`) before the joint stage, which then trains with the best
            params found (written to params.yaml).
        joint_on_k8s: Run the joint stage as a Kubernetes Job (`launch.k8s`) instead of on this machine.
        dask_address: Run the data stages' partitions (validate, shard) on the Dask scheduler at this address,
            e.g. `tcp://flava-dask-scheduler.flava.svc:8786` as `flava dask up` prints it: written to params.yaml
            as `data.engine.kind=address` and `data.engine.address`, like an override. Empty keeps params.yaml's.
    """
    root = Path.cwd()
    changes = [*(overrides or []), *([f"model.preset={preset}"] if preset else []), *engine_overrides(dask_address)]
    cfg = load_config(root / pl.PARAMS_FILE, changes)  # a bad override fails here, before anything runs
    schedule = launch_section(cfg).schedule
    holder = f"Prefect flow run {flow_run.name}"
    with _workspace_slot(schedule.concurrency_limit), pl.workspace_lock(root, holder, schedule.lock_timeout_s):
        cfg = pl.set_params(root, changes)
        with parent_run(cfg, trigger="prefect", link=flow_run.ui_url, root=root) as parent_id:
            futures = _submit_graph(sweep, joint_on_k8s, force)
            wait(list(futures.values()))  # every stage finished before the lock goes, even when one failed
            results = {name: future.result() for name, future in futures.items()}
        create_markdown_artifact(
            key="flava-pipeline-summary", markdown=summary_markdown(results, cfg, parent_id, root),
            description="what each stage did, the numbers that matter and links to the MLflow runs")
    return {"mlflow_parent_run_id": parent_id, **results}
