"""`flava pretrain text|image|joint`: the pretraining stages (``flava.train.stages.run_pretrain``).

Run under ``torchrun --nproc_per_node N -m flava pretrain joint`` (or ``flava launch``) for several ranks; every
rank runs the same command and only rank 0 prints the result.
"""
from __future__ import annotations

import argparse

from flava.cli import config_from, stage_command

STAGES = {
    "text": "stage 1: text encoder with MLM on the text corpus -> paths.models/text",
    "image": "stage 1: image encoder with MIM on the image corpus -> paths.models/image",
    "joint": "stage 2: whole FLAVA on the mixed corpora, zero-shot model selection -> paths.models/joint/{last,best}",
}


def _handler(stage: str):
    def run(args: argparse.Namespace):
        # Imported when the command runs: each command loads only its own stage's modules (its DVC code deps).
        from flava.distributed import is_main_process
        from flava.train.stages import run_pretrain

        result = run_pretrain(config_from(args), stage)
        return result if is_main_process() else None

    return run


def register(groups: argparse._SubParsersAction) -> None:
    parser = groups.add_parser("pretrain", help="pretraining stages: text, image (unimodal), joint")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, help_text in STAGES.items():
        stage_command(sub, name, help_text, _handler(name))
