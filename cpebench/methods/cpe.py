"""CPE — Concept Pinpoint Eraser (Lee et al., ICLR 2025); sources, values and deviations: docs/methods/cpe.md.

A Residual Attention Gate (ResAG) adds a gated low-rank residual to the 32 cross-attention K/V
projections (``attn2.to_k`` / ``attn2.to_v``) of an SD-1.x UNet. Per concept c and token t:

    A_c = softmax((E Q_c)(E Q_c)^T)     Ẽ_c = A_c E      s_c,t = sigmoid(v_c · Ẽ_c,t)
    c*  = argmax_c s_c,t                 R_l(E)_t = s_c*,t Ẽ_c*,t U1_c*^(l) U2_c*^(l) · alpha/r
    K/V_l = W_l E_t + R_l(E)_t

The gate (Q, v) is shared by the 32 layers; U1/U2 are per layer. U2 starts at zero, so a fresh
ResAG changes nothing. Inference goes through ``cpebench.attention.kv_edit`` (the residual is
computed once per prompt batch, for the CFG negative embedding too).

Training never runs the UNet or the VAE: only text embeddings and the 32 projections. Two exact
implementations of the losses:

* ``loss: direct`` — the official formulas literally: K/V of every embedding through every layer.
* ``loss: gram`` (default) — the same numbers without materialising K/V. Each loss term is
  ``mean ||W_l y - R_l||²`` for a text-space vector y (0 for anchors), which expands into
  ``y^T (W_l^T W_l) y - 2 (U2_l W_l y)·h + h^T (U2_l U2_l^T) h`` with h = Ẽ U1_l of rank r: work in
  the 768-d text space plus rank-r projections instead of 32 projections of width up to 1280.
  ``tests/test_cpe.py`` checks the two agree.

Concepts are trained independently (each its own gate, as the official per-concept loop does) but
batched along a leading concept dimension; every concept has its own random stream, so its
weights do not depend on which other concepts share the batch.

Deviations from the official code (named in the artifact's hparams where they change numbers):
* ``optimizer: adamw`` (torch, fp32 states) by default; ``adamw8bit`` (bitsandbytes, the official
  choice) is available. With r = 1 only Q (768 x 16 >= 4096 elements) gets 8-bit states there.
* The official run ends with an adversarial stage whose perturbations are never used; we skip it
  (``final_adversarial_stage: false``) since it cannot change the ResAG.
* Random draws (template, anchors, noise, mixup, initial weights) come from one torch generator per
  concept, seeded from (seed, concept), instead of the global python/numpy/torch state.
* ``w_ks`` is never used by the official forward (its k branch reuses Q); we do not store it, and
  the official loader ignores it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..attention import KVEdit, kv_edit
from ..errors import ConfigError, DataError
from . import Artifact, Concept, EraseContext, Method, hparams_from_dict, read_safetensors
from .common import (TOKENS, base_kv_checksums, base_kv_sha256, check_base_kv, cosine_with_restarts, encode_texts,
                     erase_inputs, kv_layers, load_state, save_state, text_list)

log = logging.getLogger(__name__)

OFFICIAL_GATE_Q = "attention_gate.encoder_layer.slf_attn.attention_module1.w_qs.weight"
OFFICIAL_GATE_K = "attention_gate.encoder_layer.slf_attn.attention_module1.w_ks.weight"   # unused (k = q)
OFFICIAL_GATE_V = "attention_gate.encoder_layer.slf_attn.gate.scaler.weight"


# =========================================================================== layout


def official_key(layer: str) -> str:
    """'down_blocks.0....attn2.to_k' -> 'lora_unet_down_blocks_0_..._attn2_to_k' (the official name)."""
    return "lora_unet_" + layer.replace(".", "_")


_OFFICIAL_LAYER = re.compile(
    r"^lora_unet_(down_blocks|up_blocks|mid_block)_(?:(\d+)_)?attentions_(\d+)_transformer_blocks_(\d+)_attn2_(to_[kv])$")


def layer_from_official(key: str) -> str | None:
    m = _OFFICIAL_LAYER.match(key)
    if not m:
        return None
    block, index, att, tb, proj = m.groups()
    prefix = f"{block}.{index}" if index is not None else block
    return f"{prefix}.attentions.{att}.transformer_blocks.{tb}.attn2.{proj}"


def layer_weights(unet) -> dict[str, float]:
    """The official per-layer loss weights ("Lipschitz" factors), from spectral norms:
    to_k: sigma(W_o W_v) sigma(W_q) / 77;  to_v: sigma(W_o)."""
    out = {}
    for name, module in unet.named_modules():
        if not name.endswith("attn2") or not hasattr(module, "to_k"):
            continue
        w_o = module.to_out[0].weight.detach().double().cpu()
        w_v = module.to_v.weight.detach().double().cpu()
        w_q = module.to_q.weight.detach().double().cpu()
        sigma = lambda m: float(torch.linalg.matrix_norm(m, ord=2))
        out[f"{name}.to_k"] = sigma(w_o @ w_v) * sigma(w_q) / TOKENS
        out[f"{name}.to_v"] = sigma(w_o)
    return out


# =========================================================================== inference


class ResAG(KVEdit):
    """N concepts in one network: per token only the concept with the highest gate adds its residual.

    ``tensors`` are an artifact's (see ``artifact_tensors``). The gate and every layer's
    residual are computed once per context tensor (prompt batch) and reused at every step."""

    cacheable = True

    def __init__(self, tensors: Mapping[str, torch.Tensor], layers: Sequence[str], device=None):
        dev = device if device is not None else tensors["gate.q"].device
        f32 = {"device": dev, "dtype": torch.float32}
        self.layers = list(layers)
        self.q = tensors["gate.q"].to(**f32)                                   # [N, D, m]
        downs = [tensors[f"{name}.down"].to(**f32) for name in self.layers]   # [N, D, r] each
        self.rank = downs[0].shape[-1]
        # Ẽ·v and Ẽ·U1 = A (E v), A (E U1): project E first, mix the low-dimensional result.
        self.vu = torch.cat([tensors["gate.v"].to(**f32)] + downs, dim=-1)    # [N, D, 1 + L r]
        scale = tensors["scale"].to(**f32)
        self.up = {name: tensors[f"{name}.up"].to(**f32) * scale.view(-1, 1, 1) for name in self.layers}
        self.slot = {name: i for i, name in enumerate(self.layers)}
        self._key: tuple | None = None
        self._gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._context: torch.Tensor | None = None   # held so id() stays unique while cached
        self.computed = 0          # gate evaluations (one per prompt batch; tests check the reuse)

    @property
    def n_concepts(self) -> int:
        return self.q.shape[0]

    def gate(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H, c*, s*) for a context [B, T, D]: H [B, T, L*r] = s_c* Ẽ_c* U1_c* for every layer; the
        winning concept c* [B, T] and its gate value s* [B, T]."""
        key = (id(context), context._version)
        if self._key == key and self._gate is not None:
            return self._gate
        self.computed += 1
        e = context.to(torch.float32)
        p = torch.einsum("btd,ndm->bntm", e, self.q)
        attn = torch.softmax(p @ p.transpose(-1, -2), dim=-1)                  # [B, N, T, T]
        mixed = attn @ torch.einsum("btd,ndk->bntk", e, self.vu)               # [B, N, T, 1 + L r]
        s = torch.sigmoid(mixed[..., 0])                                       # [B, N, T]
        s_max, c_star = s.max(dim=1)                                           # [B, T]
        index = c_star[:, None, :, None].expand(-1, 1, -1, mixed.shape[-1] - 1)
        h = mixed[..., 1:].gather(1, index).squeeze(1) * s_max.unsqueeze(-1)  # [B, T, L r]
        self._key, self._gate = key, (h, c_star, s_max)
        self._context = context
        return h, c_star, s_max

    def residual(self, layer: str, context: torch.Tensor) -> torch.Tensor:
        h, c_star, _ = self.gate(context)
        i, r = self.slot[layer], self.rank
        h = h[..., i * r : (i + 1) * r]                                        # [B, T, r]
        up = self.up[layer]
        if up.shape[0] == 1:
            return h @ up[0]
        return torch.einsum("btr,btrd->btd", h, up[c_star])

    def edit(self, layer, context, key, value):
        k = key + self.residual(f"{layer}.to_k", context).to(key.dtype)
        v = value + self.residual(f"{layer}.to_v", context).to(value.dtype)
        return k, v


