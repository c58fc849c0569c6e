"""`flava launch ...` commands (skeleton; the owning stage registers its subcommands here)."""
from __future__ import annotations

import argparse


def register(groups: argparse._SubParsersAction) -> None:
    return None
