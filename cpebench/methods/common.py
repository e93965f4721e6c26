"""What erasure methods share: concept names, hyperparameter parsing, text lists, the K/V projection names.

Every method file (``baselines/*.py``, ``cpebench/methods/*.py``) builds on this module and on
``cpebench.methods`` (the interface) and ``cpebench.attention`` (edits of the UNet); no method imports
another method.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import ConfigError, DataError
from . import Concept, checksums_agree, hparams_from_dict, weight_checksum

log = logging.getLogger(__name__)

TOKENS = 77                       # CLIP's context length: the rows of every text embedding
PROJECTIONS = ("to_k", "to_v")    # the cross-attention (attn2) projections a weight edit may change
ENCODE_BATCH = 256                # texts per text-encoder call


def concept_names(method: str, concepts: Sequence[Concept | str]) -> list[str]:
    """The concepts' names, stripped; at least one, none blank, no two equal up to case."""
    names = [(c.name if isinstance(c, Concept) else str(c)).strip() for c in concepts]
    if not names:
        raise ConfigError(f"{method}: no concepts to erase; give the task's concepts or --concepts NAME ...")
    if any(not n for n in names) or len({n.lower() for n in names}) != len(names):
        raise ConfigError(f"{method}: concept names must be non-empty and distinct, got {names}")
    return names


def parse_hparams(cls, d: Mapping[str, Any], method: str):
    """A frozen Hparams dataclass from a mapping (unknown keys named, values typed), then checked."""
    hp = cls(**hparams_from_dict(cls, d, method))
    hp.check(method)
    return hp


class CheckedHparams:
    """Base of a method's frozen ``Hparams`` dataclass: ``from_dict`` parses a mapping (unknown keys named,
    values typed) and then calls ``check(method)``, once, before any model is loaded."""

    method_name: ClassVar[str]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        return parse_hparams(cls, d, cls.method_name)

    def check(self, method: str) -> None:
        """Raise ConfigError naming ``hparams.<key>`` for a value the method cannot run with."""


def check_non_negative(method: str, **values) -> None:
    for key, v in values.items():
        if v < 0:
            raise ConfigError(f"{method}: hparams.{key} must be >= 0, got {v}")


def check_choices(method: str, hp, choices: Mapping[str, Sequence[str]], hints: Mapping[str, str] | None = None) -> None:
    """Each named hyperparameter is one of its allowed values; the error names the first that is not (with the
    hint for its key, if any)."""
    for key, allowed in choices.items():
        value = getattr(hp, key)
        if value not in allowed:
            raise ConfigError(f"{method}: hparams.{key} must be one of {', '.join(map(str, allowed))}, got {value!r}"
                              + (hints or {}).get(key, ""))


def check_at_least_one(method: str, hp, keys: Sequence[str]) -> None:
    """Counts (steps, batch sizes, images) must be >= 1."""
    for key in keys:
        if getattr(hp, key) < 1:
            raise ConfigError(f"{method}: hparams.{key} must be >= 1, got {getattr(hp, key)}")


def check_projections(projections: Sequence[str], method: str) -> tuple[str, ...]:
    """A non-empty subset of PROJECTIONS, in PROJECTIONS' order."""
    unknown = [p for p in projections if p not in PROJECTIONS]
    if unknown or not projections:
        raise ConfigError(f"{method}: hparams.projections must be a non-empty subset of {list(PROJECTIONS)} "
                          f"(the attn2 projections a weight edit changes), got {list(projections)}"
                          + (f"; unknown: {', '.join(map(repr, unknown))}" if unknown else ""))
    return tuple(p for p in PROJECTIONS if p in projections)


def _read_column(path: Path, column: str, source: str, blanks: bool) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if column not in (reader.fieldnames or []):
            raise DataError(f"{source}: column {column!r} not found (columns: {', '.join(reader.fieldnames or [])})")
        values = []
        for row_no, row in enumerate(reader, start=2):
            value = (row[column] or "").strip()
            if not value and not blanks:
                raise DataError(f"{source}: row {row_no}: empty {column!r}")
            values.append(value)
    return values


def text_list(method: str, spec: Any, key: str, data_dir, *, blanks: bool = True) -> list[str]:
    """The texts of an hparam given as a text, a list, or {file: <cpebench data file>, column: <name>}
    (column defaults to ``prompt``). ``blanks=False``: an empty cell of the file is an error."""
    from .. import data

    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec.strip()]
    if isinstance(spec, (list, tuple)):
        return [str(s).strip() for s in spec]
    if isinstance(spec, Mapping) and "file" in spec:
        unknown = sorted(set(spec) - {"file", "column"})
        if unknown:
            raise ConfigError(f"{method}: hparams.{key}: unknown key(s) {', '.join(unknown)} (file, column)")
        path = data.resolve_data_file(spec["file"], data_dir)
        return _read_column(path, spec.get("column", "prompt"), f"{spec['file']} (hparams.{key})", blanks)
    raise ConfigError(f"{method}: hparams.{key} must be a list of texts or {{file: ..., column: ...}}, got {spec!r}")


