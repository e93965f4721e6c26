"""FMN — Forget-Me-Not: Learning to Forget in Text-to-Image Diffusion Models (Zhang et al., CVPRW 2024).

Official code: SHI-Labs/Forget-Me-Not@a4a81e8 (``src/train_ti.py``, ``src/train_attn.py``, ``configs/*.yaml``);
sources, values and deviations: docs/methods/fmn.md. Two stages, on images of the concept (the official
repository ships 10 photos per celebrity; cpebench generates ``n_images`` per concept with the unedited
model, seeded, through ``cpebench.engine``):

* **Stage A, textual inversion** (``use_ti``, the official default). ``ti_tokens`` placeholder rows
  <s1>..<sk> (initialised from the name's word embeddings, then N(0, 1)) are learnt on the prompt
  "a photo of <s1>..<sk>" with the denoising MSE: AdamW (lr 1e-3, wd 0.1) over the embedding table, every
  other row restored after each step, then each placeholder row rescaled to ‖e‖ + λ(0.4 − ‖e‖), λ =
  min(1, 100·lr) (``clip_ti_decay``). Images are flipped with p = 0.5, t ~ U{0..999}, fp32. Here the
  placeholders never enter the tokenizer: the prompt's ids are built with them at known positions and a
  forward hook on the token-embedding module puts the rows there (the table and the tokenizer stay as
  they are). Several concepts can share one batched forward (``ti_concepts_per_step``; each has its own
  rows, random stream and AdamW moments, so the rows do not depend on the grouping beyond rounding).
* **Stage B, attention re-steering** (``src/train_attn.py``). With the prompt "a photo of {snippet}"
  (snippet = the TI tokens, or the name), S = the snippet's token positions plus, with ``use_pooler``,
  every position whose id is <|endoftext|>'s (on SD-1.x the padding too: ``pooler_positions:
  eos_id_match``; ``eos_only`` takes the first EOS only, as on SD-2.1, whose pad is "!"). Loss =
  ONE unsquared global L2 norm of the 16 attn2 attention probabilities at S (all heads, all pixels,
  all layers): L = sqrt(Σ_l Σ_h Σ_p Σ_{s∈S} a²). No denoising term. AdamW lr 2e-6, wd 0.01, 35 steps,
  batch 1, t ~ U, over the whole UNet (``params: unet``, official) or every attn2 parameter
  (``params: attn2``, ``only_optimize_ca``). The official clip at 1.0 is a no-op for the whole UNet (the
  parameter generator was consumed by the optimiser) and real for attn2: ``clip_grad: official``.
  Batch > 1 uses a per-sample token mask and the official reduction (one norm over the batch), which the
  official code gets wrong (``repeat`` tiles the mask head-major); labelled "(cpebench fix)".

Evaluation uses the plain concept names: the TI tokens are a training device only. The artifact holds
the new float32 values of every UNet tensor training changed (the official output is a whole pipeline).
Base model: SD-1.4 in cpebench (the official config trains SD-2.1-base).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cpebench.attention import probed
from cpebench.errors import ConfigError, CpebenchError, DataError
from cpebench.methods import Artifact, Concept, EraseContext, Method, read_state_dict
from cpebench.methods.closed_form import weight_edit
from cpebench.methods.common import (TOKENS, CheckedHparams, TrainableCopy, base_kv_checksums, base_kv_sha256,
                                     check_at_least_one, check_choices, check_non_negative, erase_inputs, load_state,
                                     restore_training, save_state, training_tensors)

log = logging.getLogger(__name__)

TEMPLATES = {"object": "a photo of {}", "style": "a photo in the style of {}"}   # dataset.py / train_attn.py
DATA_PROMPTS = {"object": "a photo of the {}", "style": "a photo in the style of {}"}   # MACE's data prompt
PARAMS = ("unet", "attn2")
CLIP_GRAD = ("official", "always", "never")
POOLER = ("eos_id_match", "eos_only")
STATE_FILE = "fmn-resteer.safetensors"
BETAS, EPS = (0.9, 0.999), 1e-8
VAE_BATCH = 8                     # images per VAE encoder call (``posterior``)


# =========================================================================== hyperparameters


@dataclass(frozen=True)
class Hparams(CheckedHparams):
    """benchmarks/methods/fmn.yaml (per-task values and their sources are there)."""

    method_name: ClassVar[str] = "fmn"

    concept_type: str = "object"          # object: "a photo of {}" | style: "a photo in the style of {}"
    # stage A: textual inversion (configs/ti.yaml)
    use_ti: bool = True
    ti_tokens: int = 4                    # <s1>|<s2>|<s3>|<s4>
    ti_init: Any = "name"                 # name: the name's first words, then <rand-1>; or a list ('elon', '<rand-1>', '<zero>')
    ti_steps: int = 500
    ti_lr: float = 1e-3
    ti_weight_decay: float = 0.1
    ti_norm_decay: bool = True            # clip_ti_decay
    ti_norm_target: float = 0.4
    ti_hflip: bool = True
    ti_seed: int = 42                     # torch.manual_seed(42), per concept
    ti_concepts_per_step: int = 1         # cpebench speed knob: concepts inverted together in one batched forward
    # stage B: attention re-steering (configs/attn.yaml)
    params: str = "unet"                  # unet (only_optimize_ca: false, official) | attn2
    steps: int = 35
    steps_per_concept: bool = False       # official: one shared budget for all concepts; true: steps x #concepts
    lr: float = 2e-6
    weight_decay: float = 0.01
    clip_grad: str = "official"           # official (none for unet, max_grad_norm for attn2) | always | never
    max_grad_norm: float = 1.0
    use_pooler: bool = True
    pooler_positions: str = "eos_id_match"   # eos_id_match (SD-1.x: EOS + all padding) | eos_only (first EOS)
    batch_size: int = 1
    seed: int = 0                         # stage B draws (the official run is unseeded)
    # training images (cpebench: generated by the unedited model; the official code reads photos)
    n_images: int = 8
    resolution: int = 512
    data_steps: int = 30
    data_guidance: float = 7.5
    data_scheduler: str = "dpm"
    data_batch_size: int = 4
    train_images_seed: int = 0
    # operational
    gradient_checkpointing: bool = False
    save_every: int = 100

    def check(self, method: str) -> None:
        check_non_negative(method, **{k: getattr(self, k) for k in (
            "ti_lr", "ti_weight_decay", "ti_norm_target", "lr", "weight_decay", "max_grad_norm", "data_guidance")})
        check_choices(method, self, {"concept_type": tuple(TEMPLATES), "params": PARAMS, "clip_grad": CLIP_GRAD,
                                     "pooler_positions": POOLER})
        check_at_least_one(method, self, ("ti_tokens", "ti_concepts_per_step", "batch_size", "n_images", "resolution",
                                          "data_steps", "data_batch_size", "save_every"))
        for key in ("ti_steps", "steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{method}: hparams.{key} must be >= 0, got {getattr(self, key)}")
        self.initializers(method)

    def initializers(self, method: str = "fmn") -> list[str] | None:
        """The explicit ``ti_init`` list (one entry per token), or None for ``name``."""
        if self.ti_init == "name":
            return None
        init = self.ti_init.split("|") if isinstance(self.ti_init, str) else list(self.ti_init or [])
        if len(init) != self.ti_tokens or not all(isinstance(x, str) and x.strip() for x in init):
            raise ConfigError(f"{method}: hparams.ti_init must be 'name' or a list of {self.ti_tokens} initialisers "
                              f"(a one-token word, '<rand-SIGMA>', '<zero>' or a token id), got {self.ti_init!r}")
        return [x.strip() for x in init]

    def fingerprinted(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("gradient_checkpointing", "save_every")}


# =========================================================================== prompts and the token set S


@dataclass
class Prompt:
    """One concept's stage-B prompt: padded ids, S, and where TI rows go (None without TI)."""

    ids: list[int]
    positions: list[int]          # S
    placeholders: list[int] | None


