"""`flava data ...`: the data stages. Each handler calls one stage function ``run_*(cfg) -> dict``."""
from __future__ import annotations

import argparse
import importlib

from flava.cli import config_from, stage_command

# subcommand -> (module, function, help)
STAGES = {
    "generate": ("flava.data.synthetic", "run_generate", "write the embedded synthetic world into paths.raw"),
    "prepare": ("flava.data.ingest", "run_prepare", "ingest raw corpora into per-corpus manifests"),
    "validate": ("flava.data.validate", "run_validate", "validate manifests with Great Expectations"),
    "shard": ("flava.data.shards", "run_shard", "write webdataset shards (local or s3://) with an index"),
    "fit": ("flava.data.fit", "run_fit", "fit the WordPiece tokenizer and the image codebook"),
}


def _handler(module: str, function: str):
    def run(args: argparse.Namespace):
        return getattr(importlib.import_module(module), function)(config_from(args))

    return run


def register(groups: argparse._SubParsersAction) -> None:
    parser = groups.add_parser("data", help="data stages: generate, prepare, validate, shard, fit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, (module, function, help_text) in STAGES.items():
        stage_command(sub, name, help_text, _handler(module, function))
