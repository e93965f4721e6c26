"""ESD — Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023); sources and deviations: docs/methods/esd.md.

Two methods share one trainer and differ only in the UNet parameters they fine-tune:

* ``esd-x`` (``train_method: xattn``): every cross-attention (``attn2``) parameter: to_q, to_k, to_v,
  to_out.0 (weight + bias) of the 16 attn2 blocks. ``xlayer`` (attn2 of output_blocks.6/.8 only) too.
* ``esd-u`` (``train_method: noxattn``): everything except cross-attention, the time embedding and the
  final ``out.`` layers (GroupNorm + conv); norms, conv_in, ResBlocks, self-attention, proj_in/out and
  FF included. ``selfattn`` / ``selflayer`` (attn1 only) too.

The subsets are the paper code's rules applied verbatim to the CompVis parameter names
(``compvis_names`` maps diffusers' names; ``tests/test_esd.py`` checks the map against diffusers' own
CompVis converter).

Per iteration, as ``train-scripts/train-esd.py`` at a2189e9 (rohitgandikota/erasing, the paper's code):

1. pick a concept uniformly; draw t_enc ~ U{0..S-1} (S = ddim_steps = 50) and
   t ~ U[round(t_enc/S·1000), round((t_enc+1)/S·1000)); draw x_T ~ N(0, I);
2. without gradients, sample x_t with the model being trained: DDIM (η_ddim = 0), CFG
   ``start_guidance`` on the concept, from x_T, stopped early as the paper's modified CompVis sampler
   does (``xt_schedule: paper``, see ``paper_plan``);
3. frozen model: e_0 = ε*(x_t, t, ""), e_p = ε*(x_t, t, c); target = e_0 − η (e_p − e_0);
4. loss = MSE(ε_θ(x_t, t, c), target) over all latent elements; one Adam step (lr 1e-5, fp32).

Design (same result as the paper loop, less memory and work):

* one UNet, the pipeline's own: the trained subset's parameters get fresh copies for the duration of
  training and the frozen model is the same module with the original tensors swapped back in
  (``cpebench.attention.swapped_weights``), so there is no second UNet; e_0 and e_p share one batch-2
  forward. On exit the pipeline holds its original tensor objects again (bit for bit).
* ``autocast: bf16|fp16`` runs the gradient-free passes (the x_t sampling and the frozen targets, about
  95 % of the FLOPs) under ``torch.autocast``; the trained forward/backward and Adam stay fp32, so the
  update is exact given (x_t, target) and no fp16 loss scaling is needed. It changes bits, so it is part
  of the artifact fingerprint. ``gradient_checkpointing`` only saves memory (operational).
* every random draw comes from one CPU ``torch.Generator`` seeded with ``seed`` (the paper code is
  unseeded), in a fixed order per iteration, so results do not depend on the device.
* training state (trained tensors, Adam moments, generator state, step, losses) is saved every
  ``save_every`` steps in the erase context's workdir; a killed run resumes with identical weights.

Deviations from the official code (named in the hparams where they change numbers):

* ``xt_schedule: paper`` (default) keeps the official sampler's offset: it skips DDIM timestep 981 and
  breaks after the step with index t_enc−1, so x_t is ~2–3 DDIM steps less noisy than the timestep the
  UNet is then queried at, and t_enc ∈ {0, 1} samples down to x_0. The paper text means x_t
  at t; ``xt_schedule: aligned`` does that (DDIM from 981 down to exactly t's noise level).
* The official ``--lr`` is declared ``type=int`` (only the default 1e-5 is usable); here lr is a float.
* The paper code samples with CompVis LDM; here the diffusers port of the same weights. The noise
  schedule is LDM's (β = linspace(√0.00085, √0.012, 1000)², computed in float64, stored float32).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F

from cpebench.attention import swapped_weights
from cpebench.errors import ConfigError, CpebenchError, DataError
from cpebench.methods import (Artifact, Concept, EraseContext, Method, checksums_agree, hparams_from_dict,
                              read_safetensors, read_torch, weight_checksum)
from cpebench.methods.common import (TrainableCopy, check_at_least_one, check_choices, erase_inputs, load_state,
                                     restore_training, save_state, train_resumable, training_tensors)

log = logging.getLogger(__name__)

STATE_FILE = "esd-state.safetensors"
OFFICIAL_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


# =========================================================================== parameter subsets


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def compvis_names(names: Sequence[str], layers_per_block: int = 2) -> dict[str, str]:
    """diffusers UNet2DConditionModel parameter name -> CompVis ``model.diffusion_model`` name (SD-1.x)."""
    n = layers_per_block + 1
    with_attention = {int(m.group(1)) for m in (re.match(r"up_blocks\.(\d+)\.attentions\.", x) for x in names) if m}
    out = {}
    for name in names:
        top = next((k for k in _TOP if name.startswith(k + ".")), None)
        p = name.split(".")
        if top:
            out[name] = _TOP[top] + name[len(top):]
            continue
        if p[0] == "down_blocks" and p[2] == "downsamplers":       # down_blocks.b.downsamplers.0.conv.w
            out[name] = f"input_blocks.{n * (int(p[1]) + 1)}.0.op." + ".".join(p[5:])
            continue
        if p[0] == "up_blocks" and p[2] == "upsamplers":           # up_blocks.b.upsamplers.0.conv.w
            b = int(p[1])
            out[name] = f"output_blocks.{n * b + n - 1}.{2 if b in with_attention else 1}.conv." + ".".join(p[5:])
            continue
        if p[0] == "down_blocks":
            block, kind, rest = f"input_blocks.{n * int(p[1]) + int(p[3]) + 1}", p[2], p[4:]
        elif p[0] == "up_blocks":
            block, kind, rest = f"output_blocks.{n * int(p[1]) + int(p[3])}", p[2], p[4:]
        elif p[0] == "mid_block":   # resnets.0 -> middle_block.0, attentions.0 -> .1, resnets.1 -> .2
            kind, j, rest = p[1], int(p[2]), p[3:]
            block = f"middle_block.{2 * j if kind == 'resnets' else 1}"
        else:
            raise CpebenchError(f"parameter {name!r} is not part of an SD-1.x UNet")
        sub = "" if p[0] == "mid_block" else (".0" if kind == "resnets" else ".1")
        if kind == "resnets":
            out[name] = f"{block}{sub}.{_RESNET[rest[0]]}." + ".".join(rest[1:])
        elif kind == "attentions":
            out[name] = f"{block}{sub}." + ".".join(rest)
        else:
            raise CpebenchError(f"parameter {name!r} is not part of an SD-1.x UNet")
    return out


def _in_subset(train_method: str, name: str) -> bool:
    """train-esd.py's rules, verbatim, on a CompVis ``model.diffusion_model.named_parameters()`` name."""
    if train_method == "noxattn":
        return not (name.startswith("out.") or "attn2" in name or "time_embed" in name)
    if train_method == "selfattn":
        return "attn1" in name
    if train_method == "xattn":
        return "attn2" in name
    if train_method == "full":
        return True
    if train_method == "notime":
        return not (name.startswith("out.") or "time_embed" in name)
    if train_method == "xlayer":
        return "attn2" in name and ("output_blocks.6." in name or "output_blocks.8." in name)
    if train_method == "selflayer":
        return "attn1" in name and ("input_blocks.4." in name or "input_blocks.7." in name)
    raise ConfigError(f"unknown train_method {train_method!r}")


