"""`flava evaluate`, `flava promote` and `flava export-hf`: thin wrappers over the library's stage functions."""
from __future__ import annotations

import argparse
from pathlib import Path

from flava.cli import config_from, stage_command


def _evaluate(args: argparse.Namespace):
    if args.model:  # a pretrained baseline, outside the DVC stage: its own modules, imported only then
        from flava.eval.pretrained import run_evaluate_pretrained

        return run_evaluate_pretrained(config_from(args), args.model)
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.eval.run import run_evaluate

    return run_evaluate(config_from(args))


def _promote(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.tracking.registry import run_promote

    return run_promote(config_from(args))


def _export_hf(args: argparse.Namespace):
    # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
    from flava.eval.model_card import build_model_card
    from flava.export import export_hf

    cfg = config_from(args)
    model_dir = Path(args.model_dir or Path(cfg.paths.models) / "joint" / "best")
    if not model_dir.exists():
        raise FileNotFoundError(f"model directory {model_dir} not found")
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else model_dir / "tokenizer"
    out_dir = Path(args.out or Path(cfg.paths.models) / "hf")
    card = build_model_card(cfg, model_dir)
    written = export_hf(model_dir, out_dir, tokenizer_dir=tokenizer_dir, model_card=card, data=cfg.data)
    return {"out_dir": str(written), "model_dir": str(model_dir), "tokenizer_dir": str(tokenizer_dir)}


def register(groups: argparse._SubParsersAction) -> None:
    evaluate = stage_command(groups, "evaluate",
                             "evaluate models/joint/best: zero-shot, retrieval, probe, fine-tunes, report", _evaluate)
    evaluate.add_argument("--model", metavar="DIR",
                          help="evaluate and register a local transformers FLAVA checkpoint (save_pretrained dir) as "
                               "a baseline instead; reports under <paths.reports>/baselines/<DIR name>")
    stage_command(groups, "promote", "register the evaluated model and gate it against @champion", _promote)
    export = stage_command(groups, "export-hf", "export a model directory in the transformers FLAVA format",
                           _export_hf)
    export.add_argument("--model-dir", help="model directory (default: <paths.models>/joint/best)")
    export.add_argument("--tokenizer-dir", help="tokenizer directory (default: <model-dir>/tokenizer)")
    export.add_argument("--out", help="output directory (default: <paths.models>/hf)")
