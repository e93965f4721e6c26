"""SPM — concept Semi-Permeable Membrane (Lyu et al., "One-dimensional Adapter to Rule Them All", CVPR 2024).

Official code: Con6924/SPM@3dd762e (``src/models/spm.py``, ``train_spm.py``, ``src/configs/prompt.py``,
``src/engine/sampling.py``, ``evaluate_task.py``); sources, values and deviations: docs/methods/spm.md.

**The membrane.** A rank-r (r = 1) low-rank branch on each of the 192 ``Linear``/``Conv2d`` layers inside the
16 ``Transformer2DModel`` blocks of an SD-1.x UNet (proj_in/proj_out 1×1 convolutions, attn1/attn2
q/k/v/out, ff.net.0.proj, ff.net.2): y = W x + b + c · up(down(x)) with c = m^2 · alpha / r at inference and
alpha / r while training. down is kaiming-uniform (a = √5), up = 0: at init the membrane is the identity.
Here it is one forward hook per layer (``cpebench.attention.context_edit``) whose coefficient is per sample:
``Membranes.output`` adds Σ_k c[b, k] · up_k(down_k(x_b)) for all samples b and membranes k in two
einsums (no loop over samples), so prompts with different multipliers share a batch, and K concepts'
membranes train together in one batch.

**Training** (``train_spm.py``; per iteration, per membrane): pick one of its target prompts, k ~ U{1..29},
a resolution (H, W) from {256, 320, 384, 448}² (``dynamic_resolution``: 512 is never drawn); x_T ~ N(0, I);
with the membrane ON run k DDIM steps (30-step "leading" schedule, CFG 3 on ["", t]); query at
t_q = 999 − ⌊1000 k / 30⌋ (about one DDIM step noisier than x); membrane OFF: ε_p = ε(x, t_q, p = t),
ε_n = ε(x, t_q, n = ""); membrane ON: ε_t = ε'(x, t_q, t). Erase loss MSE(ε_t, ε_n − η (ε_p − ε_n)).
Latent anchoring: S = 4 Gaussian text embeddings a_j (unit-norm, kept with probability 1 − cos(a_j, t),
scaled to ‖t‖_F · U(0.8, 1.2)); L_LA = MSE(ε'(x, t_q, A), ε(x, t_q, A)); L = L_e + λ_LA L_LA (λ = 1000).
AdamW lr 1e-4, cosine with hard restarts (500 warm-up steps, 3 cycles), 3000 iterations.
Where CFG = 1 only the conditional half is computed; the OFF passes (p, n, anchors) form one batch and
the ON passes (t, anchors) another, with gradients.

**Inference: Facilitated Transport** (``evaluate_task.py``): per prompt q and membrane k,
m_k(q) = facilitate_factor · max over k's erased prompts e of max(clipcos(q, e), tokenuni(q, e)), clipcos
= cosine of the flattened 77×D embeddings, tokenuni = |tokens(q) ∩ tokens(e)| / |tokens(e)| without
special tokens; or m_k = multiplier · facilitate_factor for every prompt (``--spm_multiplier``). The prompt's
m applies to both its CFG rows. The official code multiplies both factors of every SPM by m and sums them
into ONE membrane: ΔW · m² for one SPM, cross terms up_i·down_j for several.

Deviations (named hyperparameters where they change numbers; docs/methods/spm.md):

* ``ft_combine: separate`` (default, the intended composition) applies Σ_k m_k² ΔW_k; ``summed`` is the
  official one-membrane sum (Σ m_k up_k)(Σ m_k down_k) with its cross terms. Identical for one membrane.
  ``ft_scaling: squared`` (default) keeps the official m² of one membrane (the paper's numbers, e.g.
  nudity "γ = 2" = ΔW × 4); ``linear`` applies m ΔW, the paper's formula.
* ``anchor_set: drawn`` (default, intended) anchors on the S drawn embeddings; ``official`` on the second
  half of the official list [u, a_1, u, a_2, …, u, a_S] (S = 4: {u, a_3, u, a_4}).
* AdamW in fp32 (the official AdamW8bit needs bitsandbytes and CUDA); every draw from one seeded CPU
  generator (the official loop is unseeded); losses on the device in fp32 (officially on the CPU).
* ``membranes: per_concept`` trains one SPM per concept (the zoo's form; composed by FT); ``shared`` one SPM
  on all concepts (one prompts entry each, as an official config with several entries).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F

from cpebench.attention import ContextBatch, ContextEdit, context_edit
from cpebench.errors import ConfigError, DataError
from cpebench.methods import (Artifact, Concept, EraseContext, Method, checksums_agree, read_safetensors,
                              weight_checksum)
from cpebench.methods.common import (CheckedHparams, check_at_least_one, check_choices, check_non_negative,
                                     concept_names, cosine_with_restarts, encode_texts, load_state, restore_training,
                                     save_state, text_list, training_tensors)

log = logging.getLogger(__name__)

PREFIX = "lora_unet"                 # kohya / SD-webui prefix of the official keys
STATE_FILE = "spm-state-{}.safetensors"
MATCHINGS = ("clipcos_tokenuni", "clipcos", "tokenuni", "allone")
BUCKET_STEP = 64                     # the official resolution buckets' step (train_util.get_random_resolution_in_bucket)
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
INFERENCE_FILE = "spm_inference.json"   # optional FT settings beside official .safetensors files
INFERENCE_KEYS = ("matching", "multiplier", "facilitate_factor", "ft_scaling", "ft_combine")


# =========================================================================== hyperparameters


@dataclass(frozen=True)
class Hparams(CheckedHparams):
    """benchmarks/methods/spm.yaml (per-task values and their sources are there)."""

    method_name: ClassVar[str] = "spm"

    # the membrane
    rank: int = 1
    alpha: float = 1.0
    membranes: str = "per_concept"      # per_concept: one SPM per concept | shared: one SPM on all concepts
    # training (configs/*/config.yaml, prompt.yaml)
    iterations: int = 3000
    lr: float = 1.0e-4
    weight_decay: float = 0.01          # bitsandbytes AdamW8bit's default
    lr_warmup_steps: int = 500
    lr_cycles: int = 3                  # cosine_with_restarts
    max_denoising_steps: int = 30
    start_guidance: float = 3.0         # CFG of the x_t sampling (hard-coded 3)
    guidance_scale: float = 1.0         # η of the erase target ε_n − η (ε_p − ε_n)
    neutral: Any = ""                   # n (the "surrogate"): one text, or one per concept
    la_strength: float = 1000.0         # λ_LA
    anchors: int = 4                    # S (sampling_batch_size)
    anchor_set: str = "drawn"           # drawn (intended) | official (second half of [u, a1, ..., u, aS])
    resolution: int | None = None       # None: the UNet's sample_size × VAE factor (512 for SD-1.x)
    dynamic_resolution: bool = True     # H, W drawn from {r/2, r/2+64, ..., r−64}
    seed: int = 0
    concepts_per_step: int = 1          # membranes trained together in one batch (per_concept)
    autocast: str = "none"              # none | bf16 | fp16: the x_t sampling only (the loss passes stay fp32)
    save_every: int = 500               # operational: resumable state every N steps
    # inference: Facilitated Transport
    matching: str = "clipcos_tokenuni"
    multiplier: float | None = None     # --spm_multiplier: a fixed m for every prompt (no matching)
    facilitate_factor: float = 1.0
    ft_scaling: str = "squared"         # squared (official: m² ΔW) | linear (m ΔW)
    ft_combine: str = "separate"        # separate (Σ m_k^p ΔW_k) | summed (official: one membrane, cross terms)

    def check(self, method: str) -> None:
        check_choices(method, self, {"membranes": ("per_concept", "shared"), "anchor_set": ("drawn", "official"),
                                     "autocast": tuple(AUTOCAST), "matching": MATCHINGS,
                                     "ft_scaling": ("squared", "linear"), "ft_combine": ("separate", "summed")})
        check_at_least_one(method, self, ("rank", "iterations", "anchors", "concepts_per_step", "save_every",
                                          "lr_cycles"))
        if self.max_denoising_steps < 2 or self.max_denoising_steps > 1000:
            raise ConfigError(f"{method}: hparams.max_denoising_steps must be in 2..1000, got {self.max_denoising_steps}")
        for key in ("lr", "alpha"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{method}: hparams.{key} must be > 0, got {getattr(self, key)}")
        check_non_negative(method, **{k: getattr(self, k) for k in ("weight_decay", "lr_warmup_steps", "la_strength",
                                                                    "facilitate_factor")})
        if self.resolution is not None and self.resolution < 8:
            raise ConfigError(f"spm: hparams.resolution must be >= 8 pixels, got {self.resolution}")
        if self.ft_scaling == "linear" and self.ft_combine == "summed":
            raise ConfigError("spm: hparams.ft_scaling 'linear' needs ft_combine 'separate' (the official sum scales "
                              "both factors by m, which is the squared effect)")

    def inference(self) -> dict:
        return {k: getattr(self, k) for k in INFERENCE_KEYS}


# =========================================================================== the 192 layers


@dataclass(frozen=True)
class Layer:
    path: str           # module path in the UNet
    key: str            # official key stem: lora_unet_<path with "." -> "_">
    conv: bool          # a 1×1 Conv2d (proj_in / proj_out); else Linear
    d_in: int
    d_out: int


def membrane_layers(unet) -> list[Layer]:
    """Every Linear / Conv2d inside every Transformer2DModel, in module order (SPMNetwork.create_modules):
    192 in SD-1.x (12 per transformer × 16)."""
    layers = []
    for name, block in unet.named_modules():
        if type(block).__name__ != "Transformer2DModel":
            continue
        for child_name, child in block.named_modules():
            if isinstance(child, torch.nn.Conv2d):
                if child.kernel_size != (1, 1) or child.stride != (1, 1) or child.padding != (0, 0) or child.groups != 1:
                    raise ConfigError(f"spm: {name}.{child_name} is not a 1x1 convolution; SPM supports SD-1.x UNets")
                dims = (child.in_channels, child.out_channels)
            elif isinstance(child, torch.nn.Linear):
                dims = (child.in_features, child.out_features)
            else:
                continue
            path = f"{name}.{child_name}"
            layers.append(Layer(path, f"{PREFIX}.{path}".replace(".", "_"), isinstance(child, torch.nn.Conv2d), *dims))
    if not layers:
        raise ConfigError("spm: the UNet has no Transformer2DModel blocks; SPM needs an SD-1.x UNet")
    return layers


def official_shapes(layer: Layer, rank: int) -> tuple[tuple, tuple]:
    """lora_down / lora_up weight shapes in the official file ((r, in, 1, 1) / (out, r, 1, 1) for convs)."""
    tail = (1, 1) if layer.conv else ()
    return (rank, layer.d_in, *tail), (layer.d_out, rank, *tail)


# =========================================================================== the membrane edit


def low_rank(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, coef: torch.Tensor, summed: bool) -> torch.Tensor:
    """Σ_k coef[n, k] · up_k(down_k(x_n)) for x [N, ..., in], down [K, r, in], up [K, out, r], coef [N, K].
    ``summed``: the official one-membrane composition (Σ_k coef up_k)(Σ_k coef down_k) x, cross terms included."""
    n, k = coef.shape
    lead = (n,) + (1,) * (x.ndim - 2)
    if summed:
        d = torch.einsum("nk,kri->nri", coef, down)
        u = torch.einsum("nk,kor->nor", coef, up)
        return torch.einsum("n...r,nor->n...o", torch.einsum("n...i,nri->n...r", x, d), u)
    if k == 1:
        return ((x @ down[0].t()) * coef[:, 0].view(*lead, 1)) @ up[0].t()
    h = torch.einsum("n...i,kri->n...kr", x, down) * coef.view(*lead, k, 1)
    return torch.einsum("n...kr,kor->n...o", h, up)


class Membranes(ContextEdit):
    """K membranes on the layers: ``output`` adds Σ_k coef[b, k] · up_k(down_k(x_b)). ``coef`` [rows, K] is
    set by the caller (training: alpha/r on the rows a membrane is ON, None = all OFF) or by ``prepare``
    (inference). ``down[i]`` [K, r, in], ``up[i]`` [K, out, r] for layer i (1×1 convs as linear maps)."""

    def __init__(self, layers: Sequence[Layer], down: Sequence[torch.Tensor], up: Sequence[torch.Tensor],
                 summed: bool = False, scale: float = 1.0):
        self.layers = list(layers)
        self.modules = tuple(layer.path for layer in layers)
        self.index = {layer.path: i for i, layer in enumerate(layers)}
        self.down, self.up = list(down), list(up)
        self.summed = summed
        self.scale = scale               # summed: the one network's alpha / r (official: the first SPM's)
        self.coef: torch.Tensor | None = None

    def output(self, name: str, module: torch.nn.Module, inputs: tuple, output):
        coef = self.coef
        if coef is None:
            return output
        x = inputs[0]
        if coef.shape[0] != x.shape[0]:
            raise RuntimeError(f"spm: {name} got {x.shape[0]} rows, the membranes were prepared for {coef.shape[0]} "
                               "(the UNet batch must match its text context's rows)")
        i = self.index[name]
        conv = self.layers[i].conv
        if conv:
            x = x.movedim(1, -1)
        down, up = self.down[i], self.up[i]     # inference: in the UNet's dtype; training: fp32 (autocast may cast)
        delta = low_rank(x, down, up, coef.to(down.dtype), self.summed)
        if self.summed:
            delta = delta * self.scale
        if conv:
            delta = delta.movedim(-1, 1)
        return output + delta.to(output.dtype)


# =========================================================================== Facilitated Transport


def token_sets(tokenizer, texts: Sequence[str], device) -> torch.Tensor:
    """Multi-hot [N, V] of each text's token ids (77-token padded and truncated as SD), special tokens removed."""
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    hot = torch.zeros(len(texts), len(tokenizer), dtype=torch.float32).scatter_(1, ids, 1.0)
    hot[:, list(set(tokenizer.all_special_ids))] = 0.0
    return hot.to(device)