TRAIN_METHODS = ("xattn", "xlayer", "noxattn", "selfattn", "selflayer", "full", "notime")


def subset_names(names: Sequence[str], train_method: str, layers_per_block: int = 2) -> list[str]:
    """The diffusers parameter names ``train_method`` trains (in model order)."""
    cv = compvis_names(names, layers_per_block)
    return [n for n in names if _in_subset(train_method, cv[n])]


# =========================================================================== hyperparameters


@dataclass(frozen=True)
class Hparams:
    """benchmarks/methods/_esd.yaml gives every value and its source (train-esd.py at a2189e9)."""

    train_method: str = "xattn"
    iterations: int = 1000
    lr: float = 1.0e-5
    negative_guidance: float = 1.0       # η of the target e_0 − η (e_p − e_0)
    start_guidance: float = 3.0          # CFG scale of the x_t sampling
    ddim_steps: int = 50
    image_size: int | None = None        # None: the UNet's sample_size × 8 (512 for SD-1.x, as the paper)
    xt_schedule: str = "paper"           # paper (the official sampler's offset) | aligned
    seed: int = 0
    autocast: str = "none"               # none | bf16 | fp16: the gradient-free passes only
    gradient_checkpointing: bool = False  # operational: memory only
    save_every: int = 200                # operational: resumable state every N steps

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], method: str, default_train_method: str,
                  allowed: Sequence[str]) -> Hparams:
        values = {"train_method": default_train_method, **hparams_from_dict(cls, d, method)}
        hp = cls(**values)
        if hp.train_method not in allowed:
            others = {"esd-x": "esd-u", "esd-u": "esd-x"}
            hint = (f" ({hp.train_method!r} is a {others.get(method)} subset: use --method {others.get(method)})"
                    if any(hp.train_method in m.train_methods for m in (ESDx, ESDu) if m.name != method) else
                    (f" (the paper code's {hp.train_method!r} trains cross-attention and the rest together: it is "
                     "neither ESD-x nor ESD-u)" if hp.train_method in TRAIN_METHODS else ""))
            raise ConfigError(f"{method}: unknown parameter subset train_method={hp.train_method!r}; "
                              f"{method} trains one of {', '.join(allowed)}{hint}")
        check_choices(method, hp, {"xt_schedule": ("paper", "aligned"), "autocast": ("none", "bf16", "fp16")})
        check_at_least_one(method, hp, ("iterations", "save_every"))
        if not 2 <= hp.ddim_steps <= 1000:
            raise ConfigError(f"{method}: hparams.ddim_steps must be in 2..1000, got {hp.ddim_steps}")
        if not hp.lr > 0:
            raise ConfigError(f"{method}: hparams.lr must be > 0, got {hp.lr}")
        return hp

    def fingerprinted(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("gradient_checkpointing", "save_every")}


