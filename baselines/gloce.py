"""GLoCE — Localized Concept Erasure with Training-Free Gated Low-Rank Adaptation (Lee et al., CVPR 2025).

Sources, per-task values and deviations: docs/methods/gloce.md. Official code Hyun1A/GLoCE@95e48ef
(``update/update_gloce.py``, ``src/models/gloce.py``, ``src/engine/gloce_util.py``,
``src/engine/gloce_register_buffer.py``, ``shell_scripts/*``). No gradient steps: a few partial
generations of the frozen model give feature statistics at the outputs y ∈ R^D of the 16 cross-attention
``attn2.to_out.0`` Linear layers, and per concept n and layer a gated low-rank module is built from them.

Inference, per token y (every spatial token of both CFG halves), from the (st_step+1)-th UNet call on:

    score_n = Σ_j (v_{g,n,j}ᵀ (y − μ_{g,n}))² / ‖y − μ_{g,n}‖²         (cos² to the gate direction for g = 1)
    s_n = σ(k_n (score_n − c_n));   n* = argmax_n s_n,  s = s_{n*}     (one concept per token)
    out = (1 − s) y + s η (μ_{s,n*} + V_{s,n*} V_{s,n*}ᵀ (I − V_{t,n*} V_{t,n*}ᵀ)(y − μ_{t,n*}))

Construction (statistics from the unedited model; LMS, 50 steps, CFG 7.5, uncond "", one latent per seed
shared by every prompt; UNet calls st_step < t ≤ end_step; the conditional half only):

* prompts: the target, the surrogate (celebrities: the n_anchors pool names LEAST similar to the target;
  otherwise the neutral text), the gate ("update") concept, and the n_anchors pool names MOST similar to
  the target, all in ``template``; similarity = mean cosine of the CLIP rows 1..n_tokens;
* sums over the full-resolution tokens plus 2×2 average-pooled copies (``pool_levels``): μ and
  Σ = E[yyᵀ] − μμᵀ of the surrogate (V_s = top degen_rank directions), of the target (V_t = top
  update_rank), the gate concept's mean μ_g, and V_g = top gate_rank directions of Σ_t + (μ_t−μ_g)(μ_t−μ_g)ᵀ;
* the gate's centre and slope from the maximum score over the full-resolution tokens of every anchor
  generation step: c = mean + θ·std; k = ln 99 / (0.001 θ) (``calibration: current``, HEAD) or
  ln 99 / (0.1 θ std) (``initial``, the first release).

cpebench runs the generations of every concept together in batches (each prompt once, per-prompt sums
shared by every concept that uses it), and the inference gate for all concepts in one pass per layer
(no loop over tokens or concepts). Artifact tensors use the official state-dict names and the shapes of
the official multi-concept network (``GLoCENetworkOutProp(n_concepts=N)``), so official checkpoints load
(``load_artifact``).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cpebench.attention import ContextBatch, ContextEdit, context_edit
from cpebench.errors import ConfigError, DataError
from cpebench.methods import Artifact, Concept, EraseContext, Method, read_safetensors
from cpebench.methods.common import (CheckedHparams, base_kv_checksums, base_kv_sha256, check_at_least_one,
                                     check_base_kv, check_choices, check_non_negative, encode_texts, erase_inputs,
                                     text_list)

log = logging.getLogger(__name__)

LAYER_SUFFIX = "attn2.to_out.0"      # --find_module_name unet_ca_out
PREFIX = "lora_gloce"                # GLoCENetworkOutProp.GLoCE_PREFIX
LOGIT_99 = math.log(0.99 / 0.01)     # σ⁻¹(0.99): the official c_right
OFFICIAL_N_STEP = 51                 # the official per-layer counter wraps here (PNDM-50's UNet calls)
CHOICES = {"surrogate": ("least_similar", "neutral"), "calibration": ("current", "initial"),
           "counter": ("per_batch", "official"), "stats_rng": ("cpu", "cuda")}
# What one concept's module holds: official state-dict suffix -> shape of the N-concept network's tensor
# as a function of (N, D, r_d, g) (G:src/models/gloce.py; the update code saves the N = 1 case).
TENSORS = {
    "lora_degen.weight": lambda n, d, r, g: (n, d, r),
    "lora_update.weight": lambda n, d, r, g: (n, d, r),
    "bias.weight": lambda n, d, r, g: (1, n, d),
    "debias.weight": lambda n, d, r, g: (1, n, d),
    "selector.select_weight.weight": lambda n, d, r, g: (n, d, g),
    "selector.select_mean_diff.weight": lambda n, d, r, g: (n, d),
    "selector.imp_center": lambda n, d, r, g: (n,),
    "selector.imp_slope": lambda n, d, r, g: (n,),
}


# =========================================================================== hyperparameters


@dataclass(frozen=True)
class Hparams(CheckedHparams):
    """benchmarks/methods/gloce.yaml (per-task values and their sources are there). Defaults: the
    celebrity configuration of HEAD (shell_scripts/celebs/update_gloce.sh, generate_by_gloce.sh)."""

    method_name: ClassVar[str] = "gloce"

    template: str = "A face of {}"        # '{}' = the concept; celebrity "A face of", artist "An image in the style of", explicit "{}"
    anchor_pool: Any = ()                 # candidate anchors (and celebrity surrogates): a list or {file, column}
    anchor_exclude: Any = ()              # pool names dropped (case-insensitive), e.g. to match the official list
    anchor_unique: bool = False           # drop repeated pool names (the official lists keep celebrity repeats)
    n_anchors: int = 3                    # --n_anchor_concepts
    surrogate: str = "least_similar"      # least_similar (celebrities) | neutral (the `neutral` text)
    neutral: str = ""                     # surrogate text for surrogate: neutral ("real photograph", ...)
    gate_concept: str = "a celebrity"     # the "update" concept in the template (prompt_train_gloce_update.yaml)
    n_tokens: int = 8                     # --n_tokens: CLIP rows 1..n_tokens compared for similarity
    update_rank: int = 16                 # r_u: target directions projected out
    degen_rank: int = 2                   # r_d: surrogate directions kept
    gate_rank: int = 1                    # g
    thresh: float = 2.5                   # θ (--thresh)
    calibration: str = "current"          # current (HEAD 5eefa20: k = ln99/(0.001θ)) | initial (458b1c6: ln99/(0.1θ·std))
    eta: float = 1.0                      # η (generate --eta)
    st_step: int = 10                     # --st_timestep: statistics calls > st_step; inference from call st_step+1
    end_step: int = 20                    # --end_timestep: statistics calls <= end_step
    gate_st_step: int | None = None              # inference from UNet call gate_st_step+1; None = st_step (both official scripts)
    n_seeds: int = 3                      # --n_generation_per_concept (seeds 0..n-1)
    stats_steps: int = 50                 # LMS steps of the statistics generations (embedding2img ddim_steps)
    stats_guidance: float = 7.5
    resolution: int | None = None                # statistics image size; None = the model's own (SD-1.x: 512)
    pool_levels: int = 4                  # avg_depth: full resolution + 3 successive 2x2 average pools
    stats_rng: str = "cpu"                # cpu: CPU generator per seed | cuda: a CUDA generator per seed (the official latents)
    counter: str = "per_batch"            # per_batch: call count restarts with each prompt batch | official: wraps at 51
    batch_size: int = 8                   # statistics generations per UNet batch (operational)
    diagnostics: bool = False             # also score the targets (the official printout) into the metadata (operational)

    def check(self, method: str) -> None:
        check_choices(method, self, CHOICES)
        check_at_least_one(method, self, ("n_anchors", "n_tokens", "update_rank", "degen_rank", "gate_rank",
                                          "n_seeds", "stats_steps", "pool_levels", "batch_size"))
        check_non_negative(method, st_step=self.st_step, eta=self.eta, stats_guidance=self.stats_guidance)
        if self.thresh <= 0:
            raise ConfigError(f"{method}: hparams.thresh must be > 0 (θ sets the gate's slope), got {self.thresh}")
        if self.n_tokens > 76:
            raise ConfigError(f"{method}: hparams.n_tokens must be <= 76 (CLIP rows after BOS), got {self.n_tokens}")
        if not self.window:
            raise ConfigError(f"{method}: hparams.st_step={self.st_step}, end_step={self.end_step}, stats_steps="
                              f"{self.stats_steps} leave no statistics step (calls st_step < t <= end_step, t < stats_steps)")
        if self.n_anchors * self.n_seeds * len(self.window) < 2:
            raise ConfigError(f"{method}: the gate's centre is mean + thresh·std of the anchor maxima, one per anchor, "
                              f"seed and statistics call: n_anchors × n_seeds × calls = {self.n_anchors} × {self.n_seeds} "
                              f"× {len(self.window)} gives fewer than 2 (std undefined, the gate would be NaN)")
        if "{}" not in self.template:
            raise ConfigError(f"{method}: hparams.template must contain '{{}}' (the concept's place), got {self.template!r}")
        if self.gate_st_step is not None and self.gate_st_step < 0:
            raise ConfigError(f"{method}: hparams.gate_st_step must be null or >= 0, got {self.gate_st_step}")
        if self.resolution is not None and self.resolution < 1:
            raise ConfigError(f"{method}: hparams.resolution must be null or >= 1, got {self.resolution}")

    @property
    def window(self) -> range:
        """UNet calls (0-based) whose outputs are recorded: st_step < t <= end_step, t < stats_steps."""
        return range(self.st_step + 1, min(self.end_step, self.stats_steps - 1) + 1)


# =========================================================================== prompts


def fill(template: str, text: str) -> str:
    return template.replace("{}", text)


@dataclass
class ConceptPrompts:
    """One concept's statistics prompts (names are pool entries; prompts are the filled template)."""

    name: str
    target: str
    gate: str
    anchors: list[str]
    surrogates: list[str]
    anchor_names: list[str] = field(default_factory=list)
    surrogate_names: list[str] = field(default_factory=list)