def pooler_positions(tokenizer, ids: Sequence[int], mode: str) -> set[int]:
    """``use_pooler``: every position holding <|endoftext|>'s id (SD-1.x pads with it), or the first only."""
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    found = [i for i, t in enumerate(ids) if t == eos]
    return set(found if mode == "eos_id_match" else found[:1])


def span_positions(ids: Sequence[int], span: Sequence[int]) -> set[int]:
    """Every occurrence of the token span in ``ids`` (train_attn.py marks all of them)."""
    n = len(span)
    return {i + j for i in range(len(ids) - n + 1) if list(ids[i : i + n]) == list(span) for j in range(n)}


def plain_prompt(tokenizer, hp: Hparams, name: str) -> Prompt:
    """No TI: "a photo of <name>", S = the name's token span(s) (+ pooler positions)."""
    prompt = TEMPLATES[hp.concept_type].format(name)
    ids = tokenizer(prompt, padding="max_length", max_length=TOKENS, truncation=True).input_ids
    span = tokenizer(name, add_special_tokens=False).input_ids
    if not span:
        raise ConfigError(f"fmn: concept {name!r} has no tokens")
    pos = span_positions(ids, span)
    if not pos:
        raise DataError(f"fmn: concept {name!r} does not occur in its prompt {prompt!r} (cut at {TOKENS} tokens)")
    if hp.use_pooler:
        pos |= pooler_positions(tokenizer, ids, hp.pooler_positions)
    return Prompt(list(ids), sorted(pos), None)