# =========================================================================== sampling x_t


def ldm_alphas_cumprod(scheduler_config: Mapping) -> list[float]:
    """ᾱ_t as CompVis LDM computes it (float64, stored as float32), from the pipeline's scheduler config."""
    cfg = dict(scheduler_config)
    T = int(cfg.get("num_train_timesteps", 1000))
    b0, b1, kind = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012)), cfg.get("beta_schedule")
    if kind == "scaled_linear":      # LDM's "linear"
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(b0, b1, T, dtype=torch.float64)
    else:
        raise ConfigError(f"ESD: scheduler beta_schedule {kind!r} is not an SD-1.x schedule")
    return torch.cumprod(1.0 - betas, 0).float().tolist()


def ddim_timesteps(S: int, T: int = 1000) -> list[int]:
    """CompVis 'uniform' DDIM timesteps: range(0, T, T // S) + 1 (1, 21, …, 981 for S = 50; as CompVis, one
    more than S when S does not divide T)."""
    return [t + 1 for t in range(0, T, T // S)]


def paper_plan(t_enc: int, S: int, abar: Sequence[float]) -> list[tuple[int, float, float]]:
    """(UNet timestep, ᾱ_t, ᾱ_prev) of each DDIM step train-esd.py takes for ``t_enc``.

    The modified CompVis sampler is called with t_start=-1 (``timesteps[:-1]``: 981 is skipped, x_T is
    used at 961) and breaks after the step whose index is t_enc−1; ᾱ_prev of index 0 is ᾱ_0. So x_t has
    the noise level of DDIM timestep 20(t_enc−2)+1 for t_enc ≥ 2 and of ᾱ_0 for t_enc ∈ {0, 1}."""
    ts = ddim_timesteps(S, len(abar))
    stop = max(t_enc - 1, 0)
    return [(ts[i], abar[ts[i]], abar[ts[i - 1]] if i > 0 else abar[0]) for i in range(len(ts) - 2, stop - 1, -1)]


def aligned_plan(t: int, S: int, abar: Sequence[float]) -> list[tuple[int, float, float]]:
    """DDIM from ts[S−1] (981) through the DDIM timesteps above ``t``, the last step landing exactly on
    ᾱ_t: x_t then has the noise level of the timestep the UNet is queried at (the paper text's intent)."""
    ts = ddim_timesteps(S, len(abar))
    plan, i = [], len(ts) - 1
    while ts[i] > t:
        if i > 0 and ts[i - 1] > t:
            plan.append((ts[i], abar[ts[i]], abar[ts[i - 1]]))
            i -= 1
        else:
            plan.append((ts[i], abar[ts[i]], abar[t]))
            break
    return plan


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float) -> torch.Tensor:
    """Deterministic DDIM (η = 0), as CompVis ``p_sample_ddim``: x_prev = √ᾱ_prev x̂_0 + √(1−ᾱ_prev) ε."""
    pred_x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * pred_x0 + math.sqrt(1.0 - a_prev) * eps


def esd_target(e_0: torch.Tensor, e_p: torch.Tensor, eta: float) -> torch.Tensor:
    """The ESD objective's target: ε*(x,∅) − η (ε*(x,c) − ε*(x,∅))."""
    return e_0 - eta * (e_p - e_0)


# =========================================================================== the trainer


@dataclass
class Draw:
    word: int
    t_enc: int
    t: int
    noise: torch.Tensor     # [1, C, h, w] float32, CPU


class Trainer:
    """ESD on ``unet`` (the pipeline's own, modified in place while training; ``close`` restores it)."""

    def __init__(self, unet, embeddings: torch.Tensor, uncond: torch.Tensor, hp: Hparams, abar: Sequence[float],
                 latent_size: int, layers_per_block: int = 2):
        self.unet, self.hp, self.abar = unet, hp, list(abar)
        self.device = next(unet.parameters()).device
        self.emb = embeddings.to(self.device, torch.float32)             # [W, 77, D]
        self.uncond = uncond.to(self.device, torch.float32).reshape(1, *uncond.shape[-2:])
        self.latent_shape = (1, unet.config.in_channels, latent_size, latent_size)
        names = subset_names([n for n, _ in unet.named_parameters()], hp.train_method, layers_per_block)
        if not names:
            raise ConfigError(f"train_method {hp.train_method!r} selects no parameter of this UNet")
        self.generator = torch.Generator().manual_seed(hp.seed)
        self.losses: list[float] = []
        self.step_done = 0
        # The frozen model = the original tensor objects; the trained copies take their place meanwhile.
        self.copy = TrainableCopy(unet, names, gradient_checkpointing=hp.gradient_checkpointing)
        self.names, self.params, self.frozen = self.copy.names, self.copy.params, self.copy.frozen
        self.opt = torch.optim.Adam(self.params, lr=hp.lr)

    # ---- one iteration, in pieces (the tests call them one by one)

    def draw(self) -> Draw:
        """The iteration's random draws, in this order: concept, t_enc, t, x_T (one CPU generator)."""
        g, S = self.generator, self.hp.ddim_steps
        T = len(self.abar)
        word = int(torch.randint(self.emb.shape[0], (1,), generator=g))
        t_enc = int(torch.randint(S, (1,), generator=g))
        lo, hi = round(t_enc / S * T), round((t_enc + 1) / S * T)
        t = int(torch.randint(lo, hi, (1,), generator=g))
        noise = torch.randn(self.latent_shape, generator=g)
        return Draw(word, t_enc, t, noise)

    def _amp(self):
        if self.hp.autocast == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.hp.autocast == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _eps(self, x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=self.device, dtype=torch.long)
        return self.unet(x, tt, encoder_hidden_states=context, return_dict=False)[0].float()

    def plan(self, d: Draw) -> list[tuple[int, float, float]]:
        if self.hp.xt_schedule == "paper":
            return paper_plan(d.t_enc, self.hp.ddim_steps, self.abar)
        return aligned_plan(d.t, self.hp.ddim_steps, self.abar)

    @torch.no_grad()
    def sample_xt(self, d: Draw) -> torch.Tensor:
        """x_t from the model being trained (paper: "seems to work better"), CFG ``start_guidance``."""
        x = d.noise.to(self.device)
        context = torch.cat([self.uncond, self.emb[d.word : d.word + 1]])
        s = self.hp.start_guidance
        with self._amp():
            for t, a_t, a_prev in self.plan(d):
                e_u, e_c = self._eps(torch.cat([x, x]), t, context).chunk(2)
                x = ddim_step(x, e_u + s * (e_c - e_u), a_t, a_prev)
        return x

    @torch.no_grad()
    def target(self, z: torch.Tensor, d: Draw) -> torch.Tensor:
        """The frozen (original) model's e_0 and e_p in one batch, combined into the ESD target."""
        with swapped_weights(self.unet, self.frozen), self._amp():
            e_0, e_p = self._eps(torch.cat([z, z]), d.t, torch.cat([self.uncond, self.emb[d.word : d.word + 1]])).chunk(2)
        return esd_target(e_0, e_p, self.hp.negative_guidance)

    def prediction(self, z: torch.Tensor, d: Draw) -> torch.Tensor:
        """ε_θ(x_t, t, c) of the model being trained (fp32, with gradients)."""
        return self._eps(z, d.t, self.emb[d.word : d.word + 1])

    def update(self, z: torch.Tensor, d: Draw, target: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.prediction(z, d), target)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def step(self) -> float:
        d = self.draw()
        z = self.sample_xt(d)
        loss = self.update(z, d, self.target(z, d))
        self.losses.append(loss)
        self.step_done += 1
        return loss

    # ---- results and restoration

    def trained(self) -> dict[str, torch.Tensor]:
        """The trained tensors that differ from the originals (CPU, float32)."""
        out = {}
        for n, p in zip(self.names, self.params):
            if not torch.equal(p.data, self.frozen[n].to(p.dtype)):
                out[n] = p.detach().cpu().clone()
        return out

    def close(self) -> None:
        """Put the original tensor objects, grad flags and checkpointing state back (bit for bit)."""
        self.copy.close()
        self.opt.state.clear()

    # ---- resumable state

    def save_state(self, path: Path, key: str, seconds: float) -> None:
        tensors = {**training_tensors(self.opt, dict(zip(self.names, self.params))), "rng": self.generator.get_state()}
        save_state(path, key, tensors, {"step": str(self.step_done), "losses": json.dumps(self.losses),
                                        "seconds": str(seconds)})

    def load_state(self, path: Path, key: str) -> float | None:
        """Restore a saved state of the same training (returns its seconds), or None."""
        saved = load_state(path, key, "esd")
        if saved is None:
            return None
        tensors, meta = saved
        restore_training(self.opt, dict(zip(self.names, self.params)), tensors)
        self.generator.set_state(tensors["rng"])
        self.step_done = int(meta["step"])
        self.losses = json.loads(meta["losses"])
        return float(meta.get("seconds", 0.0))


def train_step(trainer: Trainer) -> float:
    """One ESD iteration (a seam for tests that interrupt training)."""
    return trainer.step()


def train(pipe, concepts: Sequence[str], hp: Hparams, ctx: EraseContext, method: str) -> tuple[dict, dict]:
    """Run ESD; returns (changed tensors, metadata). ``pipe`` is left as it was."""
    from cpebench.models import text_embeddings

    unet = pipe.unet
    if unet.dtype != torch.float32:      # the paper trains in fp32: work on an fp32 copy
        unet = copy.deepcopy(unet).float()
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    image_size = hp.image_size or unet.config.sample_size * vae_factor
    if image_size % vae_factor:
        raise ConfigError(f"{method}: hparams.image_size must be a multiple of {vae_factor}, got {image_size}")
    with torch.no_grad():
        emb = text_embeddings(pipe, list(concepts)).float()
        uncond = text_embeddings(pipe, [""]).float()
    abar = ldm_alphas_cumprod(pipe.scheduler.config)
    layers_per_block = int(unet.config.layers_per_block)
    trainer = Trainer(unet, emb, uncond, hp, abar, image_size // vae_factor, layers_per_block)
    key = json.dumps({"method": method, "concepts": list(concepts), "hparams": hp.fingerprinted(),
                      "parameters": trainer.names}, sort_keys=True)
    path = Path(ctx.workdir) / STATE_FILE if ctx.workdir else None
    try:
        seconds = train_resumable(
            trainer, hp.iterations, lambda t: train_step(t), path=path, key=key, save_every=hp.save_every,
            desc=f"{method}: {len(concepts)} concept{'s' * (len(concepts) > 1)}", progress=ctx.progress,
            postfix=lambda t, loss: f"loss {loss:.4g}  mean(50) {sum(t.losses[-50:]) / len(t.losses[-50:]):.4g}")
        tensors = trainer.trained()
        n_params = sum(p.numel() for p in trainer.params)
        names = list(trainer.names)
        checksum = weight_checksum(trainer.frozen[n] for n in tensors)
        losses = trainer.losses
    finally:
        trainer.close()
    curve = [round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 8) for i in range(0, len(losses), 50)]
    meta = {
        "train_method": hp.train_method, "resolved_hparams": asdict(hp), "trained_parameters": len(names),
        "trained_numel": n_params, "changed_tensors": len(tensors), "image_size": image_size,
        "base_checksum": checksum,
        "train": {"seconds": round(seconds, 2), "iterations": hp.iterations, "device": str(trainer.device),
                  "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                  "loss_mean_per_50": curve},
    }
    if not tensors:
        raise CpebenchError(f"{method}: training changed no parameter (lr {hp.lr}, {hp.iterations} iterations)")
    return tensors, meta


# =========================================================================== official checkpoints


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    obj = read_torch(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]            # a CompVis / Lightning checkpoint
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise DataError(f"{path}: not a state dict of tensors")
    return dict(obj)


def to_diffusers_names(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict, str]:
    """A UNet state dict in CompVis (``model.diffusion_model.*`` or bare) or diffusers names -> diffusers."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in sd) or any(k.startswith(("input_blocks.", "output_blocks.", "middle_block.")) for k in sd):
        full = {k if k.startswith(prefix) else prefix + k: v for k, v in sd.items()
                if k.startswith(prefix) or not k.startswith(("model.", "first_stage_model.", "cond_stage_model."))}
        try:
            return dict(convert_ldm_unet_checkpoint(full, {"layers_per_block": 2})), "compvis"
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"{source}: CompVis UNet weights could not be converted ({type(e).__name__}: {e})") from None
    if all(k.startswith("unet.") for k in sd):
        sd = {k[len("unet."):]: v for k, v in sd.items()}
    return dict(sd), "diffusers"


def load_official(path: str | Path, cls: type[_ESD]) -> Artifact:
    """The authors' ESD weights as an artifact of ``cls``:

    * paper code / released weights: a full diffusers UNet state dict (``diffusers-<name>.pt``, e.g.
      ``diffusers-nudity-ESDu1-UNET.pt``) or the CompVis checkpoint (``compvis-<name>.pt`` / ``.ckpt``):
      only the variant's trained subset is kept (``method_<train_method>`` in the name picks it);
    * HEAD ``esd_sd.py``: a safetensors file of only the trained parameters, diffusers names.
    A folder holding exactly one such file is accepted too."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in OFFICIAL_SUFFIXES)
        if len(files) != 1:
            raise DataError(f"{path}: expected a cpebench artifact or exactly one ESD weights file "
                            f"({', '.join(OFFICIAL_SUFFIXES)}), found {len(files)}")
        path = files[0]
    if not path.exists():
        raise DataError(f"{path}: no such ESD artifact or weights file")
    sd, layout = to_diffusers_names(_read_state_dict(path), str(path))
    m = re.search(r"method_([a-z]+)", path.name)
    train_method = m.group(1) if m else cls.default_train_method
    if train_method not in cls.train_methods:
        other = next((c.name for c in (ESDx, ESDu) if train_method in c.train_methods), None)
        raise ConfigError(f"{path}: trained with train_method {train_method!r}"
                          + (f"; load it with --method {other}" if other else f", which {cls.name} does not cover"))
    full = "conv_norm_out.weight" in sd and any("attn2" in k for k in sd)
    if full:
        keep = set(subset_names(list(sd), train_method))
        tensors = {k: v for k, v in sd.items() if k in keep}
    else:   # only the trained parameters (HEAD): keep them all, but they must be this variant's kind
        tensors = dict(sd)
        cross = [k for k in tensors if "attn2" in k]
        if cls is ESDx and len(cross) != len(tensors):
            raise ConfigError(f"{path}: holds non-cross-attention tensors (e.g. "
                              f"{next(k for k in tensors if 'attn2' not in k)!r}): not an ESD-x checkpoint; use --method esd-u")
        if cls is ESDu and cross:
            raise ConfigError(f"{path}: holds cross-attention tensors (e.g. {cross[0]!r}): not an ESD-u checkpoint; "
                              "use --method esd-x")
    if not tensors:
        raise DataError(f"{path}: no UNet tensors of the {train_method!r} subset found")
    word = re.search(r"word_([^-]+)", path.name) or re.search(r"^esd-(.+?)-from-", path.name)
    return Artifact(method=cls.name, tensors={k: v.contiguous() for k, v in tensors.items()}, metadata={
        "concepts": [word.group(1)] if word else [], "source": "official checkpoint", "official_file": str(path),
        "official_layout": layout, "train_method": train_method, "kept_tensors": len(tensors),
        "dropped_tensors": len(sd) - len(tensors)})


# =========================================================================== the methods


class _ESD(Method):
    version = "1"
    trains = True
    operational_hparams = ("gradient_checkpointing", "save_every")
    train_methods: ClassVar[tuple] = ()
    default_train_method: ClassVar[str] = ""

    def hparams(self, hparams: Mapping[str, Any] | None) -> Hparams:
        return Hparams.from_dict(dict(hparams or {}), self.name, self.default_train_method, self.train_methods)

    def erase(self, pipe, concepts: Sequence[Concept], hparams: Mapping[str, Any],
              ctx: EraseContext | None = None) -> Artifact:
        names, hp, ctx = erase_inputs(self, pipe, concepts, hparams, ctx)
        tensors, meta = train(pipe, names, hp, ctx, self.name)
        return Artifact(method=self.name, tensors=tensors, metadata={"concepts": names, **meta})

    def check(self, unet, artifact: Artifact) -> None:
        params = dict(unet.named_parameters())
        unknown = [k for k in artifact.tensors if k not in params]
        if unknown:
            raise ConfigError(f"{self.name} artifact names {len(unknown)} tensors this UNet does not have (e.g. "
                              f"{unknown[0]!r}): it was made for another architecture")
        for k, t in artifact.tensors.items():
            if tuple(t.shape) != tuple(params[k].shape):
                raise ConfigError(f"{self.name} artifact tensor {k}: shape {tuple(t.shape)}, the model has "
                                  f"{tuple(params[k].shape)}: it was made for another base model")
        recorded = artifact.metadata.get("base_checksum")
        if recorded:
            if not checksums_agree(recorded, weight_checksum(params[k] for k in artifact.tensors)):
                raise ConfigError(
                    f"{self.name} artifact was trained on base model {artifact.metadata.get('base_model', '?')!r}, whose "
                    "weights differ from the loaded model's; train it again on this model (or load the model it was made for)")

    def apply(self, pipe, artifact: Artifact):
        self.check(pipe.unet, artifact)
        # Fresh copies: tensors read by safetensors sit at unaligned addresses, and CPU (oneDNN) convolutions
        # give other last bits on unaligned weights; copies make a loaded artifact act bit for bit as trained.
        params = dict(pipe.unet.named_parameters())
        tensors = {k: v.to(device=params[k].device, dtype=params[k].dtype, copy=True) for k, v in artifact.tensors.items()}
        return swapped_weights(pipe.unet, tensors)

    def load_release(self, path: Path) -> Artifact:
        """The official ESD weights (see ``load_official``)."""
        return load_official(path, type(self))


class ESDx(_ESD):
    name = "esd-x"
    description = ("ESD-x (Gandikota et al., ICCV 2023): fine-tunes the cross-attention (attn2) layers with negative "
                   "guidance; defaults = paper code a2189e9: 1000 it, Adam lr 1e-5, eta 1, start guidance 3, DDIM 50, fp32")
    train_methods = ("xattn", "xlayer")
    default_train_method = "xattn"


class ESDu(_ESD):
    name = "esd-u"
    description = ("ESD-u (Gandikota et al., ICCV 2023): fine-tunes every non-cross-attention UNet layer with negative "
                   "guidance; defaults = paper code a2189e9: 1000 it, Adam lr 1e-5, eta 1, start guidance 3, DDIM 50, fp32")
    train_methods = ("noxattn", "selfattn", "selflayer")
    default_train_method = "noxattn"
