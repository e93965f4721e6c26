"""Command-line pieces the training benchmarks share (benchmarks/perf/*_train.py, imported as a sibling)."""

from __future__ import annotations

import argparse
from typing import Sequence

import torch


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads N``: torch's CPU threads for the whole run (default: torch's own)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def chosen_runs(ap: argparse.ArgumentParser, text: str | None, known: Sequence[str],
                default: Sequence[str] = ()) -> list[str]:
    """The comma-separated ``--runs`` (or ``default`` when empty), each one of ``known``."""
    runs = [r.strip() for r in (text or "").split(",") if r.strip()] or list(default)
    unknown = sorted(set(runs) - set(known))
    if unknown:
        ap.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return runs