def merge_artifacts(artifacts: Sequence[Artifact]) -> Artifact:
    """N single- or multi-concept CPE artifacts -> one network with all concepts (exact: ranks are
    zero-padded, each concept keeps its own alpha/r)."""
    if not artifacts:
        raise ConfigError("merge_artifacts: no artifacts given")
    for a in artifacts:
        if a.method != CPE.name:
            raise ConfigError(f"cannot merge a {a.method!r} artifact into CPE")
    layers = sorted(artifacts[0].metadata["layers"])
    bases = {a.metadata.get("base_kv_sha256") for a in artifacts} - {None}
    for a in artifacts[1:]:
        if sorted(a.metadata["layers"]) != layers or len(bases) > 1:
            raise ConfigError("CPE artifacts have different layer layouts or base models; they cannot be merged")
    tensors: dict[str, torch.Tensor] = {}
    for key in artifacts[0].tensors:
        parts = [a.tensors[key] for a in artifacts]
        if key == "gate.q" or key.endswith(".down"):
            width = max(p.shape[-1] for p in parts)
            parts = [F.pad(p, (0, width - p.shape[-1])) for p in parts]
        elif key.endswith(".up"):
            width = max(p.shape[-2] for p in parts)
            parts = [F.pad(p, (0, 0, 0, width - p.shape[-2])) for p in parts]
        tensors[key] = torch.cat(parts, dim=0)
    meta = dict(artifacts[0].metadata)
    meta["concepts"] = [c for a in artifacts for c in a.metadata.get("concepts", [])]
    meta["merged_from"] = [a.sha256 for a in artifacts]
    return Artifact(method=CPE.name, tensors=tensors, metadata=meta)


# =========================================================================== official checkpoints


