"""AdvUnlearn — Defensive Unlearning with Adversarial Training for Robust Concept Erasure (Zhang et al., NeurIPS 2024).

Sources, per-task values and deviations: docs/methods/advunlearn.md. Official code: OPTML-Group/AdvUnlearn@9d23124
(``train-scripts/AdvUnlearn.py`` and ``train-scripts/utils/{attack_util,get_loss,text_encoder,util}.py``).

What is trained: the **text encoder** (``train_method: text_encoder_full`` = every parameter of the 12 encoder
layers plus ``final_layer_norm``; token and position embeddings frozen); the UNet and the VAE never change.
The artifact holds the trained text-encoder tensors; ``apply`` swaps them into ``pipe.text_encoder``
(``cpebench.attention.swapped_weights``), so the prompt *and* the unconditional "" pass through the
unlearned encoder at generation, as the official generation script does.

One iteration (bi-level):

* **attack** (after ``warmup_iter`` iterations, every ``adv_prompt_update_step``): k = ``adv_prompt_num``
  adversarial token embeddings spliced into the concept's token embeddings (``prefix_k``: [SOT | adv | word
  | rest], truncated to 77), optimised for ``attack_step`` Adam steps (lr ``attack_lr``; ``fast_at``: the
  gradient's sign) to *minimise* MSE(ε*(z, t, τ_θ(adv)), ε*(z, t, c_p)): the prompt that makes the current
  encoder bring the concept back. Each step draws its own (t, z); the encoder is frozen meanwhile.
* **unlearn**: L = MSE(ε*(z, t, τ_θ(ẽ)), ε₀ − η(ε_p − ε₀)) + γ·MSE(ε*(z_r, t, τ_θ(retain)), ε*(z_r, t, c_r)),
  ẽ = the clean word during warm-up, the adversarial prompt afterwards; B_r retain prompts drawn without
  replacement (the pool resets when fewer than B_r remain); one Adam step on θ.

z is ESD's x_t: DDIM (η 0) from N(0, I) at CFG ``start_guidance`` on the *original* encoder's c_p, stopped
early with the official sampler's offset (981 skipped, break after index t_enc−1); t ~ U[20 t_enc, 20(t_enc+1)).
ε* is the frozen UNet; c_p, c_0, c_r come from the original encoder.

Design (the same draws as the official loop, batched):

* Every z, ε₀, ε_p and retain (z_r, ε*(z_r, c_r)) depends only on the frozen UNet and the original encoder,
  never on the encoder being trained. So each iteration's random draws are a pure function of
  (``seed``, iteration), and a **bank** samples the draws of several upcoming iterations together in one
  batched DDIM run (draws stop at their own t_enc: the batch shrinks as they finish), then evaluates the
  frozen targets in one batched pass. The training side then only runs, per attack step, one
  encoder + UNet forward/backward, and per unlearn step one forward/backward of the concept and retain
  prompts together. No second UNet, no UNet gradients. ``sample_batch`` (operational) sets the batch.
* ``autocast: bf16|fp16`` runs only the bank (sampling and frozen targets) in autocast; training stays fp32.
* Resumable: the trained tensors, Adam moments, the latest adversarial vectors, step and losses are saved
  every ``save_every`` iterations in the erase context's workdir; the bank is regenerated from the seed.

Deviations (docs/methods/advunlearn.md; each restorable by a hyperparameter where it changes numbers):

* the attack's missing ``zero_grad`` (gradients accumulate over the attack steps) is fixed:
  ``attack_grad: fresh``; ``accumulate`` is the official behaviour;
* the layer-subset modes (not the paper method) take exactly the named layers; the official
  ``startswith`` match ('layers.1' also takes 10, 11) is ``layer_match: prefix``;
* the official ``--lr`` is ``type=int`` (only the default works); here a float;
* seeded (the official code sets no seed); ``retain_train: iter`` and the ``condition_embd`` attack and the
  ``mid_k``/``insert_k``/``per_k_words`` splices are not implemented (not the paper method).
Kept as official (named options): the attack returns the prompt built before its last update
(``attack_result: before_last_update``), the splice counts words not BPE tokens (``prompt_split: words``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cpebench.attention import swapped_weights
from cpebench.errors import ConfigError, CpebenchError, DataError
from cpebench.methods import (Artifact, Concept, EraseContext, Method, checksums_agree, read_state_dict,
                              weight_checksum)
from cpebench.methods.common import (CheckedHparams, check_at_least_one, check_choices, erase_inputs, load_state,
                                     restore_training, save_state, text_list, train_resumable, training_tensors)

log = logging.getLogger(__name__)

STATE_FILE = "advunlearn-state.safetensors"

# data/prompts/train/coco_object_retain.csv of the official repository (the README's --dataset_retain
# coco_object): 243 rows "a photo of <object>", 237 distinct; duplicates kept, as the pool samples rows.
_COCO_OBJECTS = (
    "chair, fridge, banana, street sign, headlights, printer, handbag, skis, skateboard, chopping board, goat, "
    "playing cards, tire, toy cars, box, pasta, moon, basketball, radio, ipad, goldfish, jetpack, bicycle, "
    "couch, microwave, bread, umbrella, window, teddy bear, pans, hot dog, snowboard, helicopter, washer, "
    "magazine, home, phone, towel, necklace, bracelet, platypus, grapes, road, telephone, fences, aardvark, "
    "iphone, robot, car, potted plant, sink, apple, scissors, door, desk, tie, stapler, table, lamp, tomato, "
    "lion, key, Pig, hyppo, tablet, bat, pancake, shark, fountain, movie, goal net, dinosaur, hoop, crusher, "
    "motorcycle, tv, oven, book, keyboard, fire hydrant, computer, stop sign, sports ball, basketball, hoop, "
    "egg, tree, monkey, frame, strawberries, can, corn, balloon, cabinet, swan, fax machine, football, toys, "
    "unicycle, hen, animal crackers, bird, cow, toaster, boat, backpack, traffic light, bowl, refrigerator, "
    "surfboard, broccoli, donut, door handle, hair brush, cupcake, pumpkin, dollar bill, ladder, gloves, whale, "
    "bat, goose, engine, honey, basketball court, cat, airplane, bus, plate, steering wheel, eyeglasses, teapot, "
    "pizza, sandwich, suitcase, vase, power, outlet, pillow, light switch, fan, van, doll, pineapple, milk, "
    "dryer, towel, hot air balloon, soccer ball, legos, table cloth, horn, dog, hat, train, cell phone, "
    "wine glass, cup, fork, squirrel, pen, carrot, baseball bat, tennis racket, frogs, kangaroo, soup, candle, "
    "side table, cereal, field goal posts, fly, soccer nets, firefly, horse, license plate, mirror, mouse, "
    "chicken, blender, knife, duck, kite, chandelier, baseball glove, tiger, cake, rhinoceros, meat, desktop, "
    "wheelchair, lizard, gate, seahorse, raft, roof, turkey, sheep, bed, dining table, remote, zebra, "
    "hair drier, spoon, frisbee, orange, parking meter, giraffe, table, house, owl, sailboat, window, carpet, "
    "building, beans, rocket, rooster, tennis net, baseball, nectar, bottle, laptop, elephant, clock, wheel, "
    "bear, guitar, toothbrush, fish, jacket, coffee table, bench, cheese, scarf, deer, muffins, cookie, bacon, "
    "cabinets, copier, seats, mat"
)
RETAIN_SETS = {"coco_object": tuple(f"a photo of {o.strip()}" for o in _COCO_OBJECTS.split(","))}

# The official train_method choices for the text encoder -> the encoder layers each trains (util.py
# param_choices). ``text_encoder_full`` also trains final_layer_norm under component 'all'.
LAYER_MODES = {
    "text_encoder_full": tuple(range(12)),
    **{"text_encoder_layer" + "".join(map(str, range(n + 1))): tuple(range(n + 1)) for n in range(12)},
    "text_encoder_layer0_11": (0, 11),
    "text_encoder_layer01_1011": (0, 1, 10, 11),
    "text_encoder_layer012_91011": (0, 1, 2, 9, 10, 11),
}
CHOICES = {
    "component": ("all", "ffn", "attn"), "layer_match": ("prefix", "exact"), "retain_train": ("reg",),
    "attack_method": ("pgd", "fast_at"), "attack_type": ("prefix_k", "suffix_k", "replace_k", "add"),
    "attack_init": ("random", "latest"), "attack_grad": ("fresh", "accumulate"),
    "attack_result": ("before_last_update", "last_update"), "prompt_split": ("words", "tokens"),
    "autocast": ("none", "bf16", "fp16"),
}


# =========================================================================== hyperparameters


@dataclass(frozen=True)
class Hparams(CheckedHparams):
    """benchmarks/methods/advunlearn.yaml gives every value and its source (argparse of AdvUnlearn.py, the README
    command, GitHub issue 7)."""

    method_name: ClassVar[str] = "advunlearn"

    train_method: str = "text_encoder_full"
    component: str = "all"               # all | ffn | attn
    norm_layer: bool = False             # --norm_layer: final_layer_norm also in the layer-subset modes
    layer_match: str = "exact"           # exact (the intended layers) | prefix (official startswith: layers.1 also takes 10, 11)
    iterations: int = 1000
    lr: float = 1.0e-5
    start_guidance: float = 3.0          # CFG of the x_t sampling
    negative_guidance: float = 1.0       # η of the target ε₀ − η(ε_p − ε₀)
    ddim_steps: int = 50
    image_size: int | None = None        # None: the UNet's sample_size × 8 (512 for SD-1.x)
    retain_prompts: Any = "coco_object"  # a named official set, a list, or {file: <data file>, column: <name>}
    retain_batch: int = 5
    retain_loss_w: float = 0.3           # γ
    retain_train: str = "reg"            # reg (the README); 'iter' is not implemented
    warmup_iter: int = 200
    adv_prompt_update_step: int = 1
    adv_prompt_num: int = 1              # k
    attack_method: str = "pgd"           # pgd (Adam step) | fast_at (Adam step on the gradient's sign)
    attack_type: str = "prefix_k"
    attack_init: str = "random"
    attack_step: int = 30
    attack_lr: float = 1.0e-3
    attack_grad: str = "fresh"           # fresh (intended) | accumulate (official: no zero_grad)
    attack_result: str = "before_last_update"   # official | last_update
    prompt_split: str = "words"          # words (official len(word.split())) | tokens (BPE tokens)
    seed: int = 0
    autocast: str = "none"               # none | bf16 | fp16: the bank (sampling, frozen targets) only
    sample_batch: int = 128              # operational: draws per batched sampling run
    save_every: int = 50                 # operational: resumable state every N iterations

    def check(self, method: str) -> None:
        if self.train_method not in LAYER_MODES:
            raise ConfigError(f"{method}: hparams.train_method must be one of {', '.join(LAYER_MODES)} (the text-encoder "
                              f"modes of the official code; its UNet modes are ESD), got {self.train_method!r}")
        check_choices(method, self, CHOICES, {"retain_train": " ('iter', a separate retain step after each update, is the "
                                              "argparse default but not the README's; it is not implemented)"})
        check_at_least_one(method, self, ("iterations", "retain_batch", "adv_prompt_update_step", "adv_prompt_num",
                                          "attack_step", "sample_batch", "save_every"))
        for key in ("lr", "attack_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{method}: hparams.{key} must be > 0, got {getattr(self, key)}")
        if self.warmup_iter < 0 or self.retain_loss_w < 0:
            raise ConfigError(f"{method}: hparams.warmup_iter and hparams.retain_loss_w must be >= 0")
        if not 2 <= self.ddim_steps <= 1000:
            raise ConfigError(f"{method}: hparams.ddim_steps must be in 2..1000, got {self.ddim_steps}")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"{method}: hparams.image_size must be >= 8 or null, got {self.image_size}")
        spec = self.retain_prompts
        if isinstance(spec, str) and spec not in RETAIN_SETS:
            raise ConfigError(f"{method}: hparams.retain_prompts {spec!r} is not a named retain set "
                              f"({', '.join(RETAIN_SETS)}); give a list of prompts or {{file: ..., column: ...}}")

    def fingerprinted(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in AdvUnlearn.operational_hparams}


def retain_texts(hp: Hparams, data_dir) -> list[str]:
    spec = hp.retain_prompts
    texts = list(RETAIN_SETS[spec]) if isinstance(spec, str) else text_list("advunlearn", spec, "retain_prompts",
                                                                             data_dir, blanks=False)
    if not texts and hp.retain_loss_w > 0:
        raise ConfigError("advunlearn: hparams.retain_prompts is empty but retain_loss_w > 0")
    return texts


# =========================================================================== what is trained


def _encoder_root(text_encoder) -> tuple[str, torch.nn.Module]:
    """(name prefix, module holding embeddings/encoder/final_layer_norm): transformers 4 nests them in
    ``text_model``, transformers 5 puts them on the CLIPTextModel itself."""
    inner = getattr(text_encoder, "text_model", None)
    return ("text_model.", inner) if inner is not None else ("", text_encoder)


def trained_names(text_encoder, hp: Hparams) -> list[str]:
    """The parameter names ``param_choices`` selects, as names of ``text_encoder``."""
    prefix, _ = _encoder_root(text_encoder)
    layers = LAYER_MODES[hp.train_method]
    full = hp.train_method == "text_encoder_full"
    out = []
    for name, _ in text_encoder.named_parameters():
        local = name[len(prefix):]
        if local.startswith("final_layer_norm"):
            if (full and hp.component == "all") or hp.norm_layer:
                out.append(name)
            continue
        if not local.startswith("encoder.layers."):
            continue                     # token and position embeddings stay frozen
        if not full:
            number = local.split(".")[2]
            hit = (any(number.startswith(str(n)) for n in layers) if hp.layer_match == "prefix"
                   else int(number) in layers)
            if not hit:
                continue
        if hp.component == "all" or (hp.component == "ffn" and ".mlp." in local) or (
                hp.component == "attn" and ".self_attn." in local):
            out.append(name)
    return out


# =========================================================================== the encoder fed with token embeddings


@contextlib.contextmanager
def token_embeddings(text_encoder, embeds: torch.Tensor):
    """Inside, the encoder's token lookup returns ``embeds`` [B, 77, D] (the official CustomTextEncoder's
    ``inputs_embeds``): position embeddings, causal mask, layers and final LN run as usual."""
    handle = text_encoder.get_input_embeddings().register_forward_hook(lambda module, inputs, output: embeds)
    try:
        yield
    finally:
        handle.remove()


def encode_embeds(text_encoder, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """Last hidden states of the encoder on token embeddings ``embeds`` (``ids`` only give the shape)."""
    with token_embeddings(text_encoder, embeds):
        return text_encoder(ids)[0]


@dataclass
class Word:
    """A concept's tokens and token embeddings, split as ``split_embd`` does: [SOT | n | k | rest]."""

    ids: torch.Tensor        # [1, 77]
    embeds: torch.Tensor     # [1, 77, D] (frozen token table rows)
    n: int                   # words (official) or BPE tokens counted as the prompt's length

    def pieces(self, k: int):
        n = self.n
        e = self.embeds
        return e[:, :1], e[:, 1 : 1 + n], e[:, 1 + n + k :]