def anchor_pool(hp: Hparams, data_dir) -> list[str]:
    pool = [t for t in text_list("gloce", hp.anchor_pool, "anchor_pool", data_dir) if t]
    drop = {t.lower() for t in text_list("gloce", hp.anchor_exclude, "anchor_exclude", data_dir)}
    pool = [t for t in pool if t.lower() not in drop]
    return list(dict.fromkeys(pool)) if hp.anchor_unique else pool


@torch.no_grad()
def select_prompts(pipe, names: Sequence[str], hp: Hparams, pool: Sequence[str], device) -> list[ConceptPrompts]:
    """Anchors = the n_anchors pool names most similar to each target, surrogates (least_similar) = the
    n_anchors least similar, as ``prepare_text_embedding_token``: the pool minus names containing the
    target (case-insensitive), similarity = mean over CLIP rows 1..n_tokens of the per-row cosine of the
    templated texts. Ties keep pool order (stable sort)."""
    rows = slice(1, 1 + hp.n_tokens)

    def unit(texts):
        e = encode_texts(pipe, [fill(hp.template, t) for t in texts], device)[:, rows]
        return e / e.norm(dim=-1, keepdim=True)

    targets, cands = unit(names), unit(pool)
    sim = torch.einsum("njk,pjk->np", targets, cands) / targets.shape[1]      # [N, P]
    out = []
    for n, name in enumerate(names):
        keep = torch.tensor([name.lower() not in c.lower() for c in pool], dtype=torch.bool)
        idx = torch.nonzero(keep).flatten()
        if len(idx) == 0:
            raise ConfigError(f"gloce: hparams.anchor_pool has no name other than {name!r}: the gate is calibrated "
                              "on anchors (and celebrity surrogates are taken from the pool)")
        order = idx[torch.argsort(sim[n, idx].cpu(), stable=True)].tolist()
        anchors = [pool[i] for i in order[-hp.n_anchors:]]
        if hp.surrogate == "least_similar":
            surrogates = [pool[i] for i in order[: hp.n_anchors]]
            surrogate_prompts = [fill(hp.template, t) for t in surrogates]
        else:
            surrogates, surrogate_prompts = [hp.neutral], [fill(hp.template, hp.neutral)]
        out.append(ConceptPrompts(name, fill(hp.template, name), fill(hp.template, hp.gate_concept),
                                  [fill(hp.template, t) for t in anchors], surrogate_prompts, anchors, surrogates))
    return out