def load_official(path: str | Path) -> Artifact:
    """The authors' released per-concept checkpoints (``output/CPE_*/**/*_last.safetensors``; a file or
    a folder searched recursively, ``*adv_prompts*`` skipped) as one merged artifact."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*last.safetensors") if "adv_prompts" not in p.name)
    if not files:
        raise DataError(f"{path}: no official CPE checkpoint (*_last.safetensors) found")
    artifacts = []
    for f in files:
        tensors, meta = read_safetensors(f)
        missing = [k for k in (OFFICIAL_GATE_Q, OFFICIAL_GATE_V) if k not in tensors]
        layers: dict[str, str] = {}
        for k in tensors:
            base, _, leaf = k.rpartition(".lora_down")
            if leaf == ".weight" and base:
                name = layer_from_official(base)
                if name is None:
                    raise DataError(f"{f}: tensor {k!r} does not name an SD-1.x attn2.to_k/to_v layer")
                layers[name] = base
        if missing or not layers:
            raise DataError(f"{f}: not an official CPE checkpoint (missing {', '.join(missing) or 'lora_down tensors'})")
        ours: dict[str, torch.Tensor] = {
            "gate.q": tensors[OFFICIAL_GATE_Q].float(), "gate.v": tensors[OFFICIAL_GATE_V].float()}
        n = ours["gate.q"].shape[0]
        scales = set()
        for name, base in sorted(layers.items()):
            for leaf in (".lora_up.weight", ".alpha"):
                if base + leaf not in tensors:
                    raise DataError(f"{f}: {base}{leaf} missing")
            down, up = tensors[base + ".lora_down.weight"].float(), tensors[base + ".lora_up.weight"].float()
            if down.ndim != 3 or up.ndim != 3 or down.shape[0] != n or up.shape[:2] != (n, down.shape[-1]):
                raise DataError(f"{f}: {base}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} "
                                f"do not have the released shapes [n, D, r] / [n, r, d_out]")
            alpha = float(tensors[base + ".alpha"])
            r = down.shape[-1]
            scales.add((alpha if alpha else r) / r)   # the official layer: alpha 0/None means alpha = r
            ours[f"{name}.down"], ours[f"{name}.up"] = down, up
        if len(scales) != 1:
            raise DataError(f"{f}: layers disagree on alpha/rank ({sorted(scales)})")
        ours["scale"] = torch.full((n,), scales.pop())
        concepts = [c.strip() for c in meta.get("prompts", "").split(",") if c.strip()] or [f.parent.name.replace("_", " ")]
        if len(concepts) != n:
            concepts = [f"{f.parent.name}#{i}" for i in range(n)]
        artifacts.append(Artifact(method=CPE.name, tensors=ours, metadata={
            "concepts": concepts, "layers": sorted(layers), "source": "official checkpoint",
            "official_files": [str(f)], "official_metadata": meta}))
    merged = merge_artifacts(artifacts) if len(artifacts) > 1 else artifacts[0]
    merged.metadata["official_files"] = [str(f) for f in files]
    return merged


# =========================================================================== training data


def fill_template(template: str, word: str, replacement: str) -> str:
    """The official substitution: the replace word, then its lower-case form."""
    return template.replace(word, replacement).replace(word.lower(), replacement)


@dataclass
class TrainingData:
    """Text embeddings for a batch of C concepts (built once, as the official code does)."""

    targets: torch.Tensor        # [C, n_templates, 77, D]  templates with each target
    neutral: torch.Tensor        # [n_templates, 77, D]     templates with the neutral surrogate
    unconditional: torch.Tensor  # [77, D]                   the "" embedding (anchored too)
    anchors: torch.Tensor        # [U, 77, D]               unique anchor embeddings of all C concepts
    anchor_rows: torch.Tensor    # [C, n_max] rows of ``anchors`` each concept samples from (padded)
    anchor_counts: torch.Tensor  # [C]
    anchor_words: list           # per concept: the surrogate words chosen (recorded in the artifact)


def nearest_words(pipe, targets: Sequence[str], pool: Sequence[str], k: int, device) -> list[list[str]]:
    """Per target, the k pool entries closest by cosine similarity of the flattened 77xD bare-name
    embeddings; entries containing the target (case-insensitive) are excluded (official rule)."""
    if k <= 0:
        return [[] for _ in targets]
    pool = sorted(dict.fromkeys(pool))   # the official artist pool is a set(): fix an order
    pool_emb = F.normalize(encode_texts(pipe, pool, device).flatten(1), dim=1)
    target_emb = F.normalize(encode_texts(pipe, list(targets), device).flatten(1), dim=1)
    chosen = []
    for t, te in zip(targets, target_emb):
        allowed = torch.tensor([t.lower() not in p.lower() for p in pool], device=device)
        sim = (pool_emb @ te).masked_fill(~allowed, -math.inf)
        top = sim.topk(min(k, int(allowed.sum()))).indices.tolist()
        chosen.append([pool[i] for i in top])
    return chosen


def build_training_data(pipe, concepts: Sequence[str], hp: Hparams, device, data_dir=None,
                        progress: bool = False) -> TrainingData:
    word = hp.replace_word
    templates = text_list("cpe", hp.templates, "templates", data_dir, blanks=False)
    if not any(word in t or word.lower() in t for t in templates):
        raise DataError(f"hparams.templates: no template contains the replace word {word!r}")
    templates = templates + [word]   # the bare word too (official)
    targets = torch.stack([encode_texts(pipe, [fill_template(t, word, c) for t in templates], device)
                           for c in concepts])
    neutral = encode_texts(pipe, [fill_template(t, word, hp.neutral) for t in templates], device)
    unconditional = encode_texts(pipe, [""], device)[0]

    if hp.anchor_prompts is not None:       # explicit: the anchor sentences as they are, no templates
        prompts = text_list("cpe", hp.anchor_prompts, "anchor_prompts", data_dir, blanks=False)
        per_concept = [list(range(len(prompts)))] * len(concepts)
        words = [[] for _ in concepts]
    else:                                   # general words + nearest pool entries, x templates
        general = text_list("cpe", hp.anchor_words, "anchor_words", data_dir, blanks=False) if hp.anchor_words else []
        pool = text_list("cpe", hp.anchor_pool, "anchor_pool", data_dir, blanks=False) if hp.anchor_pool else []
        words = [general + near for near in nearest_words(pipe, concepts, pool, hp.anchor_nearest, device)]
        unique = list(dict.fromkeys(w for ws in words for w in ws))   # duplicates keep their weight below
        slot = {w: i for i, w in enumerate(unique)}
        n_t = len(templates)
        prompts = [fill_template(t, word, w) for w in unique for t in templates]
        per_concept = [[slot[w] * n_t + j for w in ws for j in range(n_t)] for ws in words]
    if not prompts or any(not rows for rows in per_concept):
        raise DataError("CPE: no anchor prompts (check hparams.anchor_words / anchor_pool / anchor_prompts)")
    anchors = encode_texts(pipe, prompts, device, progress=progress, desc="encode anchors")
    n_max = max(len(r) for r in per_concept)
    rows = torch.tensor([r + [0] * (n_max - len(r)) for r in per_concept], device=device)
    counts = torch.tensor([len(r) for r in per_concept], device=device)
    return TrainingData(targets, neutral, unconditional, anchors, rows, counts, words)


# =========================================================================== hyperparameters


@dataclass(frozen=True)
class Hparams:
    """benchmarks/methods/cpe.yaml gives every value and its source (also docs/methods/cpe.md)."""

    templates: Any = None                 # list, or {file, column}
    replace_word: str = "actor"
    neutral: str = "a person"
    anchor_words: Any = None              # general surrogate words ({file, column} or list)
    anchor_pool: Any = None               # pool searched for the nearest surrogates
    anchor_nearest: int = 50
    anchor_prompts: Any = None            # explicit: whole anchor sentences (no templates)
    rank: int = 1                         # r of U1/U2
    gate_rank: int = 16                   # m of Q
    alpha: float = 1.0
    guidance: float = 0.3                 # eta
    anchor_weight: float = 1.0e5          # lambda ("pal")
    adv_weight: float = 1.0
    anchor_batch: int = 32                # S
    anchor_noise: float = 0.001
    mixup: bool = True
    stages: int = 5
    iterations: int = 450
    lr: float = 3.0e-5
    warmup: int = 5
    lr_cycles: int = 1
    stage0_iterations_factor: int = 4
    stage0_lr_factor: float = 10.0
    stage0_cycles_factor: int = 2
    adv_prompts: int = 16                 # K
    adv_iterations: int = 450
    adv_lr: float = 0.01
    adv_warmup: int = 5
    adv_cycles: int = 1
    final_adversarial_stage: bool = False
    optimizer: str = "adamw"              # adamw | adamw8bit
    weight_decay: float = 0.01            # AdamW / AdamW8bit default
    loss: str = "gram"                    # gram | direct (same math; see module docstring)
    seed: int = 2024
    concept_batch: int = 0                # concepts trained at once; 0 = all that fit (operational)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Hparams:
        values = hparams_from_dict(cls, d, "cpe")
        hp = cls(**values)
        if hp.loss not in ("gram", "direct"):
            raise ConfigError(f"cpe: hparams.loss must be gram or direct, got {hp.loss!r}")
        if hp.optimizer not in ("adamw", "adamw8bit"):
            raise ConfigError(f"cpe: hparams.optimizer must be adamw or adamw8bit, got {hp.optimizer!r}")
        if hp.templates is None:
            raise ConfigError("cpe: hparams.templates is required (the task's method YAML sets it)")
        for name in ("rank", "gate_rank", "stages", "iterations", "anchor_batch", "adv_prompts"):
            if int(getattr(hp, name)) < 1:
                raise ConfigError(f"cpe: hparams.{name} must be >= 1")
        return hp

    def stage_schedule(self, stage: int) -> tuple[int, float, int]:
        """(iterations, lr, cosine cycles) of erase stage ``stage``: stage 0 is longer and hotter."""
        if stage == 0:
            return (self.iterations * self.stage0_iterations_factor, self.lr * self.stage0_lr_factor,
                    self.lr_cycles * self.stage0_cycles_factor)
        return self.iterations, self.lr, self.lr_cycles


# =========================================================================== training


def _kaiming_uniform(shape, fan_in: int, generator: torch.Generator, device) -> torch.Tensor:
    """torch's kaiming_uniform_(a=sqrt(5)) on a tensor whose fan-in is ``fan_in``: U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * bound