def make_words(tokenizer, table: torch.Tensor, names: Sequence[str], hp: Hparams) -> list[Word]:
    ids = tokenizer(list(names), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    words = []
    for i, name in enumerate(names):
        n_tokens = int(ids.attention_mask[i].sum()) - 2
        n = len(name.split()) if hp.prompt_split == "words" else n_tokens
        k = n if hp.attack_type == "add" else hp.adv_prompt_num
        if 1 + n + k > ids.input_ids.shape[1] - 1:
            raise ConfigError(f"advunlearn: concept {name!r} ({n} words/tokens) leaves no room for {k} adversarial tokens")
        row = ids.input_ids[i : i + 1].to(table.device)
        words.append(Word(row, F.embedding(row, table), n))
    return words


def adversarial_prompt(word: Word, adv: torch.Tensor, attack_type: str) -> torch.Tensor:
    """The concept's token embeddings with the adversarial vectors ``adv`` [1, k, D] spliced in (77 rows)."""
    k = adv.shape[1]
    sot, mid, rest = word.pieces(k)
    if attack_type == "prefix_k":
        return torch.cat([sot, adv, mid, rest], 1)
    if attack_type == "suffix_k":
        return torch.cat([sot, mid, adv, rest], 1)
    if attack_type == "replace_k":     # the word's rows become copies of the first row after the removed k
        return torch.cat([sot, adv, rest[:, :1].expand(-1, mid.shape[1], -1), rest], 1)
    if attack_type == "add":           # k = n: a perturbation added to the word's rows
        return torch.cat([sot, adv + mid, rest[:, :1].expand(-1, k, -1), rest], 1)
    raise ConfigError(f"advunlearn: unknown attack_type {attack_type!r}")


# =========================================================================== the random draws


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2 ** 63 - 1)