# =========================================================================== statistics generations


def out_layers(unet) -> list[str]:
    names = [n for n, m in unet.named_modules() if n.endswith(LAYER_SUFFIX) and isinstance(m, torch.nn.Linear)]
    if not names:
        raise ConfigError("gloce: the UNet has no attn2.to_out.0 Linear layers; GLoCE needs an SD-1.x UNet")
    return names


def official_key(layer: str) -> str:
    """'down_blocks.0....attn2.to_out.0' -> 'lora_gloce_down_blocks_0_..._attn2_to_out_0' (gloce.py:225)."""
    return f"{PREFIX}_{layer.replace('.', '_')}"


def pooled_tokens(x: torch.Tensor, levels: int) -> torch.Tensor:
    """[B, T, D] tokens of a square map -> [B, T + T/4 + ..., D]: the map and its successive 2x2 average
    pools (register_sum_buffer_avg_spatial, avg_depth = levels). Pooling stops at a 1x1 map (only models
    smaller than SD-1.x at 512² reach it)."""
    b, t, d = x.shape
    side = math.isqrt(t)
    if side * side != t:
        raise ConfigError(f"gloce: statistics need square feature maps, got {t} tokens")
    maps = x.transpose(1, 2).reshape(b, d, side, side)
    parts = [x]
    for _ in range(levels - 1):
        if maps.shape[-1] < 2:
            break
        maps = F.avg_pool2d(maps, kernel_size=2, stride=2)
        parts.append(maps.reshape(b, d, -1).transpose(1, 2))
    return torch.cat(parts, dim=1)