class KVSpace:
    """The frozen base projections, in a layer order grouped by output width (one batched op per group)."""

    def __init__(self, unet, device):
        layers = kv_layers(unet)
        weights = layer_weights(unet)
        order = sorted(range(len(layers)), key=lambda i: (layers[i][1].out_features, i))
        self.names = [layers[i][0] for i in order]                     # internal order
        self.official_order = [name for name, _ in layers]
        w = [layers[i][1].weight.detach().to(device, torch.float32) for i in order]
        self.text_dim = w[0].shape[1]
        self.widths = [x.shape[0] for x in w]
        # loss weight of one layer's mean squared error, with the official 1/32 over layers
        self.coef = torch.tensor([weights[n] / len(layers) for n in self.names], device=device)
        self.per_element = self.coef / torch.tensor(self.widths, device=device, dtype=torch.float32)   # coef / d_l
        self.groups: list[tuple[int, int]] = []                        # (start, end) in internal order
        for i, d in enumerate(self.widths):
            if not self.groups or self.widths[self.groups[-1][0]] != d:
                self.groups.append((i, i + 1))
            else:
                self.groups[-1] = (self.groups[-1][0], i + 1)
        self.w_groups = [torch.stack(w[a:b]) for a, b in self.groups]  # [L_g, d, D]
        # sum_l coef_l / d_l * W_l^T W_l: the quadratic form of every layer's ||W_l y||² at once
        self.gram = sum(self.per_element[i] * (w[i].T @ w[i]) for i in range(len(w)))

    @property
    def n_layers(self) -> int:
        return len(self.names)


