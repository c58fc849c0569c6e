"""`flava sweep`, `flava k8s render|submit|sweep|status|logs|delete` and `flava dask manifests|up|down`: the
launchers (``flava.launch``) on the command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flava.cli import config_from, stage_command


def _sweep(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.launch.sweep import run_sweep
    from flava.pipeline import set_params

    if args.apply and Path(args.params).name != "params.yaml":
        raise ValueError(f"--apply writes params.yaml (what DVC tracks); --params is {args.params}")
    if args.worker_index < 0:
        raise ValueError(f"--worker-index must be 0 or more, got {args.worker_index}")
    result = run_sweep(config_from(args), workers=args.workers, first_worker=args.worker_index)
    if args.apply:  # the winner into params.yaml, as `dvc exp run -S` would write it
        set_params(Path(args.params).parent, result["best_overrides"])
        result["applied_to"] = args.params
    return result


def _write(text: str, output: str | None):
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
        return {"manifests": output}
    sys.stdout.write(text)
    return None


def _render(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.launch import k8s_manifests

    return _write(k8s_manifests.render_yaml(k8s_manifests.build_manifests(config_from(args), run_id=args.run_id)),
                  args.output)


def _submitted(job) -> dict:
    return {"job": job.name, "namespace": job.namespace, "uid": job.uid, "pods": job.completions,
            "reattached": job.reattached}


def _submit(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.launch import k8s

    cfg = config_from(args)
    if args.wait:
        return k8s.run_joint(cfg, run_id=args.run_id)
    section = k8s.k8s_section(cfg)
    job = k8s.submit(k8s.build_manifests(cfg, run_id=args.run_id), section.namespace,
                     api=k8s.api_client(section), retries=section.api_retries)
    return _submitted(job)


def _k8s_sweep(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.launch import k8s

    cfg = config_from(args)
    if args.wait:
        return k8s.run_sweep_job(cfg, run_id=args.run_id)
    manifests = k8s.build_sweep_manifests(cfg, run_id=args.run_id)
    if not args.submit:
        return _write(k8s.render_yaml(manifests), args.output)
    section = k8s.k8s_section(cfg)
    return _submitted(k8s.submit(manifests, section.namespace, api=k8s.api_client(section),
                                 retries=section.api_retries))


def _job(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.launch import k8s

    section = k8s.k8s_section(config_from(args))
    api = k8s.api_client(section)
    return k8s, section, api, k8s.lookup(section, args.job, api=api)


def _status(args: argparse.Namespace):
    k8s, section, api, job = _job(args)
    return k8s.status(job, api=api, retries=section.api_retries)


def _logs(args: argparse.Namespace):
    k8s, section, api, job = _job(args)
    for pod, text in k8s.logs(job, api=api, tail_lines=args.tail, retries=section.api_retries).items():
        if args.index is None or pod.startswith(f"{job.name}-{args.index}-"):
            sys.stdout.write(f"==> {pod} <==\n{text}\n")
    return None


def _delete(args: argparse.Namespace):
    k8s, section, api, job = _job(args)
    return {"job": job.name, "namespace": job.namespace,
            "deleted": k8s.delete(job, api=api, wait_gone=args.wait, retries=section.api_retries)}


def _dask_manifests(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.launch import dask_cluster, k8s_manifests

    return _write(k8s_manifests.render_yaml(dask_cluster.build_dask_manifests(config_from(args))), args.output)


def _dask_up(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.launch import dask_cluster, k8s

    cfg = config_from(args)
    result = dask_cluster.up(cfg, api=k8s.api_client(k8s.k8s_section(cfg)))
    # what to add to a data stage's command line (or params.yaml) to run its partitions there
    result["data_stage_args"] = f"--set data.engine.kind=address --set data.engine.address={result['address']}"
    return result


def _dask_down(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.launch import dask_cluster, k8s

    cfg = config_from(args)
    return dask_cluster.down(cfg, api=k8s.api_client(k8s.k8s_section(cfg)))


def _run_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", default=None,
                        help="suffix of the Job name (default: config digest + a random suffix); the same run id "
                             "re-attaches to that Job")


def register(groups: argparse._SubParsersAction) -> None:
    sweep = stage_command(groups, "sweep", "Optuna sweep of the joint stage's sampling ratios and warm-up "
                          "(launch.sweep); resumes the study by name", _sweep)
    sweep.add_argument("--workers", type=int, default=None,
                       help="worker processes on the study (default launch.sweep.workers); more workers may run "
                            "`flava sweep` on the same storage from other machines")
    sweep.add_argument("--worker-index", type=int, default=0,
                       help="index of this run's first worker in its log lines when other `flava sweep` runs "
                            "share the study, e.g. a Kubernetes sweep pod's completion index (default 0); seeds "
                            "come from trial numbers, so workers never repeat each other's draws")
    sweep.add_argument("--apply", action="store_true",
                       help="write the best trial's values into params.yaml when the study is done (a finished "
                            "study only reports and applies)")
    parser = groups.add_parser("k8s", help="run the joint stage (or the sweep's workers) as Kubernetes Jobs "
                                           "(launch.k8s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="ACTION")
    render = stage_command(sub, "render", "print the ConfigMap, headless Service and Indexed Job as YAML", _render)
    _run_id(render)
    render.add_argument("-o", "--output", default=None, help="write the YAML here instead of stdout")
    submit = stage_command(sub, "submit", "create the Job through the Kubernetes API (kubeconfig or in-cluster)",
                           _submit)
    _run_id(submit)
    submit.add_argument("--wait", action="store_true", help="wait for the Job to finish and save its pod logs")
    ksweep = stage_command(sub, "sweep", "the sweep's workers (launch.sweep.workers pods, one `flava sweep` "
                           "each on the shared study storage): print their Job as YAML, or --submit it", _k8s_sweep)
    _run_id(ksweep)
    ksweep.add_argument("-o", "--output", default=None, help="write the YAML here instead of stdout")
    ksweep.add_argument("--submit", action="store_true", help="create the Job through the Kubernetes API")
    ksweep.add_argument("--wait", action="store_true", help="submit, wait for the workers and save their logs")
    for name, help_text, handler in (
        ("status", "the Job's state and each pod's phase, exit code or pending reason", _status),
        ("logs", "the trainer logs of the Job's pods", _logs),
        ("delete", "delete the Job and its pods (its ConfigMap and Service go with it)", _delete),
    ):
        command = stage_command(sub, name, help_text, handler)
        command.add_argument("job", help="the Job's name, as `flava k8s submit` printed it")
        if name == "logs":
            command.add_argument("--index", type=int, default=None, help="only this completion index's pods")
            command.add_argument("--tail", type=int, default=None, help="only the last N lines of each")
        if name == "delete":
            command.add_argument("--wait", action="store_true", help="wait until the Job is gone")
    dask = groups.add_parser("dask", help="a Dask cluster on Kubernetes for the data stages (launch.dask): its "
                                          "scheduler's address goes into data.engine.address")
    dask_sub = dask.add_subparsers(dest="command", required=True, metavar="ACTION")
    manifests = stage_command(dask_sub, "manifests", "print the scheduler Deployment and Service and the worker "
                              "Deployment as YAML", _dask_manifests)
    manifests.add_argument("-o", "--output", default=None, help="write the YAML here instead of stdout")
    stage_command(dask_sub, "up", "create the cluster through the Kubernetes API (kubeconfig or in-cluster) and "
                  "print the scheduler's address", _dask_up)
    stage_command(dask_sub, "down", "delete the cluster's Deployments (and their pods) and Service", _dask_down)