def gate_scores(y: torch.Tensor, v: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """score[m, n] = Σ_j (v[n,:,j]ᵀ (y_m − mu_n))² / ‖y_m − mu_n‖² for y [M, D], v [N, D, g], mu [N, D], without
    materialising [M, N, D]: everything is taken relative to mu_0, so concepts sharing the gate concept's
    mean (every official configuration) give the plain difference y − mu_n, as the official selector."""
    centre = mu[:1]
    yc = y - centre                                                      # [M, D]
    dmu = mu - centre                                                    # [N, D]; rows 0 when mu_n = mu_0
    n, d, g = v.shape
    proj = (yc @ v.permute(1, 0, 2).reshape(d, n * g)).view(-1, n, g)
    proj = proj - torch.einsum("nd,ndg->ng", dmu, v)
    sq = (yc * yc).sum(-1, keepdim=True) - 2 * yc @ dmu.T + (dmu * dmu).sum(-1)
    return (proj * proj).sum(-1) / sq


class Recorder:
    """Forward hooks on the to_out.0 layers that hand the conditional half of each output to
    ``sink.consume(name, y, position)`` while ``position`` (the call's index in the statistics window)
    is set; removed on exit."""

    def __init__(self, unet, layers: Sequence[str], sink):
        self.position: int | None = None
        modules = dict(unet.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name, sink)) for name in layers]

    def _hook(self, name, sink):
        def hook(module, inputs, output):
            if self.position is not None:
                sink.consume(name, output[output.shape[0] // 2:].float(), self.position)
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def seed_latents(hp: Hparams, shape: tuple, device) -> torch.Tensor:
    """One latent per seed 0..n_seeds-1, the same for every prompt (embedding2img). cuda: a CUDA generator
    seeded with s, the stream of the official ``torch.cuda.manual_seed(s)`` + ``randn(device='cuda')``."""
    if hp.stats_rng == "cuda" and torch.device(device).type != "cuda":
        raise ConfigError("gloce: hparams.stats_rng=cuda needs a CUDA device")
    gen_device = device if hp.stats_rng == "cuda" else "cpu"
    out = [torch.randn((1, *shape), generator=torch.Generator(device=gen_device).manual_seed(s), device=gen_device)
           for s in range(hp.n_seeds)]
    return torch.cat(out).to(device)


def lms_scheduler(pipe):
    """LMS as embedding2img builds it: the base model's betas, diffusers' other defaults."""
    from diffusers import LMSDiscreteScheduler

    c = pipe.scheduler.config
    return LMSDiscreteScheduler(beta_start=c.beta_start, beta_end=c.beta_end, beta_schedule=c.beta_schedule,
                                num_train_timesteps=c.num_train_timesteps)


@torch.no_grad()
def generate_statistics(pipe, prompts: Sequence[str], hp: Hparams, device, sink, desc: str, progress: bool) -> None:
    """Every (prompt, seed) partial generation of ``embedding2img``, in batches of ``batch_size``: LMS,
    CFG with uncond "", stopped after the last window call. ``sink.start(prompt_idx, seed_idx)`` opens
    each batch; ``sink.consume`` sees the window's to_out.0 outputs (conditional half)."""
    from tqdm.auto import tqdm

    unet = pipe.unet
    dtype = unet.dtype
    size = hp.resolution or unet.config.sample_size * pipe.vae_scale_factor
    if size % pipe.vae_scale_factor:
        raise ConfigError(f"gloce: hparams.resolution {size} is not a multiple of the VAE factor {pipe.vae_scale_factor}")
    side = size // pipe.vae_scale_factor
    noise = seed_latents(hp, (unet.config.in_channels, side, side), device)
    cond = encode_texts(pipe, prompts, device, dtype)
    uncond = encode_texts(pipe, [""], device, dtype)
    samples = torch.cartesian_prod(torch.arange(len(prompts)), torch.arange(hp.n_seeds)).view(-1, 2)
    window = hp.window
    with Recorder(unet, out_layers(unet), sink) as recorder:
        for start in tqdm(range(0, len(samples), hp.batch_size), desc=desc, unit="batch", disable=not progress,
                          leave=False):
            p_idx, s_idx = samples[start:start + hp.batch_size].unbind(1)
            b = len(p_idx)
            context = torch.cat([uncond.expand(b, -1, -1), cond[p_idx.to(device)]])
            scheduler = lms_scheduler(pipe)
            scheduler.set_timesteps(hp.stats_steps)
            latents = noise[s_idx.to(device)] * scheduler.init_noise_sigma
            sink.start(p_idx, s_idx)
            for i, t in enumerate(scheduler.timesteps[:window.stop]):
                recorder.position = window.index(i) if i in window else None
                x = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(dtype)
                eps = unet(x, t.to(device), encoder_hidden_states=context, return_dict=False)[0].float()
                recorder.position = None
                eps_u, eps_c = eps.chunk(2)
                if i + 1 < window.stop:     # the last recorded call's step is never used
                    latents = scheduler.step(eps_u + hp.stats_guidance * (eps_c - eps_u), t, latents,
                                             return_dict=False)[0]


class FeatureSums:
    """Per prompt and layer: Σ (y−r)(y−r)ᵀ and Σ (y−r) over the pooled tokens of the window's calls, and
    their count. r is one vector per layer (the first batch's mean), shared by all prompts: the same
    moments as the official Σ yyᵀ, Σ y, without float32 cancellation in E[yyᵀ] − μμᵀ when |μ| ≫ spread."""

    def __init__(self, n_prompts: int, dims: Mapping[str, int], levels: int, device):
        self.levels, self.device = levels, device
        self.gram = {k: torch.zeros(n_prompts, d, d, device=device) for k, d in dims.items()}
        self.sum = {k: torch.zeros(n_prompts, d, device=device) for k, d in dims.items()}
        self.count = {k: torch.zeros(n_prompts, dtype=torch.float64, device=device) for k in dims}
        self.shift: dict[str, torch.Tensor] = {}
        self.p_idx = torch.zeros(0, dtype=torch.long)

    def start(self, p_idx, s_idx) -> None:
        self.p_idx = p_idx.to(self.device)

    def consume(self, name: str, y: torch.Tensor, position: int) -> None:
        x = pooled_tokens(y, self.levels)
        if name not in self.shift:
            self.shift[name] = x.mean(dim=(0, 1))
        x = x - self.shift[name]
        self.gram[name].index_add_(0, self.p_idx, x.transpose(1, 2) @ x)
        self.sum[name].index_add_(0, self.p_idx, x.sum(1))
        self.count[name].index_add_(0, self.p_idx, torch.full_like(self.p_idx, x.shape[1], dtype=torch.float64))

    def moments(self, name: str, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [G, D] and covariance E[yyᵀ] − μμᵀ [G, D, D] (update_gloce.py) of groups of prompts;
        ``groups`` [G, P] counts each prompt's runs in a group (the official code generates a repeated
        pool name once per occurrence)."""
        groups = groups.to(self.device)
        n = (groups @ self.count[name]).float().view(-1, 1)
        w = groups.float()
        mean = (w @ self.sum[name]) / n                                  # mean of y − r
        second = torch.einsum("gp,pij->gij", w, self.gram[name]) / n.view(-1, 1, 1)
        return mean + self.shift[name], second - mean[:, :, None] * mean[:, None, :]


class ScoreMaxima:
    """Per (prompt, concept) pair, seed, window call and layer: the maximum gate score over the
    full-resolution tokens (register_norm_buffer_avg_spatial), for the concepts that need the prompt."""

    def __init__(self, pairs: torch.Tensor, n_prompts: int, n_concepts: int, gates: Mapping[str, tuple], hp: Hparams,
                 device):
        self.gates, self.device = gates, device
        self.pair_of = torch.full((n_prompts, n_concepts), -1, dtype=torch.long)
        self.pair_of[pairs[:, 0], pairs[:, 1]] = torch.arange(len(pairs))
        self.values = {k: torch.zeros(len(pairs), hp.n_seeds, len(hp.window), device=device) for k in gates}

    def start(self, p_idx, s_idx) -> None:
        pair = self.pair_of[p_idx]                                       # [b, N]
        i, n = torch.nonzero(pair >= 0, as_tuple=True)
        self.sel = tuple(t.to(self.device) for t in (i, n, pair[i, n], s_idx[i]))

    def consume(self, name: str, y: torch.Tensor, position: int) -> None:
        v, mu = self.gates[name]
        b, t, d = y.shape
        mx = gate_scores(y.reshape(-1, d), v, mu).view(b, t, -1).amax(1)   # [b, N]
        i, n, pair, seed = self.sel
        self.values[name][pair, seed, position] = mx[i, n]


def prompt_index(prompts: Sequence[str]) -> dict[str, int]:
    return {p: i for i, p in enumerate(dict.fromkeys(prompts))}


def group_matrix(lists: Sequence[Sequence[str]], index: Mapping[str, int]) -> torch.Tensor:
    g = torch.zeros(len(lists), len(index), dtype=torch.float64)
    for row, texts in enumerate(lists):
        for t in texts:
            g[row, index[t]] += 1
    return g


def top_directions(cov: torch.Tensor, r: int) -> torch.Tensor:
    """The r leading eigenvectors [.., D, r] of symmetric covariances [.., D, D], largest first (the
    official SVD of a PSD matrix: the same directions, up to sign, which no output depends on)."""
    _, vecs = torch.linalg.eigh(cov)
    return vecs[..., -r:].flip(-1)


def calibrate(anchor_max: torch.Tensor, hp: Hparams) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate centre and slope per concept from its anchors' maxima [N, K] (update_gloce.py:494–519)."""
    std = anchor_max.std(dim=1)                                          # unbiased, as torch's default
    centre = anchor_max.mean(dim=1) + hp.thresh * std
    if hp.calibration == "current":
        slope = torch.full_like(centre, LOGIT_99 / (0.001 * hp.thresh))
    else:
        slope = LOGIT_99 / (0.1 * hp.thresh * std)
    return centre, slope


# =========================================================================== construction


@torch.no_grad()
def build(pipe, prompts: Sequence[ConceptPrompts], hp: Hparams, device, progress: bool) -> tuple[dict, dict]:
    """The N-concept network's tensors (official names and shapes) and a report."""
    unet = pipe.unet
    layers = out_layers(unet)
    modules = dict(unet.named_modules())
    dims = {k: modules[k].out_features for k in layers}
    too_big = [k for k in ("update_rank", "degen_rank", "gate_rank") if getattr(hp, k) > min(dims.values())]
    if too_big:
        raise ConfigError(f"gloce: hparams.{too_big[0]}={getattr(hp, too_big[0])} exceeds the smallest to_out width "
                          f"{min(dims.values())}")
    timings = {}

    # Pass 1: sums of every target, surrogate and gate prompt.
    started = time.perf_counter()
    idx = prompt_index([p.target for p in prompts] + [s for p in prompts for s in p.surrogates] + [p.gate for p in prompts])
    sums = FeatureSums(len(idx), dims, hp.pool_levels, device)
    generate_statistics(pipe, list(idx), hp, device, sums, "gloce statistics", progress)
    targets = group_matrix([[p.target] for p in prompts], idx)
    surrogates = group_matrix([p.surrogates for p in prompts], idx)
    gates = group_matrix([[p.gate] for p in prompts], idx)
    timings["sums"] = time.perf_counter() - started

    started = time.perf_counter()
    tensors, gate_params = {}, {}
    for name in layers:
        mu_t, cov_t = sums.moments(name, targets)
        mu_s, cov_s = sums.moments(name, surrogates)
        mu_g, _ = sums.moments(name, gates)
        v_s = top_directions(cov_s, hp.degen_rank)                      # [N, D, r_d]
        v_t = top_directions(cov_t, hp.update_rank)                     # [N, D, r_u]
        diff = mu_t - mu_g
        v_g = top_directions(cov_t + diff[:, :, None] * diff[:, None, :], hp.gate_rank)
        key = official_key(name)
        tensors[f"{key}.lora_degen.weight"] = v_s
        tensors[f"{key}.lora_update.weight"] = v_s - v_t @ (v_t.transpose(1, 2) @ v_s)   # (I − V_t V_tᵀ) V_s
        tensors[f"{key}.bias.weight"] = mu_s.unsqueeze(0)
        tensors[f"{key}.debias.weight"] = mu_t.unsqueeze(0)
        tensors[f"{key}.selector.select_weight.weight"] = v_g
        tensors[f"{key}.selector.select_mean_diff.weight"] = mu_g
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
        gate_params[name] = (v_g, mu_g)
    del sums
    timings["directions"] = time.perf_counter() - started

    # Pass 2: the maximum gate score of every anchor generation step (and, for the report only, the target's:
    # the official code prints them; ``diagnostics`` records them at the cost of the targets' generations).
    started = time.perf_counter()
    scored = [[p.target] if hp.diagnostics else [] for p in prompts]
    idx = prompt_index([a for p, extra in zip(prompts, scored) for a in extra + p.anchors])
    pairs = sorted({(idx[a], n) for n, (p, extra) in enumerate(zip(prompts, scored)) for a in extra + p.anchors})
    maxima = ScoreMaxima(torch.tensor(pairs, dtype=torch.long).view(-1, 2), len(idx), len(prompts), gate_params, hp,
                         device)
    generate_statistics(pipe, list(idx), hp, device, maxima, "gloce gate calibration", progress)
    pair_row = {pair: row for row, pair in enumerate(pairs)}
    anchor_rows = torch.tensor([[pair_row[(idx[a], n)] for a in p.anchors] for n, p in enumerate(prompts)])
    report = {}
    for name in layers:
        values = maxima.values[name]
        anchor_max = values[anchor_rows.to(device)].flatten(1)            # [N, anchors × seeds × calls]
        centre, slope = calibrate(anchor_max, hp)
        key = official_key(name)
        tensors[f"{key}.selector.imp_center"] = centre
        tensors[f"{key}.selector.imp_slope"] = slope
        report[name] = {"centre": centre.tolist(), "slope": slope.tolist(), "anchor_max": anchor_max.amax(1).tolist()}
        if hp.diagnostics:
            target_max = values[torch.tensor([pair_row[(idx[p.target], n)] for n, p in enumerate(prompts)],
                                             device=device)].flatten(1)
            report[name].update(target_min=target_max.amin(1).tolist(), target_mean=target_max.mean(1).tolist())
    timings["calibration"] = time.perf_counter() - started
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, {"layers": report, "seconds": timings}


# =========================================================================== inference


@dataclass
class LayerModule:
    """One layer's N concepts, as the forward uses them."""

    select_v: torch.Tensor      # [N, D, g]
    select_mu: torch.Tensor     # [N, D]
    centre: torch.Tensor        # [N]
    slope: torch.Tensor         # [N]
    update: torch.Tensor        # [D, N·r_d]: the concepts' (I − V_t V_tᵀ) V_s side by side
    degen: torch.Tensor         # [N·r_d, D]: the concepts' V_sᵀ stacked
    target_mean: torch.Tensor   # [N, D]
    surrogate_mean: torch.Tensor    # [N, D]

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor], key: str, device) -> LayerModule:
        def get(suffix):
            return t[f"{key}.{suffix}"].to(device=device, dtype=torch.float32)

        update, degen = get("lora_update.weight"), get("lora_degen.weight")        # [N, D, r_d]
        n, d, r = update.shape
        return cls(get("selector.select_weight.weight"), get("selector.select_mean_diff.weight"),
                   get("selector.imp_center").reshape(n), get("selector.imp_slope").reshape(n),
                   update.permute(1, 0, 2).reshape(d, n * r), degen.permute(0, 2, 1).reshape(n * r, d),
                   get("debias.weight").reshape(n, d), get("bias.weight").reshape(n, d))

    def __call__(self, y: torch.Tensor, eta: float) -> torch.Tensor:
        """GLoCELayerOutProp.forward on tokens y [M, D] (float32)."""
        s_all = torch.sigmoid(self.slope * (gate_scores(y, self.select_v, self.select_mu) - self.centre))   # [M, N]
        s, n_star = s_all.max(dim=1, keepdim=True)
        n, r = self.target_mean.shape[0], self.degen.shape[0] // self.target_mean.shape[0]
        coeff = ((y - self.target_mean[n_star[:, 0]]) @ self.update).view(-1, n, r)               # [M, N, r_d]
        chosen = torch.zeros_like(coeff).scatter_(1, n_star[:, :, None].expand(-1, 1, r),
                                                  coeff.gather(1, n_star[:, :, None].expand(-1, 1, r)))
        replaced = self.surrogate_mean[n_star[:, 0]] + chosen.view(-1, n * r) @ self.degen
        return (1 - s) * y + s * (eta * replaced)