class ConceptBatch(torch.nn.Module):
    """C independent single-concept ResAGs (leading dim C), as the official code trains them."""

    def __init__(self, space: KVSpace, hp: Hparams, generators: Sequence[torch.Generator], device):
        super().__init__()
        D, m, r, L = space.text_dim, hp.gate_rank, hp.rank, space.n_layers
        init = lambda shape, fan_in: torch.stack([_kaiming_uniform(shape, fan_in, g, device) for g in generators])
        self.q = torch.nn.Parameter(init((D, m), D * m) / D**2)                 # kaiming / 768²
        self.v = torch.nn.Parameter(torch.zeros(len(generators), D, 1, device=device))
        # U1 of all layers side by side [C, D, L r] (init per layer, fan-in D r, as the official layers)
        self.down = torch.nn.Parameter(torch.cat([init((D, r), D * r) for _ in range(L)], dim=-1))
        self.ups = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(len(generators), b - a, r, space.widths[a], device=device))
             for a, b in space.groups])
        self.scale = hp.alpha / r if hp.alpha else 1.0
        self.rank, self.n_layers = r, L

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x [C, n, T, D] -> scale * s * Ẽ U1 for every layer, [C, n, T, L, r] (each concept alone)."""
        p = torch.einsum("cntd,cdm->cntm", x, self.q)
        attn = torch.softmax(p @ p.transpose(-1, -2), dim=-1)
        mixed = attn @ torch.einsum("cntd,cdk->cntk", x, torch.cat([self.v, self.down], dim=-1))
        h = torch.sigmoid(mixed[..., :1]) * mixed[..., 1:] * self.scale
        return h.unflatten(-1, (self.n_layers, self.rank))

    def up_layers(self) -> list[torch.Tensor]:
        """U2 per layer (internal order), [C, r, d_l] each."""
        return [u[:, j] for u in self.ups for j in range(u.shape[1])]


# ---- losses. Both forms return per-concept values [C]; the total the optimiser sees is their sum.


def _gram_term(space: KVSpace, net: ConceptBatch, h: torch.Tensor, y: torch.Tensor | None,
               with_constant: bool) -> torch.Tensor:
    """sum_l coef_l mean_{n,t,d} (W_l y - R_l)² with R_l = h_l U2_l, in text space.
    h [C, n, T, L, r]; y [C, n, T, D] or None (y = 0). ``with_constant=False`` drops y^T G y, which
    has no gradient while y is fixed: only the reported value changes."""
    n_tok = h.shape[1] * h.shape[2]
    weight = space.per_element.view(1, -1, 1, 1)
    uu = torch.cat([torch.einsum("cgrd,cgsd->cgrs", u, u) for u in net.ups], dim=1) * weight  # [C, L, r, r]
    total = (torch.einsum("cntlr,clrs->cntls", h, uu) * h).sum(dim=(1, 2, 3, 4))
    if y is not None:
        m = torch.cat([torch.einsum("cgrd,gdk->cgrk", u, w) for u, w in zip(net.ups, space.w_groups)], dim=1)
        total = total - 2 * (torch.einsum("cntk,clrk->cntlr", y, m * weight) * h).sum(dim=(1, 2, 3, 4))
        if with_constant:
            total = total + torch.einsum("cntk,kj,cntj->c", y, space.gram, y)
    return total / n_tok


def erase_losses(space: KVSpace, net: ConceptBatch, e_t, e_n, delta, anchors, eta: float, mode: str,
                 with_constant: bool = True) -> dict[str, torch.Tensor]:
    """The erase stage's three terms per concept. e_t, e_n [C, T, D]; delta [C, K, T, D] or None;
    anchors [C, A, T, D] ("" first, then the mixed anchors)."""
    k = 0 if delta is None else delta.shape[1]
    x = torch.cat([e_t[:, None]] + ([] if delta is None else [e_t[:, None] + delta]) + [anchors], dim=1)
    h = net.hidden(x)
    zero = torch.zeros(x.shape[0], device=x.device)
    if mode == "gram":
        # P(e_n) - P~(e_t) + eta (P(e_n) - P(e_t)) = W y - R(e_t),  y = (1 + eta)(e_n - e_t)
        y = ((1 + eta) * (e_n - e_t))[:, None]
        out = {"erase": _gram_term(space, net, h[:, :1], y, with_constant),
               "adv": _gram_term(space, net, h[:, 1 : 1 + k], y - delta, with_constant) if k else zero,
               "anchor": _gram_term(space, net, h[:, 1 + k :], None, with_constant)}
        return out
    # direct: the official formulas, layer by layer, with K/V materialised
    out = {"erase": zero, "adv": zero, "anchor": zero}
    for i, up in enumerate(net.up_layers()):
        w = _layer_weight(space, i)
        base = x @ w.T                                            # P(x) for every input
        edited = base + torch.einsum("cntr,crd->cntd", h[..., i, :], up)
        p_n, p_t = e_n[:, None] @ w.T, base[:, :1]
        target = p_n + eta * (p_n - p_t)                          # P(e_n) + eta (P(e_n) - P(e_t))
        c = space.coef[i]
        out["erase"] = out["erase"] + c * ((target - edited[:, :1]) ** 2).mean(dim=(1, 2, 3))
        if k:
            out["adv"] = out["adv"] + c * ((target - edited[:, 1 : 1 + k]) ** 2).mean(dim=(1, 2, 3))
        out["anchor"] = out["anchor"] + c * ((base[:, 1 + k :] - edited[:, 1 + k :]) ** 2).mean(dim=(1, 2, 3))
    return out


def adversarial_loss(space: KVSpace, net: ConceptBatch, e_t, delta, mode: str) -> torch.Tensor:
    """sum_l w_l mean (P~(e_t + delta_j) - P(e_t))²: perturbations that rebuild the target's K/V
    through the erased layers. e_t [C, T, D]; delta [C, K, T, D]."""
    h = net.hidden(e_t[:, None] + delta)
    if mode == "gram":   # P~(e_t + delta) - P(e_t) = W delta + R  =  -(W y - R) with y = -delta
        return _gram_term(space, net, h, -delta, True)
    total = torch.zeros(e_t.shape[0], device=e_t.device)
    for i, up in enumerate(net.up_layers()):
        w = _layer_weight(space, i)
        edited = (e_t[:, None] + delta) @ w.T + torch.einsum("cntr,crd->cntd", h[..., i, :], up)
        total = total + space.coef[i] * ((edited - e_t[:, None] @ w.T) ** 2).mean(dim=(1, 2, 3))
    return total


def _layer_weight(space: KVSpace, i: int) -> torch.Tensor:
    for g, (a, b) in enumerate(space.groups):
        if a <= i < b:
            return space.w_groups[g][i - a]
    raise IndexError(i)


# ---- the stages


def concept_generator(seed: int, concept: str, device) -> torch.Generator:
    """One random stream per concept: a concept's weights do not depend on its batch-mates."""
    digest = hashlib.sha256(f"{seed}\0{concept}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return g


def _draw(gens, fn) -> torch.Tensor:
    return torch.stack([fn(g) for g in gens])


def _make_optimizer(params, lr: float, hp: Hparams):
    if hp.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ConfigError("cpe: hparams.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes)") from e
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=hp.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=hp.weight_decay)


