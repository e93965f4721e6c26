"""The Metric interface.

Scoring is split in two so runs can resume and shards can merge:
``score(images)`` does the expensive per-image work and returns JSON-safe details (stored one line
per image in ``scores.jsonl``); ``accumulate(details)`` folds details into a small streaming state;
``compute()`` turns the state into numbers. Re-scoring a resumed run replays stored details through
``accumulate`` instead of recomputing them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence


@dataclass(frozen=True)
class GeneratedImage:
    """A generated image as the manifest records it."""

    path: Path
    entry: dict     # the manifest line: key, prompt, seed, set, concept, ...

    @property
    def key(self) -> str:
        return self.entry["key"]

    def load(self):
        from PIL import Image

        with Image.open(self.path) as im:
            return im.convert("RGB")


@dataclass(frozen=True)
class Column:
    key: str                 # key in MetricResult.values
    label: str
    higher_is_better: bool | None   # None: descriptive, no direction

    @property
    def header(self) -> str:
        arrow = "" if self.higher_is_better is None else (" ↑" if self.higher_is_better else " ↓")
        return self.label + arrow


@dataclass
class MetricResult:
    name: str
    values: dict[str, float]
    n: int                                   # images the numbers are computed over
    columns: list[Column] = field(default_factory=list)   # the headline columns for tables
    info: dict[str, Any] = field(default_factory=dict)    # protocol details (detector version, threshold...)

    def to_dict(self) -> dict:
        return {"name": self.name, "values": self.values, "n": self.n, "info": self.info,
                "columns": [c.__dict__ for c in self.columns]}


class Metric(abc.ABC):
    name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    description: ClassVar[str] = ""
    # Bump when the per-image details of the same options change meaning: stored scores are then redone.
    version: ClassVar[str] = "1"
    # Options that change speed, never numbers: changing them keeps the stored per-image scores.
    operational_options: ClassVar[tuple[str, ...]] = ("device", "batch_size", "providers")

    def __init__(self, **options):
        if options:
            raise TypeError(f"metric {self.name!r} got unknown options: {', '.join(options)}")
        self.reset()

    @abc.abstractmethod
    def reset(self) -> None: ...

    @abc.abstractmethod
    def score(self, images: Sequence[GeneratedImage]) -> list[dict]:
        """Per-image details (JSON-safe), in the order of ``images``."""

    @abc.abstractmethod
    def accumulate(self, details: Sequence[dict]) -> None:
        """Fold per-image details into the streaming state."""

    @abc.abstractmethod
    def compute(self) -> MetricResult: ...

    @abc.abstractmethod
    def merge(self, other: "Metric") -> None:
        """Add another shard's state into this one."""

    def check(self) -> None:
        """Fail early (before any image is generated) when the metric cannot run, e.g. a missing
        reference. Default: nothing to check."""

    def bind(self, run_dir: Path) -> None:
        """The run directory being scored: metrics with large per-image data (features) keep it
        there and store only a reference in ``scores.jsonl``. Default: nothing to keep."""

    def update(self, images: Sequence[GeneratedImage]) -> list[dict]:
        details = self.score(images)
        self.accumulate(details)
        return details

    def protocol(self) -> dict:
        """What a protocol card must record about this metric (models, versions, thresholds)."""
        return {}


def device_and_batch_size(metric: str, device: str, batch_size) -> tuple[str, int]:
    """The ``device`` (auto | cpu | cuda[:N]; auto = CUDA when present) and ``batch_size`` options of a
    metric that runs a network, checked with errors naming ``metrics.<metric>.options.<key>``."""
    import torch

    from ..errors import ConfigError

    if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
        raise ConfigError(f"metrics.{metric}.options.device: expected auto, cpu or cuda[:N], got {device!r}")
    resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else str(device)
    if int(batch_size) < 1:
        raise ConfigError(f"metrics.{metric}.options.batch_size: must be >= 1, got {batch_size}")
    return resolved, int(batch_size)