class GLoCEEdit(ContextEdit):
    """The gated modules on the 16 to_out.0 outputs. Each layer counts its calls (as the official
    ``t_counter``) and acts on calls > st_step; ``per_batch`` restarts the count with every prompt batch
    (one image's denoising), ``official`` never restarts it and wraps at 51 calls."""

    def __init__(self, layers: Mapping[str, LayerModule], eta: float, st_step: int, counter: str):
        self.modules = tuple(layers)
        self.layers, self.eta, self.st_step, self.counter = dict(layers), eta, st_step, counter
        self.calls = dict.fromkeys(layers, 0)

    def prepare(self, batch: ContextBatch) -> None:
        if self.counter == "per_batch":
            self.calls = dict.fromkeys(self.layers, 0)

    def output(self, name: str, module, inputs, output):
        self.calls[name] += 1
        if self.calls[name] <= self.st_step:
            return output
        if self.counter == "official" and self.calls[name] == OFFICIAL_N_STEP:
            self.calls[name] = 0
        y = output.float()
        new = self.layers[name](y.reshape(-1, y.shape[-1]), self.eta)
        return new.view_as(y).to(output.dtype)


# =========================================================================== official checkpoints


def layer_map(unet) -> dict[str, str]:
    return {official_key(n): n for n in out_layers(unet)}