def sample_anchors(data: TrainingData, u: torch.Tensor, lam: torch.Tensor, gens, hp: Hparams) -> torch.Tensor:
    """The official anchor batch: 2S cached anchors per concept, noise 0.001 ||emb|| N(0, 1), pairs mixed
    with lambda ~ Beta(1, 1) (= U(0, 1)). u [C, 2S] and lam [C, S] are uniform draws."""
    C = u.shape[0]
    pick = (u * data.anchor_counts[:, None]).long().clamp_max(data.anchor_counts[:, None] - 1)
    x = data.anchors[data.anchor_rows.gather(1, pick)]                          # [C, 2S, T, D]
    noise = _draw(gens, lambda g: torch.randn(x.shape[1:], generator=g, device=x.device))
    x = x + hp.anchor_noise * x.flatten(2).norm(dim=2)[..., None, None] * noise
    pairs = x.view(C, -1, 2, *x.shape[2:])
    if not hp.mixup:
        return pairs[:, :, 0]
    lam = lam[..., None, None]
    return lam * pairs[:, :, 0] + (1 - lam) * pairs[:, :, 1]


@dataclass
class GroupState:
    net: ConceptBatch
    delta: torch.Tensor | None
    stage_done: int            # -1 before the first stage
    log: dict                  # per stage: mean losses


def _targets(data: TrainingData, index: torch.Tensor):
    c = torch.arange(index.shape[0], device=index.device)
    return data.targets[c, index], data.neutral[index]