@dataclass
class Draw:
    t_enc: int
    t: int
    noise: torch.Tensor      # [n, C, h, w] float32 CPU (n = 1, or the retain batch)


@dataclass
class Plan:
    """Iteration i's random draws: a pure function of (seed, i), so a resumed run draws the same."""

    word: int
    init_ids: torch.Tensor | None      # [k] vocabulary ids (random attack init), None: no attack this iteration
    attack: list[Draw]
    unlearn: Draw
    retain: Draw | None                # same t_enc and t as ``unlearn``, fresh noise
    retain_rows: list[int]


class Draws:
    """Plans of the iterations, from per-iteration CPU generators (device-independent)."""

    def __init__(self, hp: Hparams, n_words: int, n_retain: int, latent_shape: tuple, vocab: int, k: int, T: int):
        self.hp, self.n_words, self.n_retain, self.shape, self.vocab, self.k, self.T = (
            hp, n_words, n_retain, latent_shape, vocab, k, T)

    def attacks(self, i: int) -> bool:
        return i >= self.hp.warmup_iter and i % self.hp.adv_prompt_update_step == 0

    def _timestep(self, g) -> tuple[int, int]:
        S, T = self.hp.ddim_steps, self.T
        t_enc = int(torch.randint(S, (1,), generator=g))
        t = int(torch.randint(round(t_enc / S * T), round((t_enc + 1) / S * T), (1,), generator=g))
        return t_enc, t

    def word(self, i: int) -> int:
        """The concept of iteration i: drawn at each update round (``--seperator``), kept in between."""
        g = torch.Generator().manual_seed(_seed(self.hp.seed, "iteration", i - i % self.hp.adv_prompt_update_step))
        return int(torch.randint(self.n_words, (1,), generator=g))

    def retain_rows(self, i: int) -> list[int]:
        """Rows of iteration i's retain batch: without replacement, the pool reset when fewer than B remain
        (``PromptDataset``): epoch e is a seeded permutation, cut into N // B batches."""
        n, b = self.n_retain, self.hp.retain_batch
        if n == 0:
            return []
        if n < b:
            return list(range(n))
        per_epoch = n // b
        epoch, pos = divmod(i, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.hp.seed, "retain", epoch)))
        return perm[pos * b : (pos + 1) * b].tolist()

    def plan(self, i: int) -> Plan:
        hp = self.hp
        g = torch.Generator().manual_seed(_seed(hp.seed, "iteration", i))
        # Every iteration's stream starts with the concept draw (used only where an update round starts; ``word``
        # re-draws it from the round's first iteration), so the draws below have the same place in every stream.
        torch.randint(self.n_words, (1,), generator=g)
        word = self.word(i)
        init_ids, attack = None, []
        if self.attacks(i):
            init_ids = torch.randint(self.vocab, (self.k,), generator=g)
            for _ in range(hp.attack_step):
                t_enc, t = self._timestep(g)
                attack.append(Draw(t_enc, t, torch.randn((1, *self.shape), generator=g)))
        t_enc, t = self._timestep(g)
        unlearn = Draw(t_enc, t, torch.randn((1, *self.shape), generator=g))
        rows = self.retain_rows(i)
        retain = Draw(t_enc, t, torch.randn((len(rows), *self.shape), generator=g)) if rows else None
        return Plan(word, init_ids, attack, unlearn, retain, rows)

    def size(self, i: int) -> int:
        """Samples the bank draws for iteration i."""
        n_retain = min(self.hp.retain_batch, self.n_retain) if self.hp.retain_loss_w > 0 else 0
        return (self.hp.attack_step if self.attacks(i) else 0) + 1 + n_retain

    def chunks(self, iterations: int, limit: int) -> list[int]:
        """Start iteration of each bank chunk: consecutive iterations with at most ``limit`` samples (at least
        one iteration). Fixed from iteration 0, so a resumed run samples the same batches."""
        starts, used = [0], 0
        for i in range(iterations):
            s = self.size(i)
            if used and used + s > limit:
                starts.append(i)
                used = 0
            used += s
        return starts