def ti_prompt(tokenizer, hp: Hparams) -> Prompt:
    """With TI: the template's words around ``ti_tokens`` placeholder positions (id 0 there; a hook puts
    the learnt rows in), as the tokenizer with the added tokens <s1>..<sk> encodes it."""
    before, after = TEMPLATES[hp.concept_type].split("{}")
    words = lambda s: tokenizer(s.strip(), add_special_tokens=False).input_ids if s.strip() else []
    head = [tokenizer.bos_token_id] + words(before)
    ids = head + [0] * hp.ti_tokens + words(after) + [tokenizer.eos_token_id]
    if len(ids) > TOKENS:
        raise ConfigError(f"fmn: hparams.ti_tokens={hp.ti_tokens} do not fit in {TOKENS} tokens")
    ids += [tokenizer.pad_token_id] * (TOKENS - len(ids))
    slots = list(range(len(head), len(head) + hp.ti_tokens))
    pos = set(slots) | (pooler_positions(tokenizer, ids, hp.pooler_positions) if hp.use_pooler else set())
    return Prompt(ids, sorted(pos), slots)


def token_mask(prompts: Sequence[Prompt], device) -> torch.Tensor:
    mask = torch.zeros(len(prompts), TOKENS, dtype=torch.bool)
    for i, p in enumerate(prompts):
        mask[i, p.positions] = True
    return mask.to(device)


@contextlib.contextmanager
def placeholder_rows(text_encoder, where: torch.Tensor, rows: torch.Tensor):
    """The token-embedding output gets ``rows`` (sample-major) at the ``where`` [B, 77] positions; all other
    positions keep the table's rows. The table itself is never written."""
    def hook(module, inputs, output):
        out = output.clone()
        out[where] = rows.to(out.dtype)
        return out

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode(text_encoder, prompts: Sequence[Prompt], rows: Sequence[torch.Tensor] | None, device) -> torch.Tensor:
    """SD's conditioning [B, 77, D] of ``prompts``; with TI, ``rows[i]`` [k, D] at prompt i's placeholders."""
    ids = torch.tensor([p.ids for p in prompts], device=device)
    if rows is None:
        return text_encoder(ids)[0]
    where = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        where[i, p.placeholders] = True
    with placeholder_rows(text_encoder, where, torch.cat(list(rows))):
        return text_encoder(ids)[0]


# =========================================================================== the loss