def erase_stage(space, data, state: GroupState, stage: int, hp: Hparams, gens, bar) -> dict:
    iters, lr, cycles = hp.stage_schedule(stage)
    net = state.net
    net.requires_grad_(True)
    opt = _make_optimizer(net.parameters(), lr, hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_restarts(hp.warmup, iters, cycles))
    dev, n_tmpl = data.targets.device, data.targets.shape[1]
    tmpl = _draw(gens, lambda g: torch.randint(n_tmpl, (iters,), generator=g, device=dev))
    u = _draw(gens, lambda g: torch.rand(iters, 2 * hp.anchor_batch, generator=g, device=dev))
    lam = _draw(gens, lambda g: torch.rand(iters, hp.anchor_batch, generator=g, device=dev))
    uncond = data.unconditional.expand(len(gens), 1, *data.unconditional.shape)
    first = last = {}
    for step in range(iters):
        e_t, e_n = _targets(data, tmpl[:, step])
        anchors = torch.cat([uncond, sample_anchors(data, u[:, step], lam[:, step], gens, hp)], dim=1)
        report = step % 25 == 0 or step == iters - 1
        terms = erase_losses(space, net, e_t, e_n, state.delta, anchors, hp.guidance, hp.loss, with_constant=report)
        loss = terms["erase"] + hp.adv_weight * terms["adv"] + hp.anchor_weight * terms["anchor"]
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        sched.step()
        bar.update(1)
        if report:
            last = {k: float(v.detach().mean()) for k, v in terms.items()}
            first = first or last
            bar.set_postfix_str(f"stage {stage + 1}/{hp.stages} erase  L_erase {last['erase']:.3g}  "
                                f"L_adv {last['adv']:.3g}  L_anchor {last['anchor']:.3g}")
    return {"first": first, "last": last}


def adversarial_stage(space, data, state: GroupState, stage: int, hp: Hparams, gens, bar) -> tuple[torch.Tensor, dict]:
    """ResAG frozen; learn K fresh perturbations of the target embedding (the next erase stage uses
    only these, as the official PromptTuningLayer does)."""
    net = state.net
    net.requires_grad_(False)
    dev, n_tmpl, T, D = data.targets.device, data.targets.shape[1], data.targets.shape[2], data.targets.shape[3]
    delta = torch.nn.Parameter(_draw(gens, lambda g: _kaiming_uniform((hp.adv_prompts, T, D), T * D, g, dev)) / D**2)
    opt = _make_optimizer([delta], hp.adv_lr, hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_restarts(hp.adv_warmup, hp.adv_iterations, hp.adv_cycles))
    tmpl = _draw(gens, lambda g: torch.randint(n_tmpl, (hp.adv_iterations,), generator=g, device=dev))
    first = last = None
    for step in range(hp.adv_iterations):
        e_t, _ = _targets(data, tmpl[:, step])
        loss = adversarial_loss(space, net, e_t, delta, hp.loss)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        sched.step()
        bar.update(1)
        if step == 0:
            first = float(loss.detach().mean())
        if step % 25 == 0 or step == hp.adv_iterations - 1:
            last = float(loss.detach().mean())
            bar.set_postfix_str(f"stage {stage + 1}/{hp.stages} adversarial  L_adv {last:.3g}")
    net.requires_grad_(True)
    return delta.detach(), {"adversarial": {"first": first, "last": last}}


def stage_steps(hp: Hparams, stage: int) -> int:
    adv = hp.adv_iterations if (stage < hp.stages - 1 or hp.final_adversarial_stage) else 0
    return hp.stage_schedule(stage)[0] + adv


# ---- resumable state (one file per concept group, rewritten after every stage)


def _save_state(path: Path, state: GroupState, gens, concepts, words) -> None:
    tensors = dict(state.net.state_dict())
    if state.delta is not None:
        tensors["delta"] = state.delta
    for i, g in enumerate(gens):
        tensors[f"rng.{i}"] = g.get_state()
    meta = {"stage_done": str(state.stage_done), "anchor_words": json.dumps(words), "log": json.dumps(state.log)}
    save_state(path, json.dumps(list(concepts)), tensors, meta)


def _load_state(path: Path, net: ConceptBatch, gens, concepts) -> tuple[GroupState, list] | None:
    saved = load_state(path, json.dumps(list(concepts)), "cpe")
    if saved is None:
        return None
    tensors, meta = saved
    device = net.q.device
    net.load_state_dict({k: tensors[k].to(device) for k in net.state_dict()})
    for i, g in enumerate(gens):
        g.set_state(tensors[f"rng.{i}"])
    delta = tensors["delta"].to(device) if "delta" in tensors else None
    state = GroupState(net, delta, int(meta["stage_done"]), json.loads(meta["log"]))
    return state, json.loads(meta["anchor_words"])