def preserve_list(method: str, spec: Any, names: Sequence[str], data_dir, key: str = "preserve") -> list[str]:
    """Preserve concepts in first-seen order, without blanks, duplicates or erased concepts (UCE's official
    rule: ``[text for text in retain_texts if text.lower() not in old_texts_lower]``)."""
    erased = {n.lower() for n in names}
    return [t for t in dict.fromkeys(text_list(method, spec, key, data_dir)) if t and t.lower() not in erased]


@torch.no_grad()
def encode_texts(pipe, texts: Sequence[str], device, dtype: torch.dtype = torch.float32, *, batch: int = ENCODE_BATCH,
                 progress: bool = False, desc: str = "encode") -> torch.Tensor:
    """SD's conditioning (``models.text_embeddings``, what generation conditions on) for ``texts``, in batches
    of ``batch``, as ``dtype`` [N, 77, D] on ``device``."""
    from tqdm.auto import tqdm

    from ..models import text_embeddings

    texts = list(texts)
    out = [text_embeddings(pipe, texts[i : i + batch]).to(device=device, dtype=dtype)
           for i in tqdm(range(0, len(texts), batch), disable=not progress or len(texts) <= batch, desc=desc,
                         unit="batch", leave=False)]
    hidden = pipe.text_encoder.config.hidden_size
    return torch.cat(out) if out else torch.empty(0, TOKENS, hidden, dtype=dtype, device=device)


# --------------------------------------------------------------------------- the K/V projections and the base model


def kv_layers(unet, projections: Sequence[str] = PROJECTIONS) -> list[tuple[str, torch.nn.Linear]]:
    """Every ``attn2.<p>`` Linear for p in ``projections``, in the UNet's module order (SD-1.x: 16 per
    projection; with both, each block's to_k before its to_v, the official CPE/UCE order)."""
    out = [(name, module) for name, module in unet.named_modules()
           if isinstance(module, torch.nn.Linear) and any(name.endswith(f"attn2.{p}") for p in projections)]
    if not out:
        raise ConfigError("the UNet has no attn2.to_k/to_v layers; cpebench's methods need an SD-1.x UNet")
    return out


def base_kv_sha256(unet) -> str:
    """Fingerprint of the 32 K/V projections (what CPE reads and UCE, RECE and MACE edit): an artifact made
    on one base model is refused on another."""
    h = hashlib.sha256()
    for name, lin in kv_layers(unet):
        w = lin.weight.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode() + str(tuple(w.shape)).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def base_kv_checksums(unet) -> dict[str, list[float]]:
    """``weight_checksum`` of each K/V projection."""
    return {name: weight_checksum([lin.weight]) for name, lin in kv_layers(unet)}


def check_base_kv(artifact, unet, what: str) -> None:
    """Refuse an artifact computed from other K/V weights. Exact (sha256) in the artifact's precision;
    a model loaded in fp16/bf16 is compared by per-layer checksums instead, since its rounded weights
    cannot match the fp32 sha256."""
    recorded = artifact.metadata.get("base_kv_sha256")
    if not recorded or recorded == base_kv_sha256(unet):
        return
    if unet.dtype != torch.float32:
        sums = artifact.metadata.get("base_kv_checksums")
        if sums is None:
            log.warning("%s artifact predates per-layer checksums: its base model cannot be checked against a %s "
                        "model (only against fp32)", what, unet.dtype)
            return
        now = base_kv_checksums(unet)
        if set(now) == set(sums) and all(checksums_agree(sums[k], now[k]) for k in now):
            return
    raise ConfigError(
        f"{what} artifact was made from base model {artifact.metadata.get('base_model', '?')!r}, whose K/V weights "
        "differ from the loaded model's; make it again on this model (or load the model it was made for)")


# --------------------------------------------------------------------------- resumable training state


def save_state(path: Path, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None) -> None:
    """Write a training state atomically (a ``.tmp`` file renamed over ``path``): a kill mid-write leaves the
    previous state. ``key`` names the training it belongs to (settings, concepts): ``load_state`` gives the
    state back only for the same key."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={**dict(meta or {}), "key": key})
    tmp.replace(path)


def load_state(path: Path | None, key: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of the state ``save_state`` wrote for ``key``; None when there is none, or when
    the file belongs to another training (logged: that training starts anew)."""
    from safetensors import SafetensorError, safe_open

    if path is None or not Path(path).exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as st:
            meta = st.metadata() or {}
            if meta.get("key") != key:
                log.warning("%s: %s belongs to another training; starting anew", what, path)
                return None
            tensors = {k: st.get_tensor(k) for k in st.keys()}  # safe_open has no __iter__
    except SafetensorError as err:     # e.g. a state from an older cpebench (pickled) or a truncated copy
        log.warning("%s: %s is not a readable state (%s); starting anew", what, path, err)
        return None
    return tensors, meta


