"""The Method interface and the erased-model artifact.

A method is one file plus one YAML (``benchmarks/methods/<name>.yaml``, or for a third-party
plugin the file its class names in ``config_file``, shipped in its own package): ``erase`` returns an
``Artifact``; ``apply`` is a context manager that edits the pipeline through ``cpebench.attention``
and restores it exactly on exit. Register third-party methods under the entry-point group
``cpebench.methods``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Mapping, Sequence

from ..config import plain
from ..data import sha256_file
from ..errors import ConfigError, CpebenchError, DataError

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "artifact.json"


def weight_checksum(tensors) -> list[float]:
    """[Σ|w|, Σw²] in float64 over ``tensors``: tells base models apart, yet the same weights loaded in
    fp16/bf16 agree to far below 1e-3 relative (rounding is unbiased), where a sha256 cannot."""
    s = s2 = 0.0
    for t in tensors:
        t = t.detach().double()
        s += float(t.abs().sum())
        s2 += float((t * t).sum())
    return [s, s2]


def checksums_agree(recorded, now, rtol: float = 1e-3) -> bool:
    return len(recorded) == len(now) and all(abs(a - b) <= rtol * max(abs(a), 1e-12) for a, b in zip(recorded, now))


def read_safetensors(path: str | Path) -> tuple[dict, dict]:
    """A safetensors file's tensors and metadata; a truncated or foreign file is an error naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as st:
            return {k: st.get_tensor(k) for k in st.keys()}, dict(st.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt") from None


def read_torch(path: str | Path) -> Any:
    """A ``torch.save`` file, loaded without running pickled code (``weights_only``); an unreadable one is an
    error naming it."""
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and format errors alike: the file is not a checkpoint
        raise DataError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def read_state_dict(path: str | Path) -> dict:
    """A weights file's tensors: safetensors, or a ``torch.save`` dict of tensors (released checkpoints)."""
    import torch

    path = Path(path)
    obj = read_safetensors(path)[0] if path.suffix == ".safetensors" else read_torch(path)
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise DataError(f"{path}: not a state dict of tensors")
    return dict(obj)


@dataclass(frozen=True)
class Concept:
    """A concept to erase, exactly as the string the method is given."""

    name: str
    extras: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Artifact:
    """An erased model = the base model + these tensors. Saved as safetensors + JSON metadata."""

    method: str
    tensors: dict = field(default_factory=dict)     # name -> torch.Tensor (only what the method changes)
    metadata: dict = field(default_factory=dict)    # concepts, hparams, base model, versions, ...

    def save(self, directory: str | Path) -> Path:
        """Write atomically: a half-written artifact is never found by a later run."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"method": self.method})
        meta = {"method": self.method, **self.metadata, "weights_sha256": sha256_file(tmp / WEIGHTS_FILE)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Artifact":
        directory = Path(directory)
        meta_path, weights = directory / META_FILE, directory / WEIGHTS_FILE
        if not meta_path.exists() or not weights.exists():
            raise CpebenchError(f"{directory} is not a cpebench artifact (needs {META_FILE} and {WEIGHTS_FILE})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as e:     # JSON and UTF-8 decoding errors
            raise DataError(f"{meta_path}: not valid JSON ({e}); the artifact is corrupt") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("method"), str):
            raise DataError(f"{meta_path}: no \"method\" entry; not a cpebench artifact")
        recorded = meta.pop("weights_sha256", None)   # file integrity only; not part of the content hash
        if recorded and recorded != sha256_file(weights):
            raise CpebenchError(f"{weights}: sha256 does not match {META_FILE}; the artifact is corrupt")
        method = meta.pop("method")
        return cls(method=method, tensors=read_safetensors(weights)[0], metadata=meta)

    @property
    def sha256(self) -> str:
        """Content hash of the erased model (recorded in every run's protocol card): the method, its
        tensors and the metadata in DEFINING_METADATA. Dates, timings, code versions and training logs
        only describe how it was made, so a retrain that gives the same bits gives the same hash."""
        import torch

        h = hashlib.sha256(self.method.encode())
        for k in sorted(self.tensors):
            t = self.tensors[k].detach().contiguous().cpu()
            h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        defining = {k: self.metadata[k] for k in DEFINING_METADATA if k in self.metadata}
        h.update(json.dumps(defining, sort_keys=True, default=str).encode())
        return h.hexdigest()


# What defines an erased model besides its tensors: what was erased, on which base model, by which
# method version, with which result-changing hyperparameters, in which precision, and which layers a
# method's apply reads (CPE).
DEFINING_METADATA = ("concepts", "hparams", "base_model", "base_revision", "method_version", "precision", "layers")


def artifact_fingerprint(method: str, method_version: str, concepts: Sequence[Concept], hparams: Mapping,
                         base_model: str, base_revision: str | None, code_version: str,
                         precision: Mapping | None = None) -> str:
    """Cache key of an erased model: everything that changes its weights. ``hparams`` are the parsed,
    result-changing values (``Method.parse_hparams`` minus the operational ones); ``precision`` is the
    dtypes (and TF32) the erase ran in: an fp16 erase is never reused for an fp32 run."""
    key = {
        "method": method, "method_version": method_version, "concepts": [c.name for c in concepts],
        "hparams": dict(hparams), "base_model": base_model, "base_revision": base_revision, "code": code_version,
        "precision": dict(precision or {}),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class EraseContext:
    """Where and how ``erase`` runs (never part of the result)."""

    device: str = "cpu"
    data_dir: str | None = None      # local copy of the data files (templates, anchors)
    workdir: Path | None = None      # resumable training state lives here while training
    progress: bool = True


class Method(abc.ABC):
    name: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    trains: ClassVar[bool] = True          # False: erase is free (no cache needed)
    operational_hparams: ClassVar[tuple] = ()   # hparams that do not change the result (not fingerprinted)
    hparams_class: ClassVar[type | None] = None   # the method's Hparams dataclass (``from_dict(mapping)``)
    # A plugin's own YAML (hparams per task, sources), shipped as package data: a path relative to the
    # module defining the class. Built-ins keep theirs in benchmarks/methods/<name>.yaml, which wins.
    config_file: ClassVar[str | None] = None

    def hparams(self, hparams: Mapping[str, Any] | None) -> Any:
        """The method's ``Hparams`` (checked, typed, defaults filled in) from a mapping; ``erase`` starts
        with it. A method without an ``hparams_class`` gets the mapping as a dict."""
        if self.hparams_class is None:
            return dict(hparams or {})
        return self.hparams_class.from_dict(dict(hparams or {}))

    def parse_hparams(self, hparams: Mapping[str, Any] | None) -> dict[str, Any]:
        """``hparams`` as plain data: parsed once, before the model loads (a bad value fails before
        minutes of loading), and what the cache key hashes (``1e-5`` from the command line and
        ``1.0e-5`` from YAML are the same value). Parsing the result again gives it back unchanged."""
        hp = self.hparams(hparams)
        return hp if isinstance(hp, dict) else plain(dataclasses.asdict(hp))

    @abc.abstractmethod
    def erase(self, pipe, concepts: Sequence[Concept], hparams: Mapping[str, Any],
              ctx: EraseContext | None = None) -> Artifact:
        """Compute the edit for ``concepts`` on ``pipe`` (which must be left unchanged)."""

    @abc.abstractmethod
    def apply(self, pipe, artifact: Artifact) -> ContextManager:
        """Context manager: inside, ``pipe`` is the erased model; on exit it is restored bit for bit."""

    def load_artifact(self, path: str | Path) -> Artifact:
        """An artifact given by the user (``--artifact``): a cpebench artifact folder, or anything else the
        method's ``load_release`` reads (the authors' released weights in their own format)."""
        path = Path(path)
        if not (path / "artifact.json").is_file() and type(self).load_release is not Method.load_release:
            return self.load_release(path)
        artifact = Artifact.load(path)
        if artifact.method != self.name:
            raise CpebenchError(f"{path} is a {artifact.method!r} artifact, not {self.name!r}")
        return artifact

    def load_release(self, path: Path) -> Artifact:
        """The method's released weights as an artifact; a method that has them overrides this."""
        raise NotImplementedError


def hparam_value(method: str, key: str, kind: str, value: Any) -> Any:
    """One hyperparameter coerced to its field's annotation (``int``, ``float``, ``bool``, ``str``,
    ``tuple``; ``X | None`` also takes null; anything else is kept as given). YAML and the command
    line give strings for some numbers (``1e-3``) and booleans."""
    if value is None and "None" in kind:
        return None
    kind = kind.split("|")[0].strip()
    try:
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if kind == "str":
            if value is None or isinstance(value, (list, tuple, dict, bool)):
                raise ValueError
            return str(value)
        if kind == "tuple":
            if isinstance(value, str):
                return (value,)
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return tuple(str(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{method}: hparams.{key} must be {kind}, got {value!r}") from None
    return value


def hparams_from_dict(cls, d: Mapping[str, Any] | None, method: str) -> dict[str, Any]:
    """Field values for the Hparams dataclass ``cls`` from a mapping: unknown keys are named (with the
    nearest known one), values coerced to the field annotations by ``hparam_value``."""
    from dataclasses import fields

    from ..registry import did_you_mean

    d = dict(d or {})
    types = {f.name: str(f.type) for f in fields(cls)}
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise ConfigError(f"{method}: unknown hyperparameter(s) {', '.join(unknown)}."
                          + did_you_mean(unknown[0], sorted(types)))
    return {k: hparam_value(method, k, types[k], v) for k, v in d.items()}


class NoEdit(contextlib.AbstractContextManager):
    def __exit__(self, *exc):
        return None