def resteer_loss(store: Sequence[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, per-sample L_b) from the recorded attn2 probabilities ([B·heads, N, 77] each, batch-major) and
    the token sets ``mask`` [B, 77]: L_b = sqrt(Σ_l Σ_h Σ_p Σ_{s∈S_b} a²), L = sqrt(Σ_b L_b²) — one global
    unsquared L2 norm, as ``torch.cat(selected).norm()`` in train_attn.py. Summed in fp32."""
    b = mask.shape[0]
    m = mask.to(torch.float32)[:, None, None, :]
    sq = sum(((p.float().view(b, -1, p.shape[1], p.shape[2]) ** 2) * m).sum((1, 2, 3)) for p in store)
    return sq.sum().sqrt(), sq.sqrt()


def norm_decay(rows: torch.Tensor, lr: float, target: float) -> torch.Tensor:
    """clip_ti_decay: each row keeps its direction, its norm n becomes n + λ(target − n), λ = min(1, 100·lr)."""
    lam = min(1.0, 100.0 * lr)
    n = rows.norm(dim=-1, keepdim=True)
    return F.normalize(rows, dim=-1) * (n + lam * (target - n))


# =========================================================================== training images


def image_seed(hp: Hparams, name: str) -> int:
    return int(hashlib.sha256(f"fmn:{hp.train_images_seed}:{name}".encode()).hexdigest()[:8], 16) % (2 ** 31)


@torch.no_grad()
def concept_images(pipe, name: str, hp: Hparams, device) -> tuple[torch.Tensor, dict]:
    """``n_images`` of the concept from the unedited model (the engine's sampler, one seed per concept):
    [N, 3, H, W] in [-1, 1], quantised to 8 bits as photos are."""
    from cpebench.config import ProtocolConfig
    from cpebench.data import PromptRecord
    from cpebench.engine import Engine, WorkItem

    prompt, seed = DATA_PROMPTS[hp.concept_type].format(name), image_seed(hp, name)
    protocol = ProtocolConfig(model="base", scheduler=hp.data_scheduler, steps=hp.data_steps, guidance=hp.data_guidance,
                              height=hp.resolution, width=hp.resolution)
    engine = Engine(pipe, protocol, device=device, batch_size=hp.data_batch_size, progress=False)
    row = PromptRecord(id="0", prompt=prompt, seed=seed, guidance=None, split="fmn-train", concept=name)
    items = [WorkItem("fmn-train", row, i, hp.n_images, "", hp.data_guidance) for i in range(hp.n_images)]
    chunks = [torch.from_numpy(engine.denoise(items[i : i + hp.data_batch_size])[0])
              for i in range(0, len(items), hp.data_batch_size)]
    images = torch.cat(chunks).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, {"prompt": prompt, "seed": seed, "n": hp.n_images, "scheduler": hp.data_scheduler,
                    "steps": hp.data_steps, "guidance": hp.data_guidance, "resolution": hp.resolution}


@torch.no_grad()
def posterior(vae, images: torch.Tensor, device, batch: int = VAE_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of every image: a latent is mean + std·ε (``latent_dist.sample()``).
    Encoded ``batch`` images at a time: a multi-concept run holds n_images per concept (400 for 50
    celebrities), and at 512² each image's full-resolution encoder activations are 128 channels × 512² floats
    (134 MB in fp32) per live tensor (arithmetic, not a measurement), so one call on all of them would not fit."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch].to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


class Draws:
    """A seeded stream of (image index, t, latent noise, ε) as the official loops draw them: shuffled
    epochs over the images (DataLoader shuffle), t ~ U{0..T−1}."""

    def __init__(self, n: int, seed: int, steps_t: int):
        self.n, self.steps_t = n, steps_t
        self.gen = torch.Generator("cpu").manual_seed(seed)
        self.order: list[int] = []

    def image(self) -> int:
        if not self.order:
            self.order = torch.randperm(self.n, generator=self.gen).tolist()
        return self.order.pop(0)

    def noisy(self, ddpm, mean: torch.Tensor, std: torch.Tensor, scaling: float):
        """(x_t, t, ε, z0) of one latent: z0 = (mean + std·ε_vae)·scaling."""
        t = int(torch.randint(self.steps_t, (1,), generator=self.gen))
        z0 = (mean + std * torch.randn(mean.shape, generator=self.gen).to(mean.device)) * scaling
        eps = torch.randn(z0.shape, generator=self.gen).to(z0.device)
        tt = torch.tensor([t], device=z0.device)
        return ddpm.add_noise(z0, eps, tt), t, eps, z0

    def state(self) -> tuple[torch.Tensor, list[int]]:
        return self.gen.get_state(), list(self.order)

    def restore(self, rng: torch.Tensor, order: Sequence[int]) -> None:
        self.gen.set_state(rng)
        self.order = list(order)


# =========================================================================== stage A: textual inversion


def initial_rows(tokenizer, table: torch.Tensor, name: str, hp: Hparams, gen: torch.Generator) -> torch.Tensor:
    """The placeholder rows' start (train_ti.py get_models): a one-token word → a copy of its row, a token id →
    that row, '<zero>' → 0, '<rand-σ>' → N(0, 1)·σ. ``name``: the name's first tokens, then '<rand-1>' (for
    "elon musk" the official 'elon|musk|<rand-1>|<rand-1>')."""
    init = hp.initializers()
    if init is None:
        ids = [str(i) for i in tokenizer(name, add_special_tokens=False).input_ids]
        init = (ids[: hp.ti_tokens] + ["<rand-1>"] * hp.ti_tokens)[: hp.ti_tokens]
    rows = []
    for x in init:
        m = re.fullmatch(r"<rand-([0-9.eE+-]+)>", x)
        if m:
            rows.append(torch.randn(table.shape[1], generator=gen) * float(m.group(1)))
        elif x == "<zero>":
            rows.append(torch.zeros(table.shape[1]))
        elif x.isnumeric():
            rows.append(table[int(x)].detach().float().cpu())
        else:
            ids = tokenizer(x, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ConfigError(f"fmn: hparams.ti_init {x!r} is {len(ids)} tokens; an initialiser must be one token")
            rows.append(table[ids[0]].detach().float().cpu())
    return torch.stack(rows)


class Resumable:
    """A stage's resumable state: its own tensors plus the step reached and the losses so far."""

    step_done: int
    losses: list

    def save_with_progress(self, path: Path, key: str, tensors: dict, **meta) -> None:
        save_state(path, key, tensors, {"step": str(self.step_done), "losses": json.dumps(self.losses),
                                        **{k: json.dumps(v) for k, v in meta.items()}})

    def load_with_progress(self, path: Path | None, key: str) -> tuple[dict, dict] | None:
        saved = load_state(path, key, "fmn")
        if saved is not None:
            self.step_done, self.losses = int(saved[1]["step"]), json.loads(saved[1]["losses"])
        return saved


@dataclass
class InversionJob:
    index: int           # the concept's index (names its state)
    name: str
    images: torch.Tensor


class Inversion(Resumable):
    """Stage A for a group of concepts in one batched forward: sample j = concept j with its own rows; the
    loss is Σ_j mean-MSE_j, so each concept's rows get exactly their own gradient."""

    def __init__(self, pipe, text_encoder, jobs: Sequence[InversionJob], hp: Hparams, device):
        from diffusers import DDPMScheduler

        self.pipe, self.text_encoder, self.jobs, self.hp, self.device = pipe, text_encoder, list(jobs), hp, device
        self.ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prompt = ti_prompt(pipe.tokenizer, hp)
        table = text_encoder.get_input_embeddings().weight
        self.draws = [Draws(len(j.images), hp.ti_seed, self.ddpm.config.num_train_timesteps) for j in self.jobs]
        self.rows = [torch.nn.Parameter(initial_rows(pipe.tokenizer, table, j.name, hp, d.gen).to(device))
                     for j, d in zip(self.jobs, self.draws)]
        self.opt = torch.optim.AdamW(self.rows, lr=hp.ti_lr, betas=BETAS, eps=EPS, weight_decay=hp.ti_weight_decay)
        # posteriors of each image and its mirror image (flip before the VAE, as the dataset does)
        self.latents = [posterior(pipe.vae, torch.cat([j.images, j.images.flip(-1)]), device) for j in self.jobs]
        self.step_done = 0
        self.losses: list[list[float]] = [[] for _ in self.jobs]

    def draw(self, j: int):
        d, (mean, std) = self.draws[j], self.latents[j]
        i = d.image()
        if self.hp.ti_hflip and float(torch.rand((), generator=d.gen)) < 0.5:
            i += len(self.jobs[j].images)
        return d.noisy(self.ddpm, mean[i : i + 1], std[i : i + 1], self.pipe.vae.config.scaling_factor)

    def target(self, eps, z0, t):
        if self.ddpm.config.prediction_type == "v_prediction":
            return self.ddpm.get_velocity(z0, eps, t)
        return eps

    def step(self) -> list[float]:
        draws = [self.draw(j) for j in range(len(self.jobs))]
        xt = torch.cat([d[0] for d in draws])
        t = torch.tensor([d[1] for d in draws], device=self.device)
        target = torch.cat([self.target(d[2], d[3], t[j : j + 1]) for j, d in enumerate(draws)])
        with torch.enable_grad():
            ctx = encode(self.text_encoder, [self.prompt] * len(self.jobs), self.rows, self.device)
            pred = self.pipe.unet(xt, t, encoder_hidden_states=ctx.to(self.pipe.unet.dtype), return_dict=False)[0]
            losses = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
            self.opt.zero_grad(set_to_none=True)
            losses.sum().backward()
        self.opt.step()
        if self.hp.ti_norm_decay:
            with torch.no_grad():
                for r in self.rows:
                    r.copy_(norm_decay(r, self.hp.ti_lr, self.hp.ti_norm_target))
        self.step_done += 1
        values = [float(v) for v in losses.detach()]
        for j, v in enumerate(values):
            self.losses[j].append(v)
        return values

    # ---- resumable state

    def save(self, path: Path, key: str) -> None:
        tensors, orders = {}, []
        for j, (r, d) in enumerate(zip(self.rows, self.draws)):
            tensors[f"rows.{j}"] = r
            tensors.update(optimizer_tensors(self.opt, r, f"adam.{j}"))
            tensors[f"rng.{j}"], order = d.state()
            orders.append(order)
        self.save_with_progress(path, key, tensors, orders=orders)

    def load(self, path: Path | None, key: str) -> bool:
        saved = self.load_with_progress(path, key)
        if saved is None:
            return False
        tensors, meta = saved
        orders = json.loads(meta["orders"])
        for j, (r, d) in enumerate(zip(self.rows, self.draws)):
            with torch.no_grad():
                r.copy_(tensors[f"rows.{j}"])
            restore_optimizer(self.opt, r, tensors, f"adam.{j}")
            d.restore(tensors[f"rng.{j}"], orders[j])
        return True


def optimizer_tensors(opt, p: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)) for k, v in opt.state.get(p, {}).items()}