def training_tensors(opt: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained parameters and their optimizer state as flat tensors for ``save_state``:
    ``param.<name>`` and ``adam.<name>.<state key>`` (Adam/AdamW moments and step)."""
    out = {}
    for name, p in params.items():
        out[f"param.{name}"] = p
        for k, v in opt.state.get(p, {}).items():
            out[f"adam.{name}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def restore_training(opt: torch.optim.Optimizer, params: Mapping[str, torch.Tensor],
                     tensors: Mapping[str, torch.Tensor]) -> None:
    """The inverse of ``training_tensors``: parameters copied back in place, the optimizer's state loaded
    (``params`` in the optimizer's parameter order; torch moves the moments to each parameter's device)."""
    state = {}
    for i, (name, p) in enumerate(params.items()):
        with torch.no_grad():
            p.copy_(tensors[f"param.{name}"])
        prefix = f"adam.{name}."
        moments = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if moments:
            state[i] = moments
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def erase_inputs(method, pipe, concepts: Sequence[Concept | str], hparams: Mapping[str, Any] | None, ctx):
    """What every ``erase`` starts with: the checked concept names, the parsed Hparams and the context
    (by default on the pipeline's device)."""
    from . import EraseContext

    return (concept_names(method.name, concepts), method.hparams(hparams),
            ctx or EraseContext(device=str(pipe.unet.device)))


def train_resumable(trainer, total: int, step: Callable[[Any], float], *, path: Path | None, key: str,
                    save_every: int, desc: str, unit: str = "step", progress: bool = True,
                    postfix: Callable[[Any, float], str] | None = None) -> float:
    """Run ``step(trainer)`` until ``trainer.step_done == total`` behind a progress bar, first resuming from
    the training state at ``path`` (saved under ``key`` by ``trainer.save_state(path, key, seconds)``, read
    back by ``trainer.load_state(path, key)`` -> seconds or None), and saving it every ``save_every`` steps
    and at the end. Returns the training seconds, those of earlier interrupted runs included."""
    from tqdm.auto import tqdm

    before = (trainer.load_state(path, key) if path else None) or 0.0
    if trainer.step_done:
        log.info("%s: resuming at %s %d of %d", desc, unit, trainer.step_done, total)
    t0 = time.perf_counter()
    with tqdm(total=total, initial=trainer.step_done, desc=desc, unit=unit, disable=not progress,
              dynamic_ncols=True) as bar:
        while trainer.step_done < total:
            loss = step(trainer)
            bar.update(1)
            bar.set_postfix_str(postfix(trainer, loss) if postfix else f"loss {loss:.4g}")
            if path and (trainer.step_done % save_every == 0 or trainer.step_done == total):
                trainer.save_state(path, key, before + time.perf_counter() - t0)
    return before + time.perf_counter() - t0


def cosine_with_restarts(warmup: int, total: int, cycles: int):
    """LR factor of diffusers' ``cosine_with_restarts`` schedule (linear warm-up, hard restarts), as a
    function of the 0-based optimiser step."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))

    return factor


class TrainableCopy:
    """Train some parameters of ``module`` in place: each named one gets a fresh float32 copy of its data,
    while its original tensor (the frozen model, to diff against) is kept; every other parameter is frozen.
    ``close`` puts the original tensors, the grad flags and the gradient-checkpointing state back bit for bit."""

    def __init__(self, module: torch.nn.Module, names: Sequence[str], *, gradient_checkpointing: bool = False):
        params = dict(module.named_parameters())
        self.module, self.names = module, list(names)
        self.params = [params[n] for n in self.names]
        self.frozen = {n: p.data for n, p in zip(self.names, self.params)}
        self._flags = {n: p.requires_grad for n, p in params.items()}
        self._checkpointing = gradient_checkpointing and not getattr(module, "is_gradient_checkpointing", False)
        self._closed = False
        for p in params.values():
            p.requires_grad_(False)
        for p in self.params:
            p.data = p.data.detach().clone().float()
            p.requires_grad_(True)
        if self._checkpointing:
            module.enable_gradient_checkpointing()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        params = dict(self.module.named_parameters())
        for n, p in zip(self.names, self.params):
            p.grad = None
            p.data = self.frozen[n]
        for n, flag in self._flags.items():
            params[n].requires_grad_(flag)
        if self._checkpointing:
            self.module.disable_gradient_checkpointing()
