"""`flava sweep` and `flava k8s render|submit`: the launchers (``flava.launch``) on the command line."""
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
    result = run_sweep(config_from(args), workers=args.workers)
    if args.apply:  # the winner into params.yaml, as `dvc exp run -S` would write it
        set_params(Path(args.params).parent, result["best_overrides"])
        result["applied_to"] = args.params
    return result


def _render(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.launch import k8s

    text = k8s.render_yaml(k8s.build_manifests(config_from(args), run_id=args.run_id))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        return {"manifests": args.output}
    sys.stdout.write(text)
    return None


def _submit(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.launch import k8s
    from flava.launch.config import launch_section

    cfg = config_from(args)
    if args.wait:
        return k8s.run_joint(cfg, run_id=args.run_id)
    section = launch_section(cfg).k8s
    job = k8s.submit(k8s.build_manifests(cfg, run_id=args.run_id), section.namespace, api=k8s.api_client(section))
    return {"job": job.name, "namespace": job.namespace, "uid": job.uid, "nodes": job.completions}


def _run_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", default=None,
                        help="suffix of the Job name (default: config digest + a random suffix)")


def register(groups: argparse._SubParsersAction) -> None:
    sweep = stage_command(groups, "sweep", "Optuna sweep of the joint stage's sampling ratios and warm-up "
                          "(launch.sweep); resumes the study by name", _sweep)
    sweep.add_argument("--workers", type=int, default=None,
                       help="worker processes on the study (default launch.sweep.workers); more workers may run "
                            "`flava sweep` on the same storage from other machines")
    sweep.add_argument("--apply", action="store_true",
                       help="write the best trial's values into params.yaml when the study is done (a finished "
                            "study only reports and applies)")
    parser = groups.add_parser("k8s", help="run the joint stage as a distributed Kubernetes Job (launch.k8s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="ACTION")
    render = stage_command(sub, "render", "print the ConfigMap, headless Service and Indexed Job as YAML", _render)
    _run_id(render)
    render.add_argument("-o", "--output", default=None, help="write the YAML here instead of stdout")
    submit = stage_command(sub, "submit", "create the Job through the Kubernetes API (kubeconfig or in-cluster)",
                           _submit)
    _run_id(submit)
    submit.add_argument("--wait", action="store_true", help="wait for the Job to finish and save its pod logs")