def auto_concept_batch(hp: Hparams, n_concepts: int, text_dim: int, kv_width: int, device) -> int:
    if hp.concept_batch > 0:
        return hp.concept_batch
    dev = torch.device(device)
    if dev.type != "cuda":
        return n_concepts
    free, _ = torch.cuda.mem_get_info(dev)
    n_in = 2 + hp.adv_prompts + hp.anchor_batch
    per_concept = 4 * TOKENS * (text_dim * (12 * n_in + 128) + (2 * n_in * kv_width if hp.loss == "direct" else 0))
    return max(1, min(n_concepts, int(0.5 * free // per_concept)))


def train(pipe, concepts: Sequence[str], hp: Hparams, ctx: EraseContext) -> tuple[dict, dict]:
    """Train every concept; returns (artifact tensors, metadata)."""
    from tqdm.auto import tqdm

    device = torch.device(ctx.device)
    started = time.perf_counter()
    space = KVSpace(pipe.unet, device)
    kv_width = sum(space.widths)
    size = auto_concept_batch(hp, len(concepts), space.text_dim, kv_width, device)
    groups = [list(concepts[i : i + size]) for i in range(0, len(concepts), size)]
    per_concept_steps = sum(stage_steps(hp, s) for s in range(hp.stages))
    nets, words, logs = [], [], []
    for gi, group in enumerate(groups):
        gens = [concept_generator(hp.seed, c, device) for c in group]
        net = ConceptBatch(space, hp, gens, device)
        path = Path(ctx.workdir) / f"group-{gi:03d}.safetensors" if ctx.workdir else None
        resumed = _load_state(path, net, gens, group) if path else None
        state, group_words = resumed if resumed else (GroupState(net, None, -1, {}), None)
        done = sum(stage_steps(hp, s) for s in range(state.stage_done + 1))
        desc = f"cpe: {len(group)} concept{'s' * (len(group) > 1)}" + (f" (group {gi + 1}/{len(groups)})" if len(groups) > 1 else "")
        if state.stage_done < hp.stages - 1:
            if resumed:
                log.info("cpe: resuming group %d after stage %d of %d", gi + 1, state.stage_done + 1, hp.stages)
            data = build_training_data(pipe, group, hp, device, ctx.data_dir, ctx.progress)
            group_words = data.anchor_words
            with tqdm(total=per_concept_steps, initial=done, desc=desc, unit="step", disable=not ctx.progress,
                      dynamic_ncols=True) as bar:
                for stage in range(state.stage_done + 1, hp.stages):
                    record = erase_stage(space, data, state, stage, hp, gens, bar)
                    if stage < hp.stages - 1 or hp.final_adversarial_stage:
                        state.delta, adv = adversarial_stage(space, data, state, stage, hp, gens, bar)
                        record.update(adv)
                    state.stage_done = stage
                    state.log[str(stage)] = record
                    if path:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        _save_state(path, state, gens, group, group_words)
            del data
        nets.append(state.net)
        words.extend(group_words or [[] for _ in group])
        logs.append(state.log)
    tensors = artifact_tensors(space, nets, hp)
    meta = {"layers": space.official_order, "rank": hp.rank, "gate_rank": hp.gate_rank, "text_dim": space.text_dim,
            "base_kv_sha256": base_kv_sha256(pipe.unet), "base_kv_checksums": base_kv_checksums(pipe.unet),
            "anchor_words": dict(zip(concepts, words)),
            "train": {"seconds": round(time.perf_counter() - started, 2), "steps_per_concept": per_concept_steps,
                      "concept_groups": [len(g) for g in groups], "device": str(device), "stages": logs}}
    return tensors, meta


def artifact_tensors(space: KVSpace, nets: Sequence[ConceptBatch], hp: Hparams) -> dict[str, torch.Tensor]:
    """Trained groups -> the artifact's tensors (leading dim = concept), official layer order."""
    r = hp.rank
    out = {"gate.q": torch.cat([n.q.detach() for n in nets]).cpu(),
           "gate.v": torch.cat([n.v.detach() for n in nets]).cpu()}
    out["scale"] = torch.full((out["gate.q"].shape[0],), float(nets[0].scale))
    ups = [n.up_layers() for n in nets]
    for i, name in enumerate(space.names):
        out[f"{name}.down"] = torch.cat([n.down.detach()[:, :, i * r : (i + 1) * r] for n in nets]).cpu().contiguous()
        out[f"{name}.up"] = torch.cat([u[i].detach() for u in ups]).cpu().contiguous()
    return out


# =========================================================================== the method


def check_layout(unet, artifact: Artifact) -> list[str]:
    """The artifact must name exactly this UNet's 32 K/V projections with matching shapes, and (when
    it records one) come from the same base weights."""
    layers = dict(kv_layers(unet))
    names = list(artifact.metadata.get("layers") or [])
    if sorted(names) != sorted(layers):
        extra, missing = sorted(set(names) - set(layers)), sorted(set(layers) - set(names))
        raise ConfigError(
            f"CPE artifact's layer layout does not match this UNet ({len(names)} vs {len(layers)} attn2.to_k/to_v "
            f"layers; e.g. artifact-only {extra[:2]}, model-only {missing[:2]}): it was made for another architecture")
    t = artifact.tensors
    for name, lin in layers.items():
        down, up = t.get(f"{name}.down"), t.get(f"{name}.up")
        if down is None or up is None:
            raise ConfigError(f"CPE artifact lacks the tensors of layer {name}")
        if down.shape[1] != lin.in_features or up.shape[2] != lin.out_features:
            raise ConfigError(
                f"CPE artifact layer {name}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the model's "
                f"{lin.in_features}->{lin.out_features} projection: it was made for another base model")
    check_base_kv(artifact, unet, "CPE")
    return names


class CPE(Method):
    name = "cpe"
    version = "1"
    description = "Concept Pinpoint Eraser (ICLR 2025): residual attention gates on the cross-attention K/V"
    trains = True
    operational_hparams = ("concept_batch",)
    hparams_class = Hparams

    def erase(self, pipe, concepts: Sequence[Concept], hparams: Mapping[str, Any], ctx: EraseContext | None = None) -> Artifact:
        names, hp, ctx = erase_inputs(self, pipe, concepts, hparams, ctx)
        tensors, meta = train(pipe, names, hp, ctx)
        return Artifact(method=self.name, tensors=tensors, metadata={"concepts": names, **meta})

    def apply(self, pipe, artifact: Artifact):
        layers = check_layout(pipe.unet, artifact)
        return kv_edit(pipe.unet, ResAG(artifact.tensors, layers, device=pipe.unet.device))

    def load_release(self, path: Path) -> Artifact:
        """The official release's checkpoint file(s)."""
        return load_official(path)