def check_tensors(tensors: Mapping[str, torch.Tensor], keys: Sequence[str], where: str) -> int:
    """Every tensor of the N-concept network for each layer key, in its official shape; returns N."""
    first = tensors.get(f"{keys[0]}.lora_degen.weight")
    select = tensors.get(f"{keys[0]}.selector.select_weight.weight")
    if first is None or first.dim() != 3 or select is None or select.dim() != 3:
        raise DataError(f"{where}: no GLoCE tensors {keys[0]}.lora_degen.weight / .selector.select_weight.weight "
                        "of shape [N, D, r]")
    n, _, r = first.shape
    g = select.shape[-1]
    for key in keys:
        degen = tensors.get(f"{key}.lora_degen.weight")
        d = degen.shape[1] if degen is not None and degen.dim() == 3 else -1
        for suffix, shape in TENSORS.items():
            t, want = tensors.get(f"{key}.{suffix}"), shape(n, d, r, g)
            if t is None or tuple(t.shape) != want:
                raise DataError(f"{where}: {key}.{suffix} should have shape {list(want)}, "
                                f"got {None if t is None else list(t.shape)}")
    return n


def squeeze_leading(t: torch.Tensor, dims: int) -> torch.Tensor:
    while t.dim() > dims and t.shape[0] == 1:
        t = t[0]
    return t