# =========================================================================== the bank: x_t and frozen targets, batched


def ldm_abar(scheduler_config: Mapping) -> list[float]:
    """ᾱ_t as CompVis LDM computes it (β = linspace(√β₀, √β₁, T)², float64, stored float32)."""
    cfg = dict(scheduler_config)
    T = int(cfg.get("num_train_timesteps", 1000))
    b0, b1 = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012))
    if cfg.get("beta_schedule") == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float64) ** 2
    elif cfg.get("beta_schedule") == "linear":
        betas = torch.linspace(b0, b1, T, dtype=torch.float64)
    else:
        raise ConfigError(f"advunlearn: scheduler beta_schedule {cfg.get('beta_schedule')!r} is not an SD-1.x schedule")
    return torch.cumprod(1.0 - betas, 0).float().tolist()


@dataclass
class Sample:
    """One x_t to draw: its noise, stop, timestep and concept context; what the frozen model gives for it."""

    noise: torch.Tensor      # [C, h, w]
    t_enc: int
    t: int
    context: torch.Tensor    # [77, D], original encoder
    with_uncond: bool        # the ESD target needs ε₀ too
    z: torch.Tensor | None = None
    e_c: torch.Tensor | None = None
    e_0: torch.Tensor | None = None


class Bank:
    """Batched ESD x_t sampling (DDIM η 0, CFG ``start_guidance``, the official early stop) and frozen-UNet
    targets, for many draws at once."""

    def __init__(self, unet, uncond: torch.Tensor, hp: Hparams, abar: Sequence[float]):
        self.unet, self.uncond, self.hp, self.abar = unet, uncond, hp, list(abar)
        self.device = next(unet.parameters()).device
        S, T = hp.ddim_steps, len(self.abar)
        self.ts = [t + 1 for t in range(0, T, T // S)]          # CompVis 'uniform' DDIM timesteps (1 .. 981)
        self.seconds = 0.0

    def _amp(self):
        if self.hp.autocast == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.hp.autocast == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The frozen UNet in slices of 2·sample_batch rows."""
        step = 2 * self.hp.sample_batch
        out = [self.unet(x[i : i + step], t[i : i + step], encoder_hidden_states=context[i : i + step],
                         return_dict=False)[0].float() for i in range(0, x.shape[0], step)]
        return torch.cat(out)

    @torch.no_grad()
    def fill(self, samples: Sequence[Sample]) -> None:
        started = time.perf_counter()
        # The official sampler skips ts[-1] (t_start=-1) and breaks after index max(t_enc-1, 0); ᾱ_prev of index 0 is
        # ᾱ_0. Every draw walks the same indices from len(ts)-2 down to its stop: sorted by stop, the draws still
        # running at index j are a prefix.
        order = sorted(range(len(samples)), key=lambda i: max(samples[i].t_enc - 1, 0))
        stops = [max(samples[i].t_enc - 1, 0) for i in order]
        x = torch.stack([samples[i].noise for i in order]).to(self.device)
        cond = torch.stack([samples[i].context for i in order]).to(self.device)
        s = self.hp.start_guidance
        with self._amp():
            for j in range(len(self.ts) - 2, -1, -1):
                m = sum(1 for st in stops if st <= j)
                if m == 0:
                    break
                t = torch.full((2 * m,), self.ts[j], device=self.device, dtype=torch.long)
                xa = x[:m]
                e_u, e_c = self._eps(torch.cat([xa, xa]), t, torch.cat([self.uncond.expand(m, -1, -1), cond[:m]])).chunk(2)
                a_t, a_prev = self.abar[self.ts[j]], self.abar[self.ts[j - 1]] if j > 0 else self.abar[0]
                eps = e_u + s * (e_c - e_u)
                pred_x0 = (xa - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
                x[:m] = math.sqrt(a_prev) * pred_x0 + math.sqrt(1.0 - a_prev) * eps
            # Frozen targets: ε*(z, t, c) for every draw, ε*(z, t, "") where the ESD target needs it.
            unc = [r for r, i in enumerate(order) if samples[i].with_uncond]
            t_all = torch.tensor([samples[i].t for i in order], device=self.device)
            xs = torch.cat([x, x[unc]])
            ts = torch.cat([t_all, t_all[unc]])
            ctx = torch.cat([cond, self.uncond.expand(len(unc), -1, -1)])
            eps = self._eps(xs, ts, ctx)
        n = len(order)
        for r, i in enumerate(order):
            samples[i].z, samples[i].e_c = x[r : r + 1], eps[r : r + 1]
        for r, u in enumerate(unc):
            samples[order[u]].e_0 = eps[n + r : n + r + 1]
        self.seconds += time.perf_counter() - started


# =========================================================================== the trainer


@dataclass
class Work:
    """An iteration's plan with its bank samples filled in."""

    plan: Plan
    attack: list[Sample]
    unlearn: Sample
    retain: list[Sample]


class Trainer:
    """AdvUnlearn on a copy of ``pipe.text_encoder`` (the pipeline is never modified; ``close`` restores the
    UNet's grad flags)."""

    def __init__(self, pipe, names: Sequence[str], hp: Hparams, retain: Sequence[str], device, latent_size: int):
        from cpebench.models import text_embeddings

        self.hp, self.names, self.retain_prompts = hp, list(names), list(retain)
        self.device = torch.device(device)
        self.tokenizer = pipe.tokenizer
        self.frozen_encoder = pipe.text_encoder
        unet = pipe.unet
        if unet.dtype != torch.float32:          # the paper trains in fp32
            unet = copy.deepcopy(unet).float()
        self.unet = unet
        self.encoder = copy.deepcopy(pipe.text_encoder).float().to(self.device).eval()
        self.encoder.requires_grad_(False)
        params = dict(self.encoder.named_parameters())
        self.param_names = trained_names(self.encoder, hp)
        if not self.param_names:
            raise ConfigError(f"advunlearn: train_method {hp.train_method!r} / component {hp.component!r} selects no "
                              "parameter of this text encoder")
        self.params = [params[n] for n in self.param_names]
        self.opt = torch.optim.Adam(self.params, lr=hp.lr)
        self.table = self.encoder.get_input_embeddings().weight.detach()    # frozen token table
        self.words = make_words(self.tokenizer, self.table, names, hp)
        with torch.no_grad():
            self.word_context = text_embeddings(pipe, list(names), self.device).float()
            uncond = text_embeddings(pipe, [""], self.device).float()
        self.retain_ids = (self.tokenizer(self.retain_prompts, padding="max_length", truncation=True,
                                          max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
                           if self.retain_prompts else None)
        abar = ldm_abar(pipe.scheduler.config)
        self.bank = Bank(self.unet, uncond, hp, abar)
        self.k = hp.adv_prompt_num
        n_init = max(w.n for w in self.words) if hp.attack_type == "add" else self.k   # 'add': k = the word's length
        latent_shape = (unet.config.in_channels, latent_size, latent_size)
        self.draws = Draws(hp, len(self.words), len(self.retain_prompts), latent_shape, self.table.shape[0],
                           n_init, len(abar))
        self.chunk_starts = self.draws.chunks(hp.iterations, hp.sample_batch)
        self._ready: dict[int, Work] = {}
        self.adv: torch.Tensor | None = None         # the latest adversarial vectors [1, k, D]
        self.adv_prompt: torch.Tensor | None = None  # the prompt the unlearn step trains on [1, 77, D]
        self.losses: list[float] = []
        self.attack_losses: list[float] = []         # mean attack loss per attack round
        self.last: dict[str, float] = {}
        self.step_done = 0
        self.frozen = {n: p.detach().clone() for n, p in zip(self.param_names, self.params)}
        # Last, once nothing above can raise (a concept too long to splice, a foreign scheduler): the pipeline's
        # UNet is only changed, and ``close`` only owed, when the trainer exists.
        self._unet_flags = {n: p.requires_grad for n, p in unet.named_parameters()}
        unet.requires_grad_(False)               # gradients flow to the context only

    # ---- the bank, one chunk of iterations at a time

    @torch.no_grad()
    def _retain_contexts(self, rows: Sequence[int]) -> dict[int, torch.Tensor]:
        """Original-encoder embeddings of the retain rows (the pipeline's encoder is never trained)."""
        rows = sorted(set(rows))
        if not rows:
            return {}
        ids = self.retain_ids[rows].to(self.device)
        emb = self.frozen_encoder(ids.to(self.frozen_encoder.device))[0].to(self.device, torch.float32)
        return dict(zip(rows, emb))

    def prepare(self, i: int) -> Work:
        """Iteration i's plan and samples (filling the bank chunk that holds i)."""
        if i in self._ready:
            return self._ready.pop(i)
        import bisect

        c = bisect.bisect_right(self.chunk_starts, i) - 1
        start = self.chunk_starts[c]
        end = self.chunk_starts[c + 1] if c + 1 < len(self.chunk_starts) else self.hp.iterations
        plans = {j: self.draws.plan(j) for j in range(start, end)}
        use_retain = self.hp.retain_loss_w > 0
        retain_ctx = self._retain_contexts([r for p in plans.values() for r in p.retain_rows] if use_retain else [])
        works, samples = {}, []
        for j, p in plans.items():
            ctx = self.word_context[p.word]
            attack = [Sample(d.noise[0], d.t_enc, d.t, ctx, False) for d in p.attack]
            unlearn = Sample(p.unlearn.noise[0], p.unlearn.t_enc, p.unlearn.t, ctx, True)
            retain = ([Sample(p.retain.noise[r], p.retain.t_enc, p.retain.t, retain_ctx[row], False)
                       for r, row in enumerate(p.retain_rows)] if use_retain and p.retain is not None else [])
            works[j] = Work(p, attack, unlearn, retain)
            samples += attack + [unlearn] + retain
        self.bank.fill(samples)
        self._ready = {j: w for j, w in works.items() if j > i}
        return works[i]

    # ---- one iteration

    def _eps(self, z: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
        tt = torch.full((z.shape[0],), t, device=self.device, dtype=torch.long)
        return self.unet(z, tt, encoder_hidden_states=context, return_dict=False)[0].float()

    def attack(self, work: Work) -> list[float]:
        """The lower level: ``attack_step`` steps on k adversarial vectors against the current encoder."""
        hp, word = self.hp, self.words[work.plan.word]
        if hp.attack_init == "latest" and self.adv is not None:
            start = self.adv
        else:
            ids = work.plan.init_ids[: word.n if hp.attack_type == "add" else self.k].to(self.device)
            start = F.embedding(ids, self.table).unsqueeze(0)
        adv = start.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([adv], lr=hp.attack_lr)
        returned, losses = None, []
        for s, sample in enumerate(work.attack):
            prompt = adversarial_prompt(word, adv, hp.attack_type)
            if s == len(work.attack) - 1 and hp.attack_result == "before_last_update":
                returned = (prompt.detach(), adv.detach().clone())
            e_n = self._eps(sample.z, sample.t, encode_embeds(self.encoder, word.ids, prompt))
            loss = F.mse_loss(e_n, sample.e_c)
            if hp.attack_grad == "fresh":
                adv.grad = None
            loss.backward()
            if hp.attack_method == "fast_at":
                adv.grad.sign_()
            opt.step()
            losses.append(float(loss.detach()))
        if returned is None:
            returned = (adversarial_prompt(word, adv.detach(), hp.attack_type), adv.detach().clone())
        self.adv_prompt, self.adv = returned
        return losses

    def unlearn_loss(self, work: Work) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(L_u, L_r) with gradients into the trained encoder: the concept prompt (adversarial after warm-up)
        and the retain prompts in one encoder and one UNet pass."""
        hp, word, u = self.hp, self.words[work.plan.word], work.unlearn
        attacked = self.step_done >= hp.warmup_iter and self.adv_prompt is not None
        prompt = self.adv_prompt if attacked else word.embeds     # after warm-up only the adversarial prompt is trained
        ids, embeds, z = [word.ids], [prompt], [u.z]
        if work.retain:
            r_ids = self.retain_ids[work.plan.retain_rows].to(self.device)
            ids.append(r_ids)
            embeds.append(F.embedding(r_ids, self.table))
            z += [s.z for s in work.retain]
        context = encode_embeds(self.encoder, torch.cat(ids), torch.cat(embeds))
        e_n = self._eps(torch.cat(z), u.t, context)
        target = u.e_0 - hp.negative_guidance * (u.e_c - u.e_0)
        l_u = F.mse_loss(e_n[:1], target)
        l_r = F.mse_loss(e_n[1:], torch.cat([s.e_c for s in work.retain])) if work.retain else None
        return l_u, l_r

    def step(self) -> float:
        i = self.step_done
        work = self.prepare(i)
        if work.attack:
            for p in self.params:
                p.requires_grad_(False)
            losses = self.attack(work)
            self.attack_losses.append(sum(losses) / len(losses))
        for p in self.params:
            p.requires_grad_(True)
        l_u, l_r = self.unlearn_loss(work)
        loss = l_u + self.hp.retain_loss_w * l_r if l_r is not None else l_u
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.last = {"unlearn": float(l_u.detach()), "retain": float(l_r.detach()) if l_r is not None else 0.0}
        self.losses.append(float(loss.detach()))
        self.step_done += 1
        return self.losses[-1]

    # ---- results and restoration

    def trained(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in zip(self.param_names, self.params)
                if not torch.equal(p.detach(), self.frozen[n])}

    def close(self) -> None:
        for n, p in self.unet.named_parameters():
            p.requires_grad_(self._unet_flags.get(n, True))

    # ---- resumable state

    def save_state(self, path: Path, key: str, seconds: float) -> None:
        tensors = training_tensors(self.opt, dict(zip(self.param_names, self.params)))
        if self.adv is not None:
            tensors["adv"], tensors["adv_prompt"] = self.adv, self.adv_prompt
        save_state(path, key, tensors, {"step": str(self.step_done), "losses": json.dumps(self.losses),
                                        "attack_losses": json.dumps(self.attack_losses), "seconds": str(seconds)})

    def load_state(self, path: Path, key: str) -> float | None:
        saved = load_state(path, key, "advunlearn")
        if saved is None:
            return None
        tensors, meta = saved
        restore_training(self.opt, dict(zip(self.param_names, self.params)), tensors)
        if "adv" in tensors:
            self.adv, self.adv_prompt = tensors["adv"].to(self.device), tensors["adv_prompt"].to(self.device)
        self.step_done = int(meta["step"])
        self.losses = json.loads(meta["losses"])
        self.attack_losses = json.loads(meta.get("attack_losses", "[]"))
        return float(meta.get("seconds", 0.0))


def train_step(trainer: Trainer) -> float:
    """One iteration (a seam for tests that interrupt training)."""
    return trainer.step()


def train(pipe, names: Sequence[str], hp: Hparams, ctx: EraseContext) -> tuple[dict, dict]:
    """Run AdvUnlearn; returns (changed text-encoder tensors, metadata). ``pipe`` is left as it was."""
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    image_size = hp.image_size or pipe.unet.config.sample_size * vae_factor
    if image_size % vae_factor:
        raise ConfigError(f"advunlearn: hparams.image_size must be a multiple of {vae_factor}, got {image_size}")
    retain = retain_texts(hp, ctx.data_dir)
    trainer = Trainer(pipe, names, hp, retain, ctx.device, image_size // vae_factor)
    key = json.dumps({"concepts": list(names), "hparams": hp.fingerprinted(), "retain": hashlib.sha256(
        "\n".join(retain).encode()).hexdigest(), "parameters": trainer.param_names}, sort_keys=True)
    path = Path(ctx.workdir) / STATE_FILE if ctx.workdir else None
    try:
        seconds = train_resumable(
            trainer, hp.iterations, lambda t: train_step(t), path=path, key=key, save_every=hp.save_every,
            desc=f"advunlearn: {len(names)} concept{'s' * (len(names) > 1)}", unit="iteration", progress=ctx.progress,
            postfix=lambda t, loss: f"loss {loss:.4g} (unlearn {t.last['unlearn']:.4g}, retain {t.last['retain']:.4g})")
        tensors = trainer.trained()
        checksum = weight_checksum(trainer.frozen[n] for n in tensors)
    finally:
        trainer.close()
    losses = trainer.losses
    curve = [round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 8) for i in range(0, len(losses), 50)]
    if not tensors:
        raise CpebenchError(f"advunlearn: training changed no parameter (lr {hp.lr}, {hp.iterations} iterations)")
    meta = {
        "resolved_hparams": asdict(hp), "trained_parameters": len(trainer.param_names),
        "trained_numel": sum(p.numel() for p in trainer.params), "changed_tensors": len(tensors),
        "image_size": image_size, "base_checksum": checksum,
        "retain": {"count": len(retain), "sha256": hashlib.sha256("\n".join(retain).encode()).hexdigest()},
        "train": {"seconds": round(seconds, 2), "bank_seconds": round(trainer.bank.seconds, 2),
                  "iterations": hp.iterations, "device": str(trainer.device),
                  "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                  "loss_mean_per_50": curve, "attack_rounds": len(trainer.attack_losses),
                  "attack_loss_mean_per_50": [round(sum(a[i : i + 50]) / len(a[i : i + 50]), 8)
                                              for a in [trainer.attack_losses] for i in range(0, len(a), 50)]},
    }
    return tensors, meta


# =========================================================================== released weights


def _released_subset(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors ``text_encoder_full`` trains (encoder layers + final LN); the frozen embeddings are dropped."""
    return {k: v.contiguous() for k, v in sd.items()
            if k.removeprefix("text_model.").startswith(("encoder.layers.", "final_layer_norm."))}


def _read_training_output(path: Path) -> dict[str, torch.Tensor]:
    """``TextEncoder-<train_method>-epoch_<i>.pt``: the CustomTextEncoder state dict, keys
    ``text_encoder.text_model.*`` plus the aliases ``embedding.*``, ``encoder.*``, ``final_layer_norm.*`` (the
    same tensors again); the official generation script keeps the first kind with ``text_encoder.`` stripped."""
    sd = read_state_dict(path)
    kept = {k.removeprefix("text_encoder."): v for k, v in sd.items() if k.startswith("text_encoder.text_model.")}
    if not kept:
        raise DataError(f"{path}: no 'text_encoder.text_model.*' tensors; not an AdvUnlearn text-encoder checkpoint")
    return kept


def _read_clip_folder(path: Path) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModel`` folder (config.json + model.safetensors or pytorch_model.bin), e.g. a subfolder of HF
    ``OPTML-Group/AdvUnlearn``; loaded by transformers (local files only)."""
    from transformers import CLIPTextModel

    try:
        model = CLIPTextModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a loadable CLIPTextModel folder ({type(e).__name__}: {str(e)[:200]})") from None
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def load_released(path: str | Path) -> Artifact:
    """The authors' text encoder as an artifact: a CLIPTextModel folder (the HF release) or the local training
    output ``TextEncoder-*.pt``. A folder holding exactly one ``TextEncoder-*.pt`` is accepted too."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("TextEncoder-*.pt"))
        if len(files) != 1:
            raise DataError(f"{path}: expected a cpebench artifact, a CLIPTextModel folder (config.json) or exactly one "
                            f"TextEncoder-*.pt, found {len(files)} .pt files")
        path = files[0]
    if not path.exists():
        raise DataError(f"{path}: no such AdvUnlearn artifact, text-encoder folder or checkpoint")
    layout = "clip_folder" if path.is_dir() else "training_output"
    tensors = _released_subset(_read_clip_folder(path) if path.is_dir() else _read_training_output(path))
    if not tensors:
        raise DataError(f"{path}: no text-encoder layer tensors found")
    word = next((w for w in ("nudity", "vangogh", "church", "garbage_truck", "parachute", "tench")
                 if path.name.startswith(w + "_")), None)
    return Artifact(method="advunlearn", tensors=tensors, metadata={
        "concepts": [word] if word else [], "source": "official text encoder", "official_file": str(path),
        "official_layout": layout, "train_method": "text_encoder_full", "kept_tensors": len(tensors)})


# =========================================================================== the method


def _local_name(name: str, params: Mapping[str, torch.Tensor]) -> str | None:
    """``name`` as this transformers version names the parameter (with or without the ``text_model.`` level)."""
    for candidate in (name, name.removeprefix("text_model."), "text_model." + name):
        if candidate in params:
            return candidate
    return None


class AdvUnlearn(Method):
    name = "advunlearn"
    version = "1"
    description = ("AdvUnlearn (NeurIPS 2024): adversarial-training unlearning of the text encoder (ESD loss on an "
                   "adversarial soft-prompt + COCO-object retain regulariser); defaults = the README command: "
                   "text_encoder_full, 1000 it, lr 1e-5, warm-up 200, PGD 30 steps lr 1e-3, k 1, retain reg gamma 0.3")
    trains = True
    operational_hparams = ("sample_batch", "save_every")
    hparams_class = Hparams

    def erase(self, pipe, concepts: Sequence[Concept], hparams: Mapping[str, Any],
              ctx: EraseContext | None = None) -> Artifact:
        names, hp, ctx = erase_inputs(self, pipe, concepts, hparams, ctx)
        tensors, meta = train(pipe, names, hp, ctx)
        return Artifact(method=self.name, tensors=tensors, metadata={"concepts": names, **meta})

    def _tensors(self, text_encoder, artifact: Artifact) -> dict[str, torch.Tensor]:
        params = dict(text_encoder.named_parameters())
        out = {}
        for k, t in artifact.tensors.items():
            name = _local_name(k, params)
            if name is None:
                raise ConfigError(f"{self.name} artifact names tensor {k!r}, which this text encoder does not have: it was "
                                  "made for another architecture (AdvUnlearn changes only the text encoder)")
            if tuple(t.shape) != tuple(params[name].shape):
                raise ConfigError(f"{self.name} artifact tensor {k}: shape {tuple(t.shape)}, the text encoder has "
                                  f"{tuple(params[name].shape)}: it was made for another base model")
            # Fresh copies in the encoder's dtype and device (aligned storage: the same bits as trained).
            out[name] = t.to(device=params[name].device, dtype=params[name].dtype, copy=True)
        recorded = artifact.metadata.get("base_checksum")
        if recorded and not checksums_agree(recorded, weight_checksum(params[n] for n in out)):
            raise ConfigError(f"{self.name} artifact was trained on base model {artifact.metadata.get('base_model', '?')!r}, "
                              "whose text encoder differs from the loaded one's; train it again on this model")
        return out

    def apply(self, pipe, artifact: Artifact):
        """The unlearned text encoder for prompts and the unconditional "" alike (official generation)."""
        return swapped_weights(pipe.text_encoder, self._tensors(pipe.text_encoder, artifact))

    def load_release(self, path: Path) -> Artifact:
        """The authors' text encoder (``load_released``)."""
        return load_released(path)
