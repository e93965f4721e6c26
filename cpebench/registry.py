"""Typed registries for methods and metrics.

Built-in entries are lazy import strings; third parties plug in through the entry-point
groups ``cpebench.methods`` / ``cpebench.metrics`` (or ``Registry.register`` at run time).
Unknown names fail with the known names and the nearest match.
"""

from __future__ import annotations

import difflib
import importlib
from importlib import metadata
from typing import Callable, Generic, Iterable, TypeVar

from .errors import RegistryError

T = TypeVar("T")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """A suffix for error messages: the known names and the closest one."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f" Known: {', '.join(known) or '(none)'}.{hint}"


def _import_target(target: str):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str, builtins: dict[str, str] | None = None):
        self.kind = kind            # "method" / "metric": used in messages
        self.group = group          # entry-point group
        self._targets: dict[str, str | T] = dict(builtins or {})
        self._entry_points_loaded = False

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self._targets[name or getattr(obj, "name")] = obj
            return obj
        return deco

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.group):
            self._targets.setdefault(ep.name, ep.value)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._targets)

    def get(self, name: str) -> T:
        self._load_entry_points()
        if name not in self._targets:
            raise RegistryError(f"Unknown {self.kind} {name!r}.{did_you_mean(name, self._targets)}")
        target = self._targets[name]
        if isinstance(target, str):
            try:
                target = _import_target(target)
            except (ImportError, AttributeError) as e:
                raise RegistryError(f"{self.kind} {name!r} is registered as {target!r} but cannot be imported: {e}") from e
            self._targets[name] = target
        return target  # type: ignore[return-value]


METHODS: Registry = Registry("method", "cpebench.methods", {"sd": "cpebench.methods.sd:BaseModel", "cpe": "cpebench.methods.cpe:CPE"})
METRICS: Registry = Registry("metric", "cpebench.metrics", {"nudenet": "cpebench.metrics.nudenet:NudeNet",
                                                             "nudity_asr": "cpebench.metrics.nudity_asr:NudityASR",
                                                             "clip_score": "cpebench.metrics.clip_score:ClipScore",
                                                             "fid": "cpebench.metrics.fid:FID",
                                                             "kid": "cpebench.metrics.fid:KID",
                                                             "gcd": "cpebench.metrics.gcd:GCD",
                                                             "identity": "cpebench.metrics.identity:IdentityConsistency",
                                                             "micro_judge": "cpebench.metrics.micro:MicroJudge",
                                                             "micro_fid": "cpebench.metrics.micro:MicroFID"})