def read_official(path: Path, keys: Sequence[str]) -> tuple[dict[str, torch.Tensor], str]:
    """One concept from an official ``ckpt.safetensors`` (update_gloce.py saves the 1-concept network after
    assigning: degen/update [D, r_d], bias/debias [1, 1, D], select_weight [1, D, g], select_mean_diff
    [1, D], imp_center [] and imp_slope [1]); per-concept tensors: [D, r], [D], [D, g], [D], [], []."""
    tensors, meta = read_safetensors(path)
    per_concept = {"lora_degen.weight": 2, "lora_update.weight": 2, "bias.weight": 1, "debias.weight": 1,
                   "selector.select_weight.weight": 2, "selector.select_mean_diff.weight": 1,
                   "selector.imp_center": 0, "selector.imp_slope": 0}
    out = {}
    for key in keys:
        for suffix, dims in per_concept.items():
            t = tensors.get(f"{key}.{suffix}")
            if t is None:
                raise DataError(f"{path}: missing {key}.{suffix}; not a GLoCE unet_ca_out checkpoint for this UNet")
            t = squeeze_leading(t.float(), dims)
            if t.dim() != dims:
                raise DataError(f"{path}: {key}.{suffix} has shape {list(tensors[f'{key}.{suffix}'].shape)}, "
                                "not one concept's")
            out[f"{key}.{suffix}"] = t
    return out, (meta.get("prompts") or path.parent.name.replace("_", " "))


def official_settings(path: Path) -> dict:
    """η and st_step are generation flags, not in the checkpoint: st from the official folder name
    (``..._st10_end20_...``), η 5 under an ``explicit_*`` folder (shell_scripts/explicit/generate_by_gloce.sh),
    otherwise the generate defaults of the celebrity and artist scripts (st 10, η 1)."""
    text = path.resolve().as_posix()
    st = re.search(r"_st(\d+)_end\d+", text)
    explicit = any(part.startswith("explicit_") for part in path.resolve().parts)
    return {"st_step": int(st.group(1)) if st else 10, "eta": 5.0 if explicit else 1.0}


