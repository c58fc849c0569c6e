"""`flava evaluate ...` commands. Skeleton: the owning stage registers its subcommands here."""
from __future__ import annotations

import argparse


def register(groups: argparse._SubParsersAction) -> None:
    groups.add_parser("evaluate", help="evaluate stages (not yet available)")