def restore_optimizer(opt, p: torch.Tensor, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    if state:   # AdamW keeps "step" on the CPU and the moments on the parameter's device
        opt.state[p] = {k: (v if k == "step" else v.to(p.device)) for k, v in state.items()}


@contextlib.contextmanager
def frozen(*modules):
    """requires_grad off on every parameter of ``modules`` (restored on exit)."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def invert(pipe, text_encoder, jobs: Sequence[InversionJob], hp: Hparams, device, workdir, progress: bool
           ) -> tuple[list[torch.Tensor], list[list[float]]]:
    """Stage A for ``jobs`` (one group); state saved every ``save_every`` steps and at the end."""
    from tqdm.auto import tqdm

    inv = Inversion(pipe, text_encoder, jobs, hp, device)
    what = ("concept_type", "ti_", "n_images", "resolution", "data_", "train_images_seed")
    key = json.dumps({"ti": {k: v for k, v in hp.fingerprinted().items() if k.startswith(what)},
                      "names": [j.name for j in jobs]}, sort_keys=True, default=str)
    path = Path(workdir) / f"fmn-ti-{jobs[0].index:04d}.safetensors" if workdir else None
    if inv.load(path, key):
        log.info("fmn: TI of %s resumed at step %d", [j.name for j in jobs], inv.step_done)
    desc = f"fmn TI {jobs[0].name}" + (f" +{len(jobs) - 1}" if len(jobs) > 1 else "")
    with frozen(pipe.unet, text_encoder, pipe.vae), tqdm(total=hp.ti_steps, initial=inv.step_done, desc=desc,
                                                           unit="step", disable=not progress, leave=False) as bar:
        while inv.step_done < hp.ti_steps:
            losses = inv.step()
            bar.update(1)
            bar.set_postfix_str(f"loss {sum(losses) / len(losses):.4g}")
            if path and (inv.step_done % hp.save_every == 0 or inv.step_done == hp.ti_steps):
                inv.save(path, key)
    return [r.detach().cpu().clone() for r in inv.rows], inv.losses


# =========================================================================== stage B: attention re-steering


def trained_names(unet, params: str) -> list[str]:
    names = [n for n, _ in unet.named_parameters()]
    return names if params == "unet" else [n for n in names if "attn2" in n]


class Resteering(Resumable):
    """Stage B on ``unet`` (modified in place while training; ``close`` puts the original tensors back):
    the trained parameters get fresh copies, the originals are kept to restore and to diff against."""

    def __init__(self, unet, vae, ddpm, contexts: torch.Tensor, masks: torch.Tensor, latents, concept_of: Sequence[int],
                 hp: Hparams, device):
        self.unet, self.ddpm, self.hp, self.device = unet, ddpm, hp, device
        self.contexts, self.masks, (self.mean, self.std) = contexts, masks, latents
        self.concept_of, self.scaling = list(concept_of), vae.config.scaling_factor
        self.copy = TrainableCopy(unet, trained_names(unet, hp.params), gradient_checkpointing=hp.gradient_checkpointing)
        self.names, self.params, self.frozen = self.copy.names, self.copy.params, self.copy.frozen
        self.opt = torch.optim.AdamW(self.params, lr=hp.lr, betas=BETAS, eps=EPS, weight_decay=hp.weight_decay)
        self.clip = hp.clip_grad == "always" or (hp.clip_grad == "official" and hp.params == "attn2")
        self.draws = Draws(len(self.concept_of), hp.seed, ddpm.config.num_train_timesteps)
        self.step_done, self.losses = 0, []

    def batch(self):
        picks = [self.draws.image() for _ in range(self.hp.batch_size)]
        noisy = [self.draws.noisy(self.ddpm, self.mean[i : i + 1], self.std[i : i + 1], self.scaling) for i in picks]
        concepts = [self.concept_of[i] for i in picks]
        return (torch.cat([x[0] for x in noisy]), torch.tensor([x[1] for x in noisy], device=self.device),
                self.contexts[concepts], self.masks[concepts])

    def loss(self, xt, t, context, mask) -> tuple[torch.Tensor, torch.Tensor]:
        with probed(self.unet) as store:
            self.unet(xt, t, encoder_hidden_states=context, return_dict=False)
        return resteer_loss(store, mask)

    def step(self) -> float:
        xt, t, context, mask = self.batch()
        with torch.enable_grad():
            loss, _ = self.loss(xt, t, context, mask)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.hp.max_grad_norm)
        self.opt.step()
        self.step_done += 1
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def trained(self) -> dict[str, torch.Tensor]:
        """The trained tensors that differ from the originals (CPU, float32)."""
        return {n: p.detach().float().cpu().clone() for n, p in zip(self.names, self.params)
                if not torch.equal(p.data, self.frozen[n])}

    def close(self) -> None:
        self.copy.close()
        self.opt.state.clear()

    def save(self, path: Path, key: str) -> None:
        tensors = training_tensors(self.opt, dict(zip(self.names, self.params)))
        tensors["rng"], order = self.draws.state()
        self.save_with_progress(path, key, tensors, order=order)

    def load(self, path: Path | None, key: str) -> bool:
        saved = self.load_with_progress(path, key)
        if saved is None:
            return False
        tensors, meta = saved
        restore_training(self.opt, dict(zip(self.names, self.params)), tensors)
        self.draws.restore(tensors["rng"], json.loads(meta["order"]))
        return True


def resteer_step(trainer: Resteering) -> float:
    """One stage-B step (a seam for tests that interrupt training)."""
    return trainer.step()


# =========================================================================== the whole erase


def fp32(module):
    """The module itself in fp32, or an fp32 copy (the official code trains in fp32)."""
    import copy

    return module if module.dtype == torch.float32 else copy.deepcopy(module).float()


def train(pipe, names: Sequence[str], hp: Hparams, ctx: EraseContext) -> tuple[dict, dict]:
    """Both stages; returns (changed UNet tensors, metadata). ``pipe`` is left as it was."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    device = torch.device(ctx.device)
    seconds: dict[str, float] = {}
    mark = time.perf_counter()
    prompts = None if hp.use_ti else [plain_prompt(pipe.tokenizer, hp, n) for n in names]   # fail early
    data = [concept_images(pipe, n, hp, device) for n in names]
    seconds["images"] = time.perf_counter() - mark
    unet, text_encoder = fp32(pipe.unet), fp32(pipe.text_encoder)
    view = SimpleNamespace(unet=unet, vae=pipe.vae, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler)
    rows, ti_record = None, None
    if hp.use_ti:
        mark = time.perf_counter()
        rows, ti_losses = [], []
        jobs = [InversionJob(i, n, images) for i, (n, (images, _)) in enumerate(zip(names, data))]
        for g in range(0, len(jobs), hp.ti_concepts_per_step):
            r, losses = invert(view, text_encoder, jobs[g : g + hp.ti_concepts_per_step], hp, device, ctx.workdir,
                               ctx.progress)
            rows += r
            ti_losses += losses
        prompts = [ti_prompt(pipe.tokenizer, hp)] * len(names)
        ti_record = {"tokens": hp.ti_tokens, "norms": [[round(float(x), 4) for x in r.norm(dim=-1)] for r in rows],
                     "loss_first": [lo[0] if lo else None for lo in ti_losses],
                     "loss_last": [lo[-1] if lo else None for lo in ti_losses]}
        seconds["textual_inversion"] = time.perf_counter() - mark
    mark = time.perf_counter()
    with torch.no_grad():
        contexts = encode(text_encoder, prompts, [r.to(device) for r in rows] if rows else None, device)
    masks = token_mask(prompts, device)
    latents = posterior(pipe.vae, torch.cat([images for images, _ in data]), device)
    concept_of = [i for i, (images, _) in enumerate(data) for _ in range(len(images))]
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    steps = hp.steps * (len(names) if hp.steps_per_concept else 1)
    trainer = Resteering(unet, pipe.vae, ddpm, contexts.to(unet.dtype), masks, latents, concept_of, hp, device)
    key = json.dumps({"hp": hp.fingerprinted(), "names": list(names), "params": len(trainer.names),
                      "contexts": hashlib.sha256(contexts.float().cpu().numpy().tobytes()).hexdigest()}, sort_keys=True)
    path = Path(ctx.workdir) / STATE_FILE if ctx.workdir else None
    try:
        if trainer.load(path, key):
            log.info("fmn: re-steering resumed at step %d of %d", trainer.step_done, steps)
        with tqdm(total=steps, initial=trainer.step_done, desc=f"fmn {names[0]}" + (f" +{len(names) - 1}" if len(names) > 1 else ""),
                  unit="step", disable=not ctx.progress, dynamic_ncols=True) as bar:
            while trainer.step_done < steps:
                loss = resteer_step(trainer)
                bar.update(1)
                bar.set_postfix_str(f"loss {loss:.4g}")
                if path and trainer.step_done % hp.save_every == 0 and trainer.step_done < steps:
                    trainer.save(path, key)
        tensors = trainer.trained()
        n_trained, numel = len(trainer.names), sum(p.numel() for p in trainer.params)
        losses = trainer.losses
    finally:
        trainer.close()
    seconds["resteering"] = time.perf_counter() - mark
    if steps and not tensors:
        raise CpebenchError(f"fmn: training changed no parameter (lr {hp.lr}, {steps} steps)")
    meta = {
        "label": "FMN (cpebench config)", "base_kv_sha256": base_kv_sha256(pipe.unet),
        "base_kv_checksums": base_kv_checksums(pipe.unet), "resolved_hparams": asdict(hp),
        "trained_parameters": n_trained, "trained_numel": numel, "changed_tensors": len(tensors),
        "changed_numel": sum(t.numel() for t in tensors.values()), "steps": steps,
        "clipped": trainer.clip, "token_sets": [p.positions for p in prompts],
        "training_images": {n: info for n, (_, info) in zip(names, data)}, "textual_inversion": ti_record,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "losses": [round(x, 6) for x in losses],
        "stage_seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    return tensors, meta


# =========================================================================== official output


def load_official(path: Path) -> Artifact:
    """The official output (``pipeline.save_pretrained(output_dir)``: a diffusers pipeline folder) or its
    ``unet`` folder: every UNet tensor, to swap in. The TI tokens in its text encoder are not used
    (cpebench evaluates the plain names)."""
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    files = [unet_dir / f for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
             if (unet_dir / f).exists()]
    if not files:
        raise DataError(f"{path}: neither a cpebench artifact nor an FMN output folder (no unet/"
                        "diffusion_pytorch_model.safetensors or .bin)")
    f = files[0]
    sd = read_state_dict(f)
    return Artifact(method="fmn", tensors={k: v.float().contiguous() for k, v in sd.items()},
                    metadata={"concepts": [], "source": "official output folder", "official_file": str(f)})


# =========================================================================== the method


class FMN(Method):
    name = "fmn"
    version = "1"
    description = ("Forget-Me-Not (CVPRW 2024): textual inversion of the concept, then the whole UNet fine-tuned to "
                   "drive the concept tokens' (and padding's) cross-attention probabilities to zero; defaults = "
                   "configs/attn.yaml + ti.yaml: TI 500 steps lr 1e-3, 35 steps AdamW lr 2e-6, bs 1, no clipping "
                   "(SD-1.4 instead of SD-2.1-base; seeded generated images instead of photos)")
    trains = True
    hparams_class = Hparams
    operational_hparams = ("gradient_checkpointing", "save_every")

    def erase(self, pipe, concepts: Sequence[Concept], hparams: Mapping[str, Any],
              ctx: EraseContext | None = None) -> Artifact:
        names, hp, ctx = erase_inputs(self, pipe, concepts, hparams, ctx)
        started = time.perf_counter()
        tensors, meta = train(pipe, names, hp, ctx)
        meta["seconds"] = round(time.perf_counter() - started, 3)
        meta["storage"] = "float32 new values of every UNet tensor the training changed"
        log.info("fmn: %d concepts, %d changed tensors, %.1f s", len(names), len(tensors), meta["seconds"])
        return Artifact(method=self.name, tensors=tensors, metadata={"concepts": names, **meta})

    def apply(self, pipe, artifact: Artifact):
        # shape checks, the base model's K/V fingerprint, then swapped_weights (own aligned storage, bit-exact exit)
        return weight_edit(pipe.unet, artifact, self.name)

    def load_release(self, path: Path) -> Artifact:
        """The official output folder (see ``load_official``)."""
        return load_official(path)