def load_official(path: Path, unet_keys: Sequence[str] | None = None) -> Artifact:
    """An official checkpoint: one ``ckpt.safetensors`` (one concept), or a folder holding it, or a folder
    of ``<concept>/ckpt.safetensors`` (generate_by_gloce.py --model_path: every concept in one network,
    here in sorted order)."""
    path = Path(path)
    files = [path] if path.is_file() else ([path / "ckpt.safetensors"] if (path / "ckpt.safetensors").is_file()
                                           else sorted(path.glob("*/ckpt.safetensors")))
    if not files:
        raise DataError(f"{path}: no GLoCE checkpoint (ckpt.safetensors, or <concept>/ckpt.safetensors in a folder)")
    if unet_keys is None:
        keys = sorted({k.split(".", 1)[0] for k in read_safetensors(files[0])[0] if k.startswith(PREFIX + "_")})
    else:
        keys = list(unet_keys)
    concepts = [read_official(f, keys) for f in files]

    def stack(key, suffix):
        return torch.stack([c[f"{key}.{suffix}"] for c, _ in concepts])

    tensors = {}
    for key in keys:
        try:
            tensors.update({f"{key}.{suffix}": stack(key, suffix) for suffix in (
                "lora_degen.weight", "lora_update.weight", "selector.select_weight.weight",
                "selector.select_mean_diff.weight", "selector.imp_center", "selector.imp_slope")})
            tensors.update({f"{key}.bias.weight": stack(key, "bias.weight").unsqueeze(0),
                            f"{key}.debias.weight": stack(key, "debias.weight").unsqueeze(0),
                            f"{key}.alpha": torch.tensor(1.0)})
        except RuntimeError as e:      # torch.stack of unequal shapes: checkpoints of other ranks
            raise DataError(f"{path}: the checkpoints' {key} tensors differ in shape ({e}); all concepts of one "
                            "network need the same ranks") from None
    check_tensors(tensors, keys, str(path))
    settings = official_settings(files[0].parent)
    log.info("gloce: %d official checkpoint(s) from %s; eta %s, st_step %s (generation flags, not stored in the "
             "checkpoint)", len(files), path, settings["eta"], settings["st_step"])
    meta = {"concepts": [name for _, name in concepts], "official_files": [str(f) for f in files],
            "gloce": {**settings, "counter": "per_batch", "source": "official checkpoint"}}
    return Artifact(method="gloce", tensors=tensors, metadata=meta)


# =========================================================================== the method


class GLoCE(Method):
    name = "gloce"
    version = "1"
    description = ("GLoCE (CVPR 2025): training-free gated low-rank modules on the 16 attn2.to_out.0 outputs, built "
                   "from feature statistics of a few partial generations; defaults = Hyun1A/GLoCE@95e48ef celebrity "
                   "scripts (ranks 16/2/1, θ 2.5, calls 10-20, 3 seeds, 3 anchors, η 1)")
    trains = True    # no gradient steps, but minutes of generations: the artifact is cached
    hparams_class = Hparams
    operational_hparams = ("batch_size", "diagnostics")

    def erase(self, pipe, concepts: Sequence[Concept], hparams: Mapping[str, Any],
              ctx: EraseContext | None = None) -> Artifact:
        names, hp, ctx = erase_inputs(self, pipe, concepts, hparams, ctx)
        device = torch.device(ctx.device)
        started = time.perf_counter()
        pool = anchor_pool(hp, ctx.data_dir)
        if not pool:
            raise ConfigError("gloce: hparams.anchor_pool is empty; the gate is calibrated on the anchors taken from it")
        prompts = select_prompts(pipe, names, hp, pool, device)
        tensors, report = build(pipe, prompts, hp, device, ctx.progress)
        unet = pipe.unet
        meta = {"concepts": names, "layers": out_layers(unet), "base_kv_sha256": base_kv_sha256(unet),
                "base_kv_checksums": base_kv_checksums(unet),
                "gloce": {"eta": hp.eta, "st_step": hp.st_step if hp.gate_st_step is None else hp.gate_st_step,
                          "counter": hp.counter, "pool_size": len(pool),
                          "prompts": [{"target": p.target, "gate": p.gate, "anchors": p.anchor_names,
                                       "surrogates": p.surrogate_names} for p in prompts],
                          "calibration": report["layers"], "stage_seconds": report["seconds"]}}
        meta["seconds"] = round(time.perf_counter() - started, 3)
        log.info("gloce: %d concepts, %.1f s", len(names), meta["seconds"])
        return Artifact(method=self.name, tensors=tensors, metadata=meta)

    def apply(self, pipe, artifact: Artifact):
        unet = pipe.unet
        check_base_kv(artifact, unet, "gloce")
        by_key = layer_map(unet)
        keys = sorted({k.split(".", 1)[0] for k in artifact.tensors if k.startswith(PREFIX + "_")})
        unknown = [k for k in keys if k not in by_key]
        if unknown or not keys:
            raise ConfigError(f"gloce: the artifact's modules do not match this UNet's attn2.to_out.0 layers "
                              f"({', '.join(unknown[:3]) or 'none found'})")
        check_tensors(artifact.tensors, keys, "gloce artifact")
        settings = artifact.metadata.get("gloce", {})
        device = unet.device
        layers = {by_key[k]: LayerModule.from_tensors(artifact.tensors, k, device) for k in keys}
        edit = GLoCEEdit(layers, float(settings.get("eta", 1.0)), int(settings.get("st_step", 10)),
                         settings.get("counter", "per_batch"))
        return context_edit(unet, edit)

    def load_release(self, path: Path) -> Artifact:
        """Official checkpoints (see ``load_official``)."""
        return load_official(path)