def matching_scores(q_emb: torch.Tensor, e_emb: torch.Tensor, q_tok: torch.Tensor | None, e_tok: torch.Tensor,
                    matching: str) -> torch.Tensor:
    """[Q, E]: max of the chosen scores (evaluate_task.calculate_matching_score): clipcos = cosine of the
    flattened 77×D embeddings, tokenuni = |tokens(q) ∩ tokens(e)| / |tokens(e)|, allone = 1.
    ``q_tok`` None (no texts): tokenuni is left out."""
    q = q_emb.flatten(1).float()
    scores = []
    if "allone" in matching:
        scores.append(torch.ones(q.shape[0], e_emb.shape[0], device=q.device))
    if "clipcos" in matching:
        scores.append(F.normalize(q, dim=1) @ F.normalize(e_emb.flatten(1).float(), dim=1).t())
    if "tokenuni" in matching and q_tok is not None:
        scores.append((q_tok @ e_tok.t()) / e_tok.sum(1).clamp(min=1.0))
    if not scores:      # tokenuni alone without texts
        return torch.zeros(q.shape[0], e_emb.shape[0], device=q.device)
    return torch.stack(scores).amax(0)


class FacilitatedTransport(Membranes):
    """The membranes with per-prompt multipliers, computed in ``prepare`` for every prompt batch."""

    def __init__(self, layers, down, up, *, prompt_emb: torch.Tensor, prompt_tokens: torch.Tensor,
                 membership: torch.Tensor, scales: torch.Tensor, tokenizer, settings: Mapping[str, Any]):
        super().__init__(layers, down, up, summed=settings["ft_combine"] == "summed", scale=float(scales[0]))
        self.prompt_emb, self.prompt_tokens = prompt_emb, prompt_tokens     # [E, 77, D], [E, V]
        self.membership = membership.bool()                                  # [E, K]: prompt e belongs to SPM k
        self.scales = scales                                                 # [K]: alpha / r of each SPM
        self.tokenizer, self.settings = tokenizer, dict(settings)
        self.power = 2 if settings["ft_scaling"] == "squared" else 1
        self._warned = False
        self.last_multipliers: torch.Tensor | None = None                   # [rows, K], for inspection

    def multipliers(self, q_emb: torch.Tensor, texts: Sequence[str] | None) -> torch.Tensor:
        """m [Q, K] of the queries (embeddings [Q, 77, D], texts or None)."""
        s = self.settings
        k = self.membership.shape[1]
        if s["multiplier"] is not None:
            return torch.full((q_emb.shape[0], k), float(s["multiplier"]) * s["facilitate_factor"], device=q_emb.device)
        q_tok = token_sets(self.tokenizer, texts, q_emb.device) if texts is not None else None
        scores = matching_scores(q_emb, self.prompt_emb, q_tok, self.prompt_tokens, s["matching"])    # [Q, E]
        per_spm = scores.unsqueeze(2).masked_fill(~self.membership, -math.inf).amax(1)                # [Q, K]
        return per_spm * s["facilitate_factor"]

    def prepare(self, batch: ContextBatch) -> None:
        ctx = batch.context
        rows = ctx.shape[0]
        if batch.prompts is not None:
            b = len(batch.prompts)
            if b == 0 or rows % b:
                raise RuntimeError(f"spm: a context of {rows} rows for {b} prompts")
            # context rows = [negatives; prompts]: the prompt's m applies to both its CFG rows
            m = self.multipliers(ctx[rows - b:], batch.prompts).repeat(rows // b, 1)
        else:
            # The UNet called outside the engine (no texts announced): every row's m from its own embedding,
            # clipcos only (tokenuni needs the texts).
            if not self._warned and self.settings["multiplier"] is None and "tokenuni" in self.settings["matching"]:
                log.warning("spm: UNet called without announced prompts: Facilitated Transport uses each context "
                            "row's clipcos only (no tokenuni)")
                self._warned = True
            m = self.multipliers(ctx, None)
        self.last_multipliers = m
        self.coef = m if self.summed else self.scales.to(m.device) * m ** self.power


# =========================================================================== training


def official_anchor_rows(s: int) -> list[int]:
    """Which rows the official LA loss uses: ``sample`` returns [u, a_1, u, a_2, ..., u, a_S] (2S rows) and
    ``predict_noise`` keeps the second half; -1 = u, j = a_j (0-based). S = 4: [-1, 2, -1, 3]."""
    interleaved = [r for j in range(s) for r in (-1, j)]
    return interleaved[s:]


@dataclass
class Job:
    """One membrane: the prompt entries it is trained on (target = positive, its neutral)."""

    targets: list[str]
    neutrals: list[str]


class Trainer:
    """Trains the membranes of ``jobs`` together (one batch) on ``unet`` (frozen; hooks removed by ``close``)."""

    def __init__(self, unet, layers: Sequence[Layer], jobs: Sequence[Job], emb: Mapping[str, torch.Tensor],
                 hp: Hparams, abar: torch.Tensor, final_abar: float, latent_div: int, resolution: int):
        self.unet, self.layers, self.jobs, self.hp = unet, list(layers), list(jobs), hp
        self.device = next(unet.parameters()).device
        self.emb = {t: e.to(self.device, torch.float32) for t, e in emb.items()}    # text -> [77, D]
        self.abar, self.final_abar = abar.to(torch.float64), final_abar
        self.latent_div, self.resolution = latent_div, resolution
        self.generator = torch.Generator().manual_seed(hp.seed)
        g = len(jobs)
        # kaiming_uniform(a=√5) on [r, in]: U(−1/√in, 1/√in); up = 0 (identity at init)
        self.down = [torch.nn.Parameter(((torch.rand(g, hp.rank, l.d_in, generator=self.generator) * 2 - 1)
                                         / math.sqrt(l.d_in)).to(self.device)) for l in self.layers]
        self.up = [torch.nn.Parameter(torch.zeros(g, l.d_out, hp.rank, device=self.device)) for l in self.layers]
        self.edit = Membranes(self.layers, self.down, self.up)
        self.params = self.down + self.up
        self.opt = torch.optim.AdamW(self.params, lr=hp.lr, weight_decay=hp.weight_decay)
        self.losses_seen: list[list[float]] = []          # per step: [total, erase, anchoring] summed over jobs
        self.step_done = 0
        self.scale = hp.alpha / hp.rank
        self.grad_flags = {n: p.requires_grad for n, p in unet.named_parameters()}
        unet.requires_grad_(False)
        self._hooks = contextlib.ExitStack()
        self._hooks.enter_context(context_edit(unet, self.edit))
        self.uncond = self.emb[""]

    # ---- random draws (one CPU generator, fixed order)

    def draw(self) -> dict:
        g, gen, hp = len(self.jobs), self.generator, self.hp
        entry = [int(torch.randint(len(j.targets), (1,), generator=gen)) for j in self.jobs]
        k = torch.randint(1, hp.max_denoising_steps, (g,), generator=gen)
        if hp.dynamic_resolution:
            lo, hi = self.resolution // 2 // BUCKET_STEP, self.resolution // BUCKET_STEP
            h, w = (int(v) * BUCKET_STEP for v in torch.randint(lo, hi, (2,), generator=gen))
        else:
            h = w = self.resolution
        noise = torch.randn(g, self.unet.config.in_channels, h // self.latent_div, w // self.latent_div, generator=gen)
        targets = torch.stack([self.emb[j.targets[e]] for j, e in zip(self.jobs, entry)])
        neutrals = torch.stack([self.emb[j.neutrals[e]] for j, e in zip(self.jobs, entry)])
        return {"k": k, "noise": noise, "targets": targets, "neutrals": neutrals,
                "anchors": self.draw_anchors(targets.cpu())}

    def draw_anchors(self, targets: torch.Tensor) -> torch.Tensor:
        """[G, S, 77, D] (sampling.sample): unit-norm Gaussians kept with probability 1 − cos(a, t), scaled to
        ‖t‖_F · U(0.8, 1.2)."""
        g, s = targets.shape[0], self.hp.anchors
        flat_t = targets.flatten(1)
        out = torch.empty(g, s, flat_t.shape[1])
        todo = torch.ones(g, s, dtype=torch.bool)
        while todo.any():
            cand = torch.randn(g, s, flat_t.shape[1], generator=self.generator)
            cand = cand / cand.norm(dim=-1, keepdim=True)
            keep = torch.rand(g, s, generator=self.generator) < 1 - (cand * F.normalize(flat_t, dim=-1)[:, None]).sum(-1)
            take = todo & keep
            out[take] = cand[take]
            todo &= ~keep
        scale = torch.rand(g, s, generator=self.generator) * 0.4 + 0.8
        out = out * (scale * flat_t.norm(dim=-1, keepdim=True))[..., None]
        return out.view(g, s, *targets.shape[1:])

    # ---- UNet passes

    def _amp(self):
        dtype = AUTOCAST[self.hp.autocast]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _eps(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, on: torch.Tensor | None) -> torch.Tensor:
        """ε for rows (x, t, ctx); ``on`` [rows] = which membrane is ON per row (-1 or None: OFF)."""
        if on is None:
            self.edit.coef = None
        else:
            coef = torch.zeros(x.shape[0], len(self.jobs), device=self.device)
            rows = torch.nonzero(on >= 0).squeeze(1)
            coef[rows, on[rows].to(self.device)] = self.scale
            self.edit.coef = coef
        try:
            return self.unet(x, t.to(self.device), encoder_hidden_states=ctx, return_dict=False)[0].float()
        finally:
            self.edit.coef = None

    def ddim_timesteps(self) -> list[int]:
        """The official DDIMScheduler's 'leading' timesteps, steps_offset 0 (30 steps: 957, 924, ..., 0)."""
        ratio = 1000 // self.hp.max_denoising_steps
        return [j * ratio for j in range(self.hp.max_denoising_steps)][::-1]

    @torch.no_grad()
    def sample_xt(self, d: dict, targets: torch.Tensor) -> torch.Tensor:
        """k_g DDIM steps (η = 0) with membrane g ON at CFG ``start_guidance`` on ["", t_g]; a sample stops after
        its own k_g steps (the batch keeps only the samples still running). The only passes ``autocast`` speeds
        up: x_t is one input shared by both sides of every loss term, so its rounding never enters as a difference."""
        x = d["noise"].to(self.device)
        k = d["k"]
        ts = self.ddim_timesteps()
        ratio = 1000 // self.hp.max_denoising_steps
        with self._amp():
            for j in range(int(k.max())):
                active = torch.nonzero(k > j).squeeze(1)
                n = active.numel()
                xa = x[active]
                ctx = torch.cat([self.uncond.expand(n, -1, -1), targets[active]])
                on = torch.cat([active, active])
                e_u, e_c = self._eps(torch.cat([xa, xa]), torch.full((2 * n,), ts[j]), ctx, on).chunk(2)
                eps = e_u + self.hp.start_guidance * (e_c - e_u)
                a_t = float(self.abar[ts[j]])
                prev = ts[j] - ratio
                a_prev = float(self.abar[prev]) if prev >= 0 else self.final_abar
                x0 = (xa - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
                x[active] = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        return x

    def anchor_rows(self, anchors: torch.Tensor) -> torch.Tensor:
        """[G, S', 77, D]: the anchors the LA loss uses (``anchor_set``)."""
        if self.hp.anchor_set == "drawn":
            return anchors
        rows = official_anchor_rows(self.hp.anchors)
        u = self.uncond.expand(anchors.shape[0], -1, -1)
        return torch.stack([u if r < 0 else anchors[:, r] for r in rows], 1)

    def losses(self, d: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per membrane: the erase loss and the anchoring loss at x (each its own mean, as if trained alone)."""
        hp, g = self.hp, len(self.jobs)
        targets, neutrals = d["targets"], d["neutrals"]
        t_q = 999 - (d["k"] * 1000) // hp.max_denoising_steps       # timesteps_1000[int(k · 1000 / 30)]
        anchors = self.anchor_rows(d["anchors"].to(self.device))     # [G, S', 77, D]
        s = anchors.shape[1]
        member = torch.arange(g)
        # membrane OFF, no grad: [p_g | n_g | anchors_g] for all g (p = t). fp32 even with ``autocast``: each
        # loss compares an OFF prediction with an ON one, so both sides must share one precision (bf16 OFF vs fp32
        # ON: their rounding difference × λ_LA = 1000 outweighed the erase loss at the first step)
        with torch.no_grad():
            ctx = torch.cat([targets, neutrals, anchors.flatten(0, 1)])
            rows = torch.cat([member, member, member.repeat_interleave(s)])
            frozen = self._eps(x[rows], t_q[rows], ctx, None)
        e_p, e_n, a_off = frozen[:g], frozen[g:2 * g], frozen[2 * g:]
        # membrane g ON, with grad: [t_g | anchors_g]
        ctx = torch.cat([targets, anchors.flatten(0, 1)])
        rows = torch.cat([member, member.repeat_interleave(s)])
        live = self._eps(x[rows], t_q[rows], ctx, rows)
        e_t, a_on = live[:g], live[g:]
        erase = ((e_t - (e_n - hp.guidance_scale * (e_p - e_n))) ** 2).flatten(1).mean(1)
        anchoring = ((a_on - a_off) ** 2).view(g, -1).mean(1)
        return erase, anchoring

    def update(self, erase: torch.Tensor, anchoring: torch.Tensor) -> list[float]:
        """One AdamW step on Σ_g (L_e + λ_LA L_LA): the sum keeps the membranes' gradients apart."""
        hp = self.hp
        loss = (erase + hp.la_strength * anchoring).sum()
        for group in self.opt.param_groups:
            group["lr"] = hp.lr * cosine_with_restarts(hp.lr_warmup_steps, hp.iterations, hp.lr_cycles)(self.step_done)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step_done += 1
        out = [float(loss.detach()), float(erase.sum().detach()), float(anchoring.sum().detach())]
        self.losses_seen.append(out)
        return out

    def step(self) -> list[float]:
        d = self.draw()
        x = self.sample_xt(d, d["targets"])
        return self.update(*self.losses(d, x))

    # ---- results, state, restoration

    def membrane_tensors(self, j: int) -> dict[str, torch.Tensor]:
        """Job j's membrane in the official layout (keys without the per-SPM prefix), float32 on the CPU."""
        out = {}
        for layer, down, up in zip(self.layers, self.down, self.up):
            d_shape, u_shape = official_shapes(layer, self.hp.rank)
            out[f"{layer.key}.lora_down.weight"] = down[j].detach().cpu().clone().reshape(d_shape)
            out[f"{layer.key}.lora_up.weight"] = up[j].detach().cpu().clone().reshape(u_shape)
            out[f"{layer.key}.alpha"] = torch.tensor(float(self.hp.alpha))
        return out

    def save_state(self, path: Path, key: str, seconds: float) -> None:
        tensors = {**training_tensors(self.opt, {str(i): p for i, p in enumerate(self.params)}),
                   "rng": self.generator.get_state()}
        save_state(path, key, tensors, {"step": str(self.step_done), "losses": json.dumps(self.losses_seen),
                                        "seconds": str(seconds)})

    def load_state(self, path: Path | None, key: str) -> float | None:
        saved = load_state(path, key, "spm")
        if saved is None:
            return None
        tensors, meta = saved
        restore_training(self.opt, {str(i): p for i, p in enumerate(self.params)}, tensors)
        self.generator.set_state(tensors["rng"])
        self.step_done = int(meta["step"])
        self.losses_seen = json.loads(meta["losses"])
        return float(meta.get("seconds", 0.0))

    def close(self) -> None:
        self._hooks.close()
        for n, p in self.unet.named_parameters():
            p.requires_grad_(self.grad_flags[n])
        self.opt.state.clear()


def make_jobs(names: Sequence[str], neutrals: Sequence[str], membranes: str) -> list[Job]:
    if membranes == "shared":
        return [Job(list(names), list(neutrals))]
    return [Job([n], [u]) for n, u in zip(names, neutrals)]


def neutral_list(hp: Hparams, names: Sequence[str], data_dir) -> list[str]:
    texts = text_list("spm", hp.neutral, "neutral", data_dir)
    if len(texts) == 1:
        return texts * len(names)
    if len(texts) != len(names):
        raise ConfigError(f"spm: hparams.neutral has {len(texts)} texts for {len(names)} concepts (give one, or one per concept)")
    return texts


def noise_schedule(scheduler_config: Mapping) -> tuple[torch.Tensor, float]:
    """ᾱ of the official DDIMScheduler (the pipeline's betas; clip_sample False, set_alpha_to_one True)."""
    from diffusers import DDIMScheduler

    cfg = dict(scheduler_config)
    sched = DDIMScheduler(num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                          beta_start=float(cfg.get("beta_start", 0.00085)), beta_end=float(cfg.get("beta_end", 0.012)),
                          beta_schedule=cfg.get("beta_schedule", "scaled_linear"), clip_sample=False)
    if sched.alphas_cumprod.shape[0] != 1000:
        raise ConfigError("spm: the training schedule assumes 1000 diffusion timesteps (SD-1.x)")
    return sched.alphas_cumprod.clone(), float(sched.final_alpha_cumprod)


def train(pipe, names: Sequence[str], hp: Hparams, ctx: EraseContext) -> tuple[dict, dict]:
    """Train the membranes; returns (artifact tensors, metadata). ``pipe`` is left as it was."""
    from tqdm.auto import tqdm

    unet = pipe.unet
    if unet.dtype != torch.float32:          # the official loop trains in fp32: work on an fp32 copy
        unet = copy.deepcopy(unet).float()
    layers = membrane_layers(unet)
    latent_div = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = hp.resolution or unet.config.sample_size * latent_div
    if resolution % latent_div:
        raise ConfigError(f"spm: hparams.resolution must be a multiple of {latent_div}, got {resolution}")
    if hp.dynamic_resolution and resolution // 2 // BUCKET_STEP < 1:
        raise ConfigError(f"spm: hparams.dynamic_resolution draws sizes in steps of {BUCKET_STEP} from resolution/2 up to "
                          f"resolution (exclusive): resolution {resolution} is below {2 * BUCKET_STEP}; set dynamic_resolution: false")
    neutrals = neutral_list(hp, names, ctx.data_dir)
    jobs = make_jobs(names, neutrals, hp.membranes)
    texts = sorted({"", *names, *neutrals})
    emb = dict(zip(texts, encode_texts(pipe, texts, unet.device)))
    abar, final_abar = noise_schedule(pipe.scheduler.config)
    groups = [jobs[i : i + hp.concepts_per_step] for i in range(0, len(jobs), hp.concepts_per_step)]
    fingerprinted = {k: v for k, v in asdict(hp).items() if k != "save_every"}
    tensors, done, seconds_total = {}, [], 0.0
    total_steps = hp.iterations * len(groups)
    bar = tqdm(total=total_steps, desc=f"spm: {len(jobs)} membrane{'s' * (len(jobs) > 1)}", unit="step",
               disable=not ctx.progress, dynamic_ncols=True)
    with bar:
        for gi, group in enumerate(groups):
            key = json.dumps({"method": "spm", "jobs": [asdict(j) for j in group], "hparams": fingerprinted,
                              "layers": len(layers), "resolution": resolution}, sort_keys=True, default=str)
            path = Path(ctx.workdir) / STATE_FILE.format(gi) if ctx.workdir else None
            trainer = Trainer(unet, layers, group, emb, hp, abar, final_abar, latent_div, resolution)
            try:
                before = trainer.load_state(path, key) or 0.0
                bar.update(trainer.step_done)
                t0 = time.perf_counter()
                while trainer.step_done < hp.iterations:
                    loss = trainer.step()
                    bar.update(1)
                    bar.set_postfix_str(f"loss {loss[0]:.4g} (erase {loss[1]:.3g}, LA {loss[2]:.3g})")
                    if path and (trainer.step_done % hp.save_every == 0 or trainer.step_done == hp.iterations):
                        trainer.save_state(path, key, before + time.perf_counter() - t0)
                seconds_total += before + time.perf_counter() - t0
                first = len(done)
                for j, job in enumerate(group):
                    for k, v in trainer.membrane_tensors(j).items():
                        tensors[f"spm{first + j}.{k}"] = v
                    done.append(job)
                losses = trainer.losses_seen
            finally:
                trainer.close()
    membranes = [{"prompts": job.targets, "neutrals": job.neutrals, "rank": hp.rank, "alpha": hp.alpha} for job in done]
    curve = [[round(sum(r[c] for r in losses[i : i + 100]) / len(losses[i : i + 100]), 8) for c in range(3)]
             for i in range(0, len(losses), 100)]
    meta = {"membranes": membranes, "inference": hp.inference(), "layers": len(layers),
            "base_checksum": weight_checksum(p for layer in layers for p in unet.get_submodule(layer.path).parameters()),
            "train": {"seconds": round(seconds_total, 2), "iterations": hp.iterations, "groups": len(groups),
                      "resolution": resolution, "device": str(unet.device),
                      "loss_last_group_mean_per_100": curve}}
    return tensors, meta


# =========================================================================== artifacts and official files


def split_membranes(artifact: Artifact) -> list[dict[str, torch.Tensor]]:
    """The artifact's tensors per SPM (keys ``spm<i>.<official key>``), in index order."""
    out: dict[int, dict] = {}
    for k, v in artifact.tensors.items():
        head, _, rest = k.partition(".")
        if not head.startswith("spm") or not head[3:].isdigit() or not rest:
            raise DataError(f"spm artifact: unexpected tensor {k!r} (keys are spm<i>.lora_unet_...)")
        out.setdefault(int(head[3:]), {})[rest] = v
    if sorted(out) != list(range(len(out))) or len(out) != len(artifact.metadata.get("membranes", [])):
        raise DataError(f"spm artifact: tensors of SPMs {sorted(out)} do not match its {len(artifact.metadata.get('membranes', []))} "
                        "membranes in the metadata")
    return [out[i] for i in range(len(out))]


def stacked_factors(layers: Sequence[Layer], spms: Sequence[Mapping[str, torch.Tensor]], device, dtype,
                    source: str) -> tuple[list, list, torch.Tensor]:
    """Per layer down [K, r, in] and up [K, out, r] from official-layout SPMs, and alpha / r per SPM [K]."""
    rank = None
    for i, sd in enumerate(spms):
        expected = {f"{layer.key}.{s}" for layer in layers for s in ("lora_down.weight", "lora_up.weight", "alpha")}
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or extra:
            raise ConfigError(f"{source}: SPM {i} does not fit this UNet's {len(layers)} membrane layers "
                              f"({len(missing)} missing, e.g. {missing[:1]}; {len(extra)} unknown, e.g. {extra[:1]})")
        r = sd[f"{layers[0].key}.lora_down.weight"].shape[0]
        rank = r if rank is None else rank
        if r != rank:
            raise ConfigError(f"{source}: the SPMs have different ranks ({rank} and {r}); the official loader requires one rank")
    down, up = [], []
    for layer in layers:
        d_shape, u_shape = official_shapes(layer, rank)
        ds, us = [], []
        for i, sd in enumerate(spms):
            d, u = sd[f"{layer.key}.lora_down.weight"], sd[f"{layer.key}.lora_up.weight"]
            if tuple(d.shape) != d_shape or tuple(u.shape) != u_shape:
                raise ConfigError(f"{source}: SPM {i} {layer.key}: shapes {tuple(d.shape)}/{tuple(u.shape)}, this UNet "
                                  f"needs {d_shape}/{u_shape}: made for another base model")
            ds.append(d.reshape(rank, layer.d_in))
            us.append(u.reshape(layer.d_out, rank))
        down.append(torch.stack(ds).to(device=device, dtype=dtype))
        up.append(torch.stack(us).to(device=device, dtype=dtype))
    alphas = torch.tensor([float(sd[f"{layers[0].key}.alpha"]) for sd in spms])
    return down, up, alphas / rank


def read_official(path: Path) -> tuple[dict, dict]:
    tensors, meta = read_safetensors(path)
    if not tensors or not all(k.startswith(PREFIX + "_") for k in tensors):
        raise DataError(f"{path}: not an SPM file (its keys must start with {PREFIX}_)")
    if "prompts" not in meta:
        raise DataError(f"{path}: no 'prompts' metadata (the erased concepts Facilitated Transport matches against)")
    return tensors, meta


def load_official(path: Path) -> Artifact:
    """Released SPM weights: one ``.safetensors`` file, or a folder of them (several SPMs, composed by FT), with
    an optional ``spm_inference.json`` giving the FT settings (e.g. {"multiplier": 2} for the paper's nudity)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such SPM file or folder")
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .safetensors SPM files in the folder")
    settings = asdict(Hparams())
    settings = {k: settings[k] for k in INFERENCE_KEYS}
    if path.is_dir() and (path / INFERENCE_FILE).exists():
        try:
            given = json.loads((path / INFERENCE_FILE).read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataError(f"{path / INFERENCE_FILE}: not valid JSON ({e})") from None
        unknown = sorted(set(given) - set(INFERENCE_KEYS))
        if unknown:
            raise ConfigError(f"{path / INFERENCE_FILE}: unknown key(s) {', '.join(unknown)} (known: {', '.join(INFERENCE_KEYS)})")
        settings = Hparams.from_dict({**settings, **given}).inference()
    tensors, membranes = {}, []
    for i, f in enumerate(files):
        sd, meta = read_official(f)
        tensors.update({f"spm{i}.{k}": v.float().contiguous() for k, v in sd.items()})
        membranes.append({"prompts": meta["prompts"].split(","), "rank": meta.get("rank"), "alpha": meta.get("alpha"),
                          "official_file": f.name})
    concepts = [p for m in membranes for p in m["prompts"]]
    return Artifact(method="spm", tensors=tensors, metadata={
        "concepts": concepts, "membranes": membranes, "inference": settings, "source": "official checkpoint",
        "official_path": str(path)})


def to_official(artifact: Artifact, index: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """SPM ``index`` of an artifact as the official file's (tensors, metadata): save it with safetensors'
    ``save_file`` to use it with the official scripts or ``load_lora_weights``."""
    m = artifact.metadata["membranes"][index]
    return split_membranes(artifact)[index], {"prompts": ",".join(m["prompts"]), "rank": str(m["rank"]),
                                              "alpha": str(m["alpha"])}


# =========================================================================== the method


class SPM(Method):
    name = "spm"
    version = "2"    # 2: autocast covers the x_t sampling only (version 1 also ran the membrane-off targets in it)
    description = ("concept Semi-Permeable Membrane (CVPR 2024): a rank-1 adapter on the 192 linear layers of the "
                   "UNet's transformers, trained with latent anchoring, applied per prompt by Facilitated Transport; "
                   "defaults = Con6924/SPM@3dd762e: 3000 it, lr 1e-4, LA 1000, 4 anchors, one SPM per concept")
    trains = True
    operational_hparams = ("save_every",)
    hparams_class = Hparams

    def erase(self, pipe, concepts: Sequence[Concept], hparams: Mapping[str, Any],
              ctx: EraseContext | None = None) -> Artifact:
        names = concept_names(self.name, concepts)
        for n in names:
            if "," in n:
                raise ConfigError(f"spm: concept {n!r} contains a comma; the official 'prompts' metadata is comma-joined")
        hp = self.hparams(hparams)
        ctx = ctx or EraseContext(device=str(pipe.unet.device))
        tensors, meta = train(pipe, names, hp, ctx)
        return Artifact(method=self.name, tensors=tensors, metadata={"concepts": names, **meta})

    def edit_for(self, pipe, artifact: Artifact) -> FacilitatedTransport:
        """The Facilitated-Transport edit of ``artifact`` for ``pipe`` (what ``apply`` installs)."""
        unet = pipe.unet
        layers = membrane_layers(unet)
        recorded = artifact.metadata.get("base_checksum")
        if recorded and not checksums_agree(recorded, weight_checksum(
                p for layer in layers for p in unet.get_submodule(layer.path).parameters())):
            raise ConfigError(f"spm artifact was trained on base model {artifact.metadata.get('base_model', '?')!r}, whose "
                              "weights differ from the loaded model's; train it again on this model")
        settings = {**Hparams().inference(), **artifact.metadata.get("inference", {})}
        membranes = artifact.metadata.get("membranes") or []
        device, dtype = unet.device, unet.dtype
        down, up, scales = stacked_factors(layers, split_membranes(artifact), device, dtype, "spm artifact")
        prompts = [p for m in membranes for p in m["prompts"]]
        membership = torch.zeros(len(prompts), len(membranes), dtype=torch.bool, device=device)
        row = 0
        for k, m in enumerate(membranes):
            membership[row : row + len(m["prompts"]), k] = True
            row += len(m["prompts"])
        prompt_emb = encode_texts(pipe, prompts, device)
        return FacilitatedTransport(layers, down, up, prompt_emb=prompt_emb,
                                    prompt_tokens=token_sets(pipe.tokenizer, prompts, device),
                                    membership=membership, scales=scales.to(device), tokenizer=pipe.tokenizer,
                                    settings=settings)

    def apply(self, pipe, artifact: Artifact):
        return context_edit(pipe.unet, self.edit_for(pipe, artifact))

    def load_release(self, path: Path) -> Artifact:
        """Released SPM weights (``load_official``)."""
        return load_official(path)
