"""ACE — Attentional Concept Erasure in Diffusion Models (Carter, arXiv 2504.11850), cpebench reconstruction.

Sources, per-task values and deviations: docs/methods/ace.md. ACE has no public code and its full text could
not be read: every formula below is the cpebench reconstruction (spec v1) of the abstract and a second-hand
review; results are labelled "ACE (cpebench reconstruction, spec v1)".

The edit: every cross-attention (``attn2``) layer l gets one gate vector g_c ∈ [0,1]^{d_l} per concept c, and
a token mask m_c ∈ [0,1]^77 marks the prompt tokens related to c. K and V are scaled channel-wise on masked
rows (a rank-1 "gated low-rank adaptation"); concepts compose as a product:

    K̃ = K ⊙ Π_c (1 − m_c g_cᵀ),   Ṽ = V ⊙ Π_c (1 − m_c g_cᵀ)

It is token-selective, so it stays in the attention processor (``cpebench.attention.kv_edit``) instead of
merging into W_k / W_v. The mask m = max(m_lex, m_sem): m_lex marks the CLIP tokens of the concept and its
synonyms (the engine announces each batch's texts), m_sem = σ((cos(E_t, prototype) − τ)/T) with τ, T
calibrated on training and retain prompts; with ``gate_eos`` the EOS/padding rows (CLIP is causal: they
carry the concept) take the largest content value when it exceeds 0.5. The empty prompt gets m = 0.

Stage 1 (closed form, batched): from x_t of ``n_images`` generated concept images at ``stats_timesteps``
timesteps, every attn2 layer accumulates, from the same queries Q, per channel j
    num_j = Σ ⟨B_j, ΔO_j⟩,  den_j = Σ ‖B_j‖²,  ΔO = Attn(Q,K_c,V_c) − Attn(Q,K_n,V_n),  B = Attn(Q,K_c,m⊙V_c)
(n = the prompt with the concept replaced by the neutral term), and g_j = clip(α num_j / (den_j + λ), 0, 1):
the exact box-constrained ridge least-squares gate that makes the gated output match the neutral one.

Stage 2 (adversarially augmented fine-tuning): Adam on the gates only, ε-matching
    L = ‖ε_g(x_t, p) − ε(x_t, neutral(p))‖² + λ_p ‖ε_g(x_t, r) − ε(x_t, r)‖²
with p drawn from the concept prompts or (``adv_prob``) their synonym / typo / surname variants, r from the
retain prompts; gates clamped to [0,1] after every step. Each concept trains as it would alone (its own Adam
state, gradient clipping, generator and one-concept mask; concepts take turns), so erasing several concepts
gives each the gates of erasing it alone from the same stage-1 result and data. x_0 are the VAE latents of the
generated images (``vae_roundtrip``). Training state (gates, Adam moments, generators,
losses) and the stage-1 result (data latents, gates, mask calibration) live in ``ctx.workdir``: a killed
erase resumes with identical gates.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cpebench.attention import ContextBatch, ContextEdit, KVEdit, context_edit, kv_edit
from cpebench.errors import ConfigError, DataError
from cpebench.methods import Artifact, Concept, EraseContext, Method
from cpebench.methods.closed_form import weight_metadata
from cpebench.methods.common import (PROJECTIONS, CheckedHparams, check_at_least_one, check_base_kv, check_choices,
                                     check_non_negative, encode_texts, erase_inputs, load_state, save_state,
                                     text_list)

log = logging.getLogger(__name__)

LABEL = "ACE (cpebench reconstruction, spec v1)"
DATA_FILE = "ace-stage1.safetensors"     # in ctx.workdir: data latents + stage-1 gates + mask calibration
STATE_FILE = "ace-state.safetensors"     # in ctx.workdir: stage-2 training state
VARIANT_RULES = ("surname", "first_name", "typo", "style")
CF_MODES = ("ls", "diag_q")


# =========================================================================== hyperparameters


@dataclass(frozen=True)
class Hparams(CheckedHparams):
    """benchmarks/methods/ace.yaml (per-task values and their sources are there). Every value is a cpebench
    [proposed] choice of spec v1: the paper's values could not be read."""

    method_name: ClassVar[str] = "ace"

    # prompts (docs/methods/ace.md)
    templates: Any = ("a photo of the concept",)   # erase templates (the bare concept is always added): list or {file, column}
    replace_word: str = "concept"       # the templates' placeholder
    neutral: Any = ""                   # the neutral term (one text, or one per concept): MACE's mapping concepts
    synonyms: Any = ()                  # adversarial variants: a list for every concept, or {concept: [..]}
    variant_rules: tuple = ()           # generated variants: surname | first_name | typo | style
    adv_prob: float = 0.5               # share of stage-2 erase prompts drawn from the variants
    retain_words: Any = ()              # general words of the retain set (every one is used)
    retain_pool: Any = ()               # names; the retain_nearest closest to each concept are used
    retain_nearest: int = 50
    retain_prompts: Any = None          # full retain sentences, used as they are (explicit); replaces words/pool
    # generated examples (docs/methods/ace.md)
    n_images: int = 8                   # per concept, and as many retain images
    resolution: int | None = None       # None: the UNet's sample_size × VAE factor (512 for SD-1.x)
    data_scheduler: str = "pndm"
    data_steps: int = 50
    data_guidance: float = 7.5
    vae_roundtrip: bool = True          # x_0 = the VAE latent of the generated 8-bit image (spec); false: the sampled latent
    seed: int = 2024
    # mask (docs/methods/ace.md)
    semantic_mask: bool = True          # m_sem besides m_lex
    sem_quantile: float = 0.95          # q⁻ = this quantile of retain-prompt cosines
    gate_eos: bool = True               # EOS/padding rows take the largest content mask value above 0.5
    # stage 1 (docs/methods/ace.md)
    gate_keys: bool = True              # the gate scales K as well as V
    cf_mode: str = "ls"                 # ls (ridge least squares) | diag_q (the review's literal Σ Q ΔO, normalised)
    alpha: float = 1.0                  # strength factor
    lambda_rel: float = 1.0e-2          # λ = lambda_rel · mean_j den_j
    cf_iters: int = 1                   # 2: recompute B and O with the gated keys and solve again
    stats_timesteps: int = 10           # t ∈ {50, 150, …, 950}
    # stage 2 (docs/methods/ace.md)
    steps: int = 200                    # per concept
    lr: float = 5.0e-3
    beta1: float = 0.9
    beta2: float = 0.999
    erase_batch: int = 1
    retain_batch: int = 1
    lambda_p: float = 1.0
    grad_clip: float = 1.0              # 0 = off
    train_mask: bool = False            # τ, T trained too
    train_out_bias: bool = False        # not implemented in v1 (attn2.to_out.0.bias would act on every prompt)
    adv_embed: bool = False             # not implemented in v1 (PGD soft-token attack)
    # batching (results equal to float rounding whatever the sizes)
    data_batch: int = 8
    stats_batch: int = 16
    save_every: int = 50                # operational: stage-2 state every N steps

    def check(self, method: str) -> None:
        from cpebench.engine import SCHEDULERS

        check_choices(method, self, {"cf_mode": CF_MODES, "data_scheduler": SCHEDULERS})
        unknown = [r for r in self.variant_rules if r not in VARIANT_RULES]
        if unknown:
            raise ConfigError(f"{method}: hparams.variant_rules: unknown rule(s) {', '.join(map(repr, unknown))}; "
                              f"choose from {', '.join(VARIANT_RULES)}")
        check_at_least_one(method, self, ("n_images", "data_steps", "cf_iters", "stats_timesteps", "erase_batch",
                                          "data_batch", "stats_batch", "save_every"))
        check_non_negative(method, steps=self.steps, lr=self.lr, retain_batch=self.retain_batch, alpha=self.alpha,
                           lambda_rel=self.lambda_rel, lambda_p=self.lambda_p, grad_clip=self.grad_clip,
                           retain_nearest=self.retain_nearest, data_guidance=self.data_guidance)
        for key in ("adv_prob", "beta1", "beta2"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{method}: hparams.{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 < self.sem_quantile < 1.0:
            raise ConfigError(f"{method}: hparams.sem_quantile must be in (0, 1), got {self.sem_quantile}")
        if self.resolution is not None and self.resolution < 8:
            raise ConfigError(f"{method}: hparams.resolution must be >= 8 (or null), got {self.resolution}")
        if not self.replace_word.strip():
            raise ConfigError(f"{method}: hparams.replace_word must be a non-empty placeholder word")
        for key in ("train_out_bias", "adv_embed"):
            if getattr(self, key):
                raise ConfigError(f"{method}: hparams.{key}: true is not implemented in cpebench's ACE (spec v1 option, "
                                  "off by default); leave it false")

    def fingerprinted(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "save_every"}


# =========================================================================== prompts


def fill(template: str, word: str, text: str) -> str:
    """``template`` with every occurrence of ``word`` (or its lower-case form) replaced by ``text``, in one pass:
    a ``text`` containing the word ("Renowned artist" for the word "artist") is inserted once, not again."""
    pattern = f"{re.escape(word)}|{re.escape(word.lower())}"
    return " ".join(re.sub(pattern, lambda _: text, template).split())


def typo(name: str) -> str | None:
    """One-character typo: the middle character of the last word dropped ('Tom Hanks' -> 'Tom Haks');
    None for words shorter than 4 characters."""
    words = name.split()
    last = words[-1]
    if len(last) < 4:
        return None
    return " ".join(words[:-1] + [last[: len(last) // 2] + last[len(last) // 2 + 1:]])


def variants(name: str, rules: Sequence[str], synonyms: Sequence[str]) -> list[str]:
    """The concept's adversarial variants, first-seen order, without the name itself (case-insensitive)."""
    words = name.split()
    out = []
    for rule in rules:
        if rule == "surname" and len(words) > 1:
            out.append(words[-1])
        elif rule == "first_name" and len(words) > 1:
            out.append(words[0])
        elif rule == "typo":
            out.append(typo(name))
        elif rule == "style":
            out.append(f"{words[-1]} style")
    out += list(synonyms)
    seen, kept = {name.lower()}, []
    for v in out:
        if v and v.strip() and v.strip().lower() not in seen:
            seen.add(v.strip().lower())
            kept.append(v.strip())
    return kept


def synonyms_for(spec: Any, names: Sequence[str]) -> list[list[str]]:
    if spec is None or isinstance(spec, (list, tuple, str)):
        common = [spec] if isinstance(spec, str) else list(spec or [])
        return [[str(s) for s in common] for _ in names]
    if isinstance(spec, Mapping):
        lower = {n.lower(): i for i, n in enumerate(names)}
        unknown = [k for k in spec if str(k).lower() not in lower]
        if unknown:
            raise ConfigError(f"ace: hparams.synonyms names concept(s) not erased: {', '.join(map(repr, unknown))}")
        per = [[] for _ in names]
        for k, v in spec.items():
            per[lower[str(k).lower()]] = [v] if isinstance(v, str) else [str(s) for s in v]
        return per
    raise ConfigError(f"ace: hparams.synonyms must be a list or a mapping concept -> list, got {spec!r}")


def neutrals_for(spec: Any, names: Sequence[str]) -> list[str]:
    if isinstance(spec, str) or spec is None:
        return [(spec or "").strip()] * len(names)
    if isinstance(spec, (list, tuple)) and len(spec) == len(names):
        return [str(s).strip() for s in spec]
    raise ConfigError(f"ace: hparams.neutral must be one text or one per concept ({len(names)}), got {spec!r}")


@dataclass
class PromptPair:
    prompt: str       # what the gated model sees
    target: str       # what the frozen model sees for the target (neutral(p) for erase prompts, p for retain)


@dataclass
class ConceptPrompts:
    name: str
    neutral: str
    variants: list[str]
    erase: list[PromptPair]        # P_C: templates with the concept, and the bare concept
    adversarial: list[PromptPair]  # P_adv: templates with each variant, and the bare variants


def concept_prompts(names, hp: Hparams, templates: Sequence[str]) -> list[ConceptPrompts]:
    word = hp.replace_word
    out = []
    for name, neutral, syn in zip(names, neutrals_for(hp.neutral, names), synonyms_for(hp.synonyms, names)):
        vs = variants(name, hp.variant_rules, syn)
        forms = list(templates) + [word]
        erase = [PromptPair(fill(t, word, name), fill(t, word, neutral)) for t in forms]
        adversarial = [PromptPair(fill(t, word, v), fill(t, word, neutral)) for v in vs for t in forms]
        out.append(ConceptPrompts(name, neutral, vs, erase, adversarial))
    return out


def nearest_names(pipe, targets: Sequence[str], pool: Sequence[str], k: int, device) -> list[list[str]]:
    """Per target, the k pool names closest by cosine of the flattened 77×D bare-name embeddings, names
    containing the target excluded (as CPE builds its anchors; docs/methods/ace.md)."""
    if k <= 0 or not pool:
        return [[] for _ in targets]
    pool = sorted(dict.fromkeys(pool))
    pool_emb = F.normalize(encode_texts(pipe, pool, device).flatten(1), dim=1)
    target_emb = F.normalize(encode_texts(pipe, list(targets), device).flatten(1), dim=1)
    chosen = []
    for t, te in zip(targets, target_emb):
        allowed = torch.tensor([t.lower() not in p.lower() for p in pool], device=pool_emb.device)
        sim = (pool_emb @ te).masked_fill(~allowed, -math.inf)
        chosen.append([pool[i] for i in sim.topk(min(k, int(allowed.sum()))).indices.tolist()])
    return chosen


def retain_prompts(pipe, names: Sequence[str], hp: Hparams, templates: Sequence[str], data_dir, device) -> list[str]:
    """P_R: the retain sentences as they are, or general words + each concept's nearest pool names in the
    templates (and bare); erased concepts never retained."""
    erased = {n.lower() for n in names}
    if hp.retain_prompts is not None:
        texts = text_list("ace", hp.retain_prompts, "retain_prompts", data_dir, blanks=False)
    else:
        general = text_list("ace", hp.retain_words, "retain_words", data_dir, blanks=False)
        pool = [p for p in text_list("ace", hp.retain_pool, "retain_pool", data_dir, blanks=False) if p.lower() not in erased]
        words = general + [w for near in nearest_names(pipe, names, pool, hp.retain_nearest, device) for w in near]
        words = [w for w in dict.fromkeys(words) if w.lower() not in erased]
        texts = [fill(t, hp.replace_word, w) for w in words for t in list(templates) + [hp.replace_word]]
    return list(dict.fromkeys(t for t in texts if t.strip()))


# =========================================================================== the mask


class TokenMask(torch.nn.Module):
    """m = max(m_lex, m_sem) per concept, batched over prompts: [B, C, 77] from token ids and embeddings."""

    def __init__(self, sequences: Sequence[Sequence[int]], owners: Sequence[int], prototype: torch.Tensor,
                 tau: torch.Tensor, temperature: torch.Tensor, semantic: torch.Tensor, gate_eos: bool, trainable: bool = False):
        super().__init__()
        self.n_concepts = prototype.shape[0]
        self.gate_eos = gate_eos
        self.sequences, self.owners = [list(s) for s in sequences], list(owners)
        onehot = F.one_hot(torch.tensor(self.owners, dtype=torch.long), self.n_concepts).float()
        self.by_length = {}   # L -> (token ids [S_L, L], owners one-hot [S_L, C])
        for length in sorted({len(s) for s in self.sequences}):
            rows = [i for i, s in enumerate(self.sequences) if len(s) == length]
            self.by_length[length] = (torch.tensor([self.sequences[i] for i in rows], dtype=torch.long), onehot[rows])
        self.register_buffer("prototype", F.normalize(prototype.float(), dim=-1))
        self.register_buffer("semantic", semantic.float())
        if trainable:
            self.tau = torch.nn.Parameter(tau.float().clone())
            self.temperature = torch.nn.Parameter(temperature.float().clone())
        else:
            self.register_buffer("tau", tau.float().clone())
            self.register_buffer("temperature", temperature.float().clone())

    def concept(self, c: int, trainable: bool = False) -> TokenMask:
        """Concept c's mask alone: a one-concept TokenMask whose masks are column c of this one's (its own token
        sequences, prototype, τ, T); τ, T copied (trainable: as parameters)."""
        seqs = [s for s, o in zip(self.sequences, self.owners) if o == c]
        return TokenMask(seqs, [0] * len(seqs), self.prototype[c : c + 1].detach(), self.tau[c : c + 1].detach(),
                         self.temperature[c : c + 1].detach(), self.semantic[c : c + 1], self.gate_eos, trainable=trainable)

    def lexical(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, 77, C]: 1 where a concept's (or variant's) token sequence occurs contiguously."""
        b, n = ids.shape
        out = torch.zeros(b, n, self.n_concepts, device=ids.device)
        for length, (seqs, owners) in self.by_length.items():
            if length > n:
                continue
            windows = ids.unfold(1, length, 1)                                            # [B, W, L]
            hit = (windows[:, :, None, :] == seqs.to(ids.device)[None, None]).all(-1)     # [B, W, S]
            per_concept = (hit.float() @ owners.to(ids.device)).clamp(max=1.0)            # [B, W, C]
            for k in range(length):
                out[:, k : k + per_concept.shape[1]] = torch.maximum(out[:, k : k + per_concept.shape[1]], per_concept)
        return out

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings.float(), dim=-1) @ self.prototype.T                 # [B, 77, C]

    def forward(self, embeddings: torch.Tensor, ids: torch.Tensor | None, lengths: torch.Tensor | None) -> torch.Tensor:
        """Masks [B, C, 77] (fp32). ``ids``/``lengths`` (token count incl. BOS and EOS) from the prompts' texts;
        without them (a pipeline call that did not announce its texts) only m_sem acts, on every row but BOS."""
        b, n, _ = embeddings.shape
        pos = torch.arange(n, device=embeddings.device)
        if lengths is None:
            content = (pos > 0).expand(b, n)
            trailing = torch.zeros(b, n, dtype=torch.bool, device=embeddings.device)
        else:
            eos = (lengths.to(embeddings.device) - 1)[:, None]
            content, trailing = (pos > 0) & (pos < eos), pos >= eos
        sem = torch.sigmoid((self.cosine(embeddings) - self.tau) / self.temperature) * self.semantic
        m = sem if ids is None else torch.maximum(self.lexical(ids.to(embeddings.device)), sem)
        m = m * content[..., None]
        if self.gate_eos:
            top = m.amax(dim=1, keepdim=True)                                             # [B, 1, C]
            m = torch.where(trailing[..., None] & (top > 0.5), top.expand_as(m), m)
        return m.transpose(1, 2).contiguous()


def tokenize(tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, 77] (lower-cased, padded as SD's conditioning) and token counts incl. BOS/EOS [B]."""
    enc = tokenizer([t.lower() for t in texts], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask.sum(1)


def sequence_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text.lower(), truncation=True, max_length=tokenizer.model_max_length).input_ids[1:-1]


# =========================================================================== the gate


def gate_kv(key: torch.Tensor, value: torch.Tensor, masks: torch.Tensor, gates: torch.Tensor,
            gate_keys: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V ⊙ Π_c (1 − m_c g_cᵀ), built in fp32 and cast; concepts no row of the batch masks are skipped
    (their factor is exactly 1), and an unmasked batch is returned untouched."""
    active = masks.detach().amax(dim=(0, 2)) > 0
    if not bool(active.any()):
        return key, value
    m, g = masks[:, active], gates[active].float()
    factor = (1.0 - m[..., None] * g[None, :, None, :]).prod(dim=1).to(value.dtype)  # [B, 77, d]
    return (key * factor if gate_keys else key), value * factor


class Gates(KVEdit, ContextEdit):
    """ACE's edit at inference: a cacheable K/V edit (a pure function of the batch's context and texts) and a
    ContextEdit without hooked modules, whose ``prepare`` receives the texts the engine announces."""

    cacheable = True

    def __init__(self, gates: Mapping[str, torch.Tensor], mask: TokenMask, tokenizer, gate_keys: bool):
        self.gates, self.mask, self.tokenizer, self.gate_keys = dict(gates), mask, tokenizer, gate_keys
        self._for: tuple | None = None      # (context, version, masks): strong ref, identity check is safe
        self._warned = False

    @torch.no_grad()
    def prepare(self, batch: ContextBatch) -> None:
        texts = None
        if batch.prompts is not None and batch.negatives is not None:
            texts = list(batch.negatives) + list(batch.prompts)
        self._for = (batch.context, batch.context._version, self.masks(batch.context, texts))

    def masks(self, context: torch.Tensor, texts: Sequence[str] | None) -> torch.Tensor:
        if texts is not None and len(texts) == context.shape[0]:
            ids, lengths = tokenize(self.tokenizer, texts)
            return self.mask(context, ids, lengths)
        if not self._warned:
            log.warning("ace: the prompts of this batch were not announced (a direct pipeline call): only the semantic "
                        "mask acts, on every token but BOS")
            self._warned = True
        return self.mask(context, None, None)

    @torch.no_grad()
    def edit(self, layer: str, context: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        if self._for is None or self._for[0] is not context or self._for[1] != context._version:
            self._for = (context, context._version, self.masks(context, None))
        return gate_kv(key, value, self._for[2], self.gates[layer], self.gate_keys)


class TrainingGates(KVEdit):
    """ACE's edit while training: gates with gradients, masks set per batch (``None``: the frozen model)."""

    cacheable = False

    def __init__(self, gates: Mapping[str, torch.Tensor], gate_keys: bool):
        self.gates, self.gate_keys = dict(gates), gate_keys
        self.masks: torch.Tensor | None = None

    def edit(self, layer: str, context: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        if self.masks is None:
            return key, value
        return gate_kv(key, value, self.masks, self.gates[layer], self.gate_keys)


def attn2_modules(unet) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in unet.named_modules() if n.endswith("attn2")}


# =========================================================================== stage 1: closed-form gates


def head_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d_h) V per head, heads concatenated back: [B, N, d] (before to_out)."""
    b, h = q.shape[0], attn.heads
    split = lambda x: x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, -1, q.shape[-1])


@dataclass
class StatsRows:
    """One UNet batch of statistics samples: each row's neutral context, own-concept mask and concept."""

    neutral: torch.Tensor       # [B, 77, D]
    mask: torch.Tensor          # [B, 77]
    concept: torch.Tensor       # [B] long
    gates: Mapping[str, torch.Tensor] | None = None   # cf_iters > 1: the previous solution, per layer [C, d]


class GateStatistics(ContextEdit):
    """Forward hooks on the attn2 modules: per row, from the layer's own queries, the closed form's sums
    num = Σ_p B ⊙ ΔO, den = Σ_p B², qdo = Σ_p Q ⊙ ΔO (per concept, float64, streaming by addition). The
    layers' outputs are not changed (layer-local statistics, upstream layers unedited)."""

    def __init__(self, modules: Mapping[str, torch.nn.Module], n_concepts: int, gate_keys: bool, device):
        self.modules = tuple(modules)
        self.gate_keys = gate_keys
        zeros = {n: torch.zeros(n_concepts, m.to_v.out_features, dtype=torch.float64, device=device)
                 for n, m in modules.items()}
        self.num, self.den, self.qdo = ({k: v.clone() for k, v in zeros.items()} for _ in range(3))
        self.rows: StatsRows | None = None
        self.context: torch.Tensor | None = None

    def prepare(self, batch: ContextBatch) -> None:
        self.context = batch.context

    @torch.no_grad()
    def output(self, name, module, inputs, output):
        r = self.rows
        sums = layer_sums(module, inputs[0], self.context, r.neutral, r.mask,
                          None if r.gates is None else r.gates[name][r.concept], self.gate_keys)
        for acc, s in zip((self.num, self.den, self.qdo), sums):
            acc[name].index_add_(0, r.concept, s.double())
        return output


def layer_sums(attn, hidden: torch.Tensor, context: torch.Tensor, neutral: torch.Tensor, mask: torch.Tensor,
               gates: torch.Tensor | None, gate_keys: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ_p B ⊙ ΔO, Σ_p B², Σ_p Q ⊙ ΔO), each [B, d], for one attn2 layer and a batch of rows."""
    q = attn.to_q(hidden)
    k_c, v_c = attn.to_k(context), attn.to_v(context)
    m = mask[..., None].to(v_c.dtype)
    if gates is not None and gate_keys:   # cf_iters > 1: the fixed point through the key path
        k_c = k_c * (1.0 - m * gates[:, None, :].to(k_c.dtype))
    o_c = head_attention(attn, q, k_c, v_c)
    b = head_attention(attn, q, k_c, m * v_c)
    o_n = head_attention(attn, q, attn.to_k(neutral), attn.to_v(neutral))
    delta = o_c - o_n
    return (b * delta).sum(1), (b * b).sum(1), (q * delta).sum(1)


def solve_gates(num: torch.Tensor, den: torch.Tensor, qdo: torch.Tensor, hp: Hparams) -> torch.Tensor:
    """Per concept and channel: clip(α num / (den + λ), 0, 1) with λ = lambda_rel · mean_j den_j (``ls``), or
    clip(α qdo / max|qdo|, 0, 1) (``diag_q``). Float64 in, float32 out; an empty statistic gives 0."""
    if hp.cf_mode == "diag_q":
        scale = qdo.abs().amax(dim=-1, keepdim=True)
        g = torch.where(scale > 0, hp.alpha * qdo / scale.clamp_min(1e-300), torch.zeros_like(qdo))
    else:
        lam = hp.lambda_rel * den.mean(dim=-1, keepdim=True)
        total = den + lam
        g = torch.where(total > 0, hp.alpha * num / total.clamp_min(1e-300), torch.zeros_like(num))
    return g.clamp(0.0, 1.0).float()


# =========================================================================== data: generated examples


def seed_for(seed: int, *parts: Any) -> int:
    return int(hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).hexdigest()[:8], 16) % (2 ** 31)


def latent_shape(pipe, hp: Hparams) -> tuple[int, int, int]:
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = hp.resolution or pipe.unet.config.sample_size * factor
    if size % factor:
        raise ConfigError(f"ace: hparams.resolution must be a multiple of {factor}, got {size}")
    return pipe.unet.config.in_channels, size // factor, size // factor


@torch.no_grad()
def generate_latents(pipe, unet, prompts: Sequence[str], hp: Hparams, seed: int, device, progress: bool = False,
                     desc: str = "ace: data") -> torch.Tensor:
    """x_0 of ``prompts`` from the unedited model (CFG ``data_guidance``, ``data_scheduler``), one seeded noise
    draw per call: [N, c, h, w] float32; the VAE latents of the generated images (``vae_roundtrip``, default)
    or the sampled latents."""
    from tqdm.auto import tqdm

    from cpebench.engine import make_scheduler

    shape = latent_shape(pipe, hp)
    noise = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(seed))
    uncond = encode_texts(pipe, [""], device, unet.dtype)
    out = []
    for i in tqdm(range(0, len(prompts), hp.data_batch), disable=not progress, desc=desc, leave=False):
        cond = encode_texts(pipe, prompts[i : i + hp.data_batch], device, unet.dtype)
        context = torch.cat([uncond.expand(cond.shape[0], -1, -1), cond])
        scheduler = make_scheduler(hp.data_scheduler, pipe.scheduler.config)   # fresh: PNDM keeps a history
        scheduler.set_timesteps(hp.data_steps)
        x = noise[i : i + hp.data_batch].to(device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t).to(unet.dtype)
            e_u, e_c = unet(x_in, t.to(device), encoder_hidden_states=context, return_dict=False)[0].float().chunk(2)
            x = scheduler.step(e_u + hp.data_guidance * (e_c - e_u), t, x, return_dict=False)[0]
        if hp.vae_roundtrip:
            x = image_latents(pipe, x)
        out.append(x.float())
    return torch.cat(out)


@torch.no_grad()
def image_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """The VAE latents of the images ``latents`` generate (spec §3.3/§4.2: "VAE latents of the generated
    images"): decoded, made the 8-bit image the engine outputs (clamped to [-1, 1], 256 levels), encoded,
    posterior mean × scaling factor (as ``cpebench.attack.target_latents`` encodes its generated images)."""
    vae, sf = pipe.vae, pipe.vae.config.scaling_factor
    image = vae.decode(latents.to(vae.dtype) / sf, return_dict=False)[0].float()
    pixels = ((image / 2 + 0.5).clamp(0, 1) * 255).round()
    return vae.encode((pixels / 127.5 - 1).to(vae.dtype)).latent_dist.mean.float() * sf


def pick(n_from: int, n: int, generator: torch.Generator) -> list[int]:
    """n indices into n_from items: a seeded permutation, repeated when n_from < n."""
    order = torch.randperm(n_from, generator=generator).tolist()
    return [order[i % n_from] for i in range(n)]


# =========================================================================== training data in tensors


@dataclass
class TextBank:
    """Encoded texts: embeddings [P, 77, D], token ids [P, 77], token counts [P] (on the device)."""

    texts: list[str]
    emb: torch.Tensor
    ids: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def of(cls, pipe, texts: Sequence[str], device) -> TextBank:
        texts = list(dict.fromkeys(texts))
        ids, lengths = tokenize(pipe.tokenizer, texts)
        return cls(texts, encode_texts(pipe, texts, device), ids.to(device), lengths.to(device))

    def index(self, texts: Sequence[str]) -> torch.Tensor:
        where = {t: i for i, t in enumerate(self.texts)}
        return torch.tensor([where[t] for t in texts], dtype=torch.long, device=self.emb.device)


def calibrate(bank: TextBank, sequences, owners, concept_rows: Sequence[torch.Tensor], retain_rows: torch.Tensor,
              n_concepts: int, hp: Hparams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    """Prototype c (normalised mean of E at the concept's lexical positions in its training prompts), μ⁺, q⁻,
    τ = (μ⁺ + q⁻)/2, T = (μ⁺ − q⁻)/8; m_sem off (with a warning) when μ⁺ ≤ q⁻ or nothing calibrates it."""
    d = bank.emb.shape[-1]
    lex_only = TokenMask(sequences, owners, torch.ones(n_concepts, d), torch.zeros(n_concepts), torch.ones(n_concepts),
                         torch.zeros(n_concepts), gate_eos=False).to(bank.emb.device)
    protos, taus, temps, sem, record = [], [], [], [], []
    lengths = bank.lengths
    pos = torch.arange(bank.emb.shape[1], device=bank.emb.device)
    content_all = (pos > 0) & (pos < (lengths - 1)[:, None])
    for c, rows in enumerate(concept_rows):
        lex = lex_only.lexical(bank.ids[rows])[..., c] * content_all[rows]          # [P, 77]
        picked = bank.emb[rows][lex > 0].float()
        if picked.shape[0] == 0:
            raise DataError(f"ace: concept {c}: its tokens occur in none of its training prompts (check hparams.templates "
                            "and hparams.replace_word)")
        proto = F.normalize(picked.mean(0), dim=0)
        mu = float((F.normalize(picked, dim=-1) @ proto).mean())
        if retain_rows.numel():
            cos = F.normalize(bank.emb[retain_rows].float(), dim=-1) @ proto
            q = float(torch.quantile(cos[content_all[retain_rows]].double(), hp.sem_quantile))
        else:
            q = math.nan
        ok = hp.semantic_mask and not math.isnan(q) and mu > q
        if hp.semantic_mask and not ok:
            log.warning("ace: concept %d: semantic mask off (mu+ %.4f, q- %.4f): only the lexical mask acts", c, mu, q)
        protos.append(proto)
        taus.append((mu + q) / 2 if ok else 0.0)
        temps.append((mu - q) / 8 if ok else 1.0)
        sem.append(1.0 if ok else 0.0)
        record.append({"mu_plus": mu, "q_minus": None if math.isnan(q) else q, "semantic": ok})
    return (torch.stack(protos).cpu(), torch.tensor(taus), torch.tensor(temps), torch.tensor(sem), record)


def mask_tensors(mask: TokenMask) -> dict[str, torch.Tensor]:
    longest = max(len(s) for s in mask.sequences)
    tokens = torch.full((len(mask.sequences), longest), -1, dtype=torch.long)
    for i, s in enumerate(mask.sequences):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return {"mask.tokens": tokens, "mask.token_concept": torch.tensor(mask.owners, dtype=torch.long),
            "mask.prototype": mask.prototype.detach().cpu().float(), "mask.tau": mask.tau.detach().cpu().float(),
            "mask.temperature": mask.temperature.detach().cpu().float(), "mask.semantic": mask.semantic.detach().cpu().float()}


def mask_from_tensors(t: Mapping[str, torch.Tensor], gate_eos: bool) -> TokenMask:
    sequences = [[int(x) for x in row if int(x) >= 0] for row in t["mask.tokens"]]
    return TokenMask(sequences, t["mask.token_concept"].tolist(), t["mask.prototype"], t["mask.tau"],
                     t["mask.temperature"], t["mask.semantic"], gate_eos)


# =========================================================================== stage 2: fine-tuning the gates


@dataclass
class Stage2Data:
    bank: TextBank
    erase_rows: list[torch.Tensor]        # per concept: bank rows of P_C prompts
    erase_targets: list[torch.Tensor]     # per concept: bank rows of their neutral(p)
    adv_rows: list[torch.Tensor]
    adv_targets: list[torch.Tensor]
    retain_rows: torch.Tensor
    concept_latents: torch.Tensor         # [C, n, c, h, w]
    retain_latents: torch.Tensor          # [n, c, h, w]


class GateTrainer:
    """Adam on the gates (and τ, T with ``train_mask``) through the frozen UNet (``unet``, fp32).

    Each concept trains as it would alone (spec §5: every concept's gates are its own): its own Adam state,
    gradient clipping, generator (seeded ``seed``, as a one-concept erase) and a one-concept mask, so the other
    concepts' gates are not in its forward pass. Concepts take turns, one step each; a concept's parameters
    move only on its own steps. (One Adam over all concepts' gates kept moving a concept by momentum on the
    others' turns and filled its second moment with zeros: ≈ √C times the step of a lone concept.)"""

    def __init__(self, unet, gates: Mapping[str, torch.Tensor], mask: TokenMask, data: Stage2Data, hp: Hparams,
                 alphas_cumprod: torch.Tensor, device):
        self.unet, self.hp, self.data, self.mask, self.device = unet, hp, data, mask, device
        self.names = list(gates)
        self.n_concepts = data.concept_latents.shape[0]
        if mask.n_concepts != self.n_concepts:
            raise ValueError(f"ace: a mask of {mask.n_concepts} concepts for data of {self.n_concepts}")
        # per concept c: its gates [1, d] per layer, its mask, its trained tensors, optimiser and generator
        self.params = [[torch.nn.Parameter(gates[n][c : c + 1].detach().to(device, torch.float32).clone())
                        for n in self.names] for c in range(self.n_concepts)]
        self.masks = [mask.concept(c, trainable=hp.train_mask).to(device) for c in range(self.n_concepts)]
        self.trained = [ps + ([m.tau, m.temperature] if hp.train_mask else []) for ps, m in zip(self.params, self.masks)]
        self.opts = [torch.optim.Adam(t, lr=hp.lr, betas=(hp.beta1, hp.beta2)) for t in self.trained]
        self.generators = [torch.Generator().manual_seed(hp.seed) for _ in range(self.n_concepts)]
        self.edit = TrainingGates(dict(zip(self.names, self.params[0])), hp.gate_keys)
        self.abar = alphas_cumprod.to(device, torch.float32)
        self.step_done, self.losses = 0, []

    def concept(self) -> int:
        """The concept whose turn the next step is."""
        return self.step_done % self.n_concepts

    def draw(self, c: int | None = None) -> dict:
        """Concept c's step draws (default: the next step's concept) from its own CPU generator, in a fixed
        order: per erase row adversarial or not, prompt, image; per retain row prompt, image; then t, ε."""
        c = self.concept() if c is None else c
        g, d, hp = self.generators[c], self.data, self.hp
        rows, targets, latents = [], [], []
        for _ in range(hp.erase_batch):
            adv = len(d.adv_rows[c]) > 0 and float(torch.rand((), generator=g)) < hp.adv_prob
            pool, tpool = (d.adv_rows[c], d.adv_targets[c]) if adv else (d.erase_rows[c], d.erase_targets[c])
            i = int(torch.randint(len(pool), (), generator=g))
            rows.append(pool[i])
            targets.append(tpool[i])
            latents.append(d.concept_latents[c, int(torch.randint(d.concept_latents.shape[1], (), generator=g))])
        for _ in range(hp.retain_batch if len(d.retain_rows) else 0):
            i = int(torch.randint(len(d.retain_rows), (), generator=g))
            rows.append(d.retain_rows[i])
            targets.append(d.retain_rows[i])
            latents.append(d.retain_latents[int(torch.randint(d.retain_latents.shape[0], (), generator=g))])
        n = len(rows)
        t = torch.randint(len(self.abar), (n,), generator=g)
        noise = torch.randn((n, *latents[0].shape), generator=g)
        return {"concept": c, "rows": torch.stack(rows), "targets": torch.stack(targets),
                "x0": torch.stack(latents).to(self.device), "t": t.to(self.device), "noise": noise.to(self.device),
                "n_erase": hp.erase_batch}

    def _eps(self, x, t, context):
        return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0].float()

    def losses_of(self, d: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_erase, L_pres) of a draw, with gradients to its concept's gates (the targets from the frozen model)."""
        bank, c = self.data.bank, d["concept"]
        a = self.abar[d["t"]].view(-1, 1, 1, 1)
        x = a.sqrt() * d["x0"] + (1 - a).sqrt() * d["noise"]
        with torch.no_grad():
            self.edit.masks = None
            target = self._eps(x, d["t"], bank.emb[d["targets"]])
        rows = d["rows"]
        self.edit.gates = dict(zip(self.names, self.params[c]))
        self.edit.masks = self.masks[c](bank.emb[rows], bank.ids[rows], bank.lengths[rows])
        try:
            pred = self._eps(x, d["t"], bank.emb[rows])
        finally:
            self.edit.masks = None
        n = d["n_erase"]
        erase = F.mse_loss(pred[:n], target[:n])
        keep = F.mse_loss(pred[n:], target[n:]) if pred.shape[0] > n else pred.new_zeros(())
        return erase, keep

    def step(self) -> float:
        d = self.draw()
        c = d["concept"]
        erase, keep = self.losses_of(d)
        loss = erase + self.hp.lambda_p * keep
        opt = self.opts[c]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.hp.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trained[c], self.hp.grad_clip)
        opt.step()
        with torch.no_grad():
            for p in self.params[c]:
                p.clamp_(0.0, 1.0)
            if self.hp.train_mask:
                m = self.masks[c]
                m.temperature.clamp_(min=1e-4)
                self.mask.tau[c] = m.tau[0]
                self.mask.temperature[c] = m.temperature[0]
        self.step_done += 1
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def gates(self) -> dict[str, torch.Tensor]:
        """{layer: [C, d]} on the CPU."""
        return {n: torch.cat([ps[i] for ps in self.params]).detach().cpu().clone() for i, n in enumerate(self.names)}

    def save_state(self, path: Path, key: str, seconds: float) -> None:
        tensors = {}
        for c in range(self.n_concepts):
            tensors.update({f"gate.{c}.{n}": p for n, p in zip(self.names, self.params[c])})
            for i, p in enumerate(self.trained[c]):
                for k, v in self.opts[c].state.get(p, {}).items():
                    tensors[f"adam.{c}.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"rng.{c}"] = self.generators[c].get_state()
        if self.hp.train_mask:
            tensors["mask.tau"], tensors["mask.temperature"] = self.mask.tau, self.mask.temperature
        save_state(path, key, tensors, {"step": str(self.step_done), "losses": json.dumps(self.losses),
                                        "seconds": str(seconds)})

    def load_state(self, path: Path | None, key: str) -> float:
        saved = load_state(path, key, "ace")
        if saved is None:
            return 0.0
        tensors, meta = saved
        with torch.no_grad():
            for c in range(self.n_concepts):
                for n, p in zip(self.names, self.params[c]):
                    p.copy_(tensors[f"gate.{c}.{n}"])
            if self.hp.train_mask:
                self.mask.tau.copy_(tensors["mask.tau"])
                self.mask.temperature.copy_(tensors["mask.temperature"])
                for c, m in enumerate(self.masks):
                    m.tau.copy_(self.mask.tau[c : c + 1])
                    m.temperature.copy_(self.mask.temperature[c : c + 1])
        for c in range(self.n_concepts):
            state = {}
            for i in range(len(self.trained[c])):
                moments = {k.rsplit(".", 1)[1]: v if k.endswith(".step") else v.to(self.device)
                           for k, v in tensors.items() if k.startswith(f"adam.{c}.{i}.")}
                if moments:
                    state[i] = moments
            self.opts[c].load_state_dict({"state": state, "param_groups": self.opts[c].state_dict()["param_groups"]})
            self.generators[c].set_state(tensors[f"rng.{c}"])
        self.step_done, self.losses = int(meta["step"]), json.loads(meta["losses"])
        return float(meta.get("seconds", 0.0))


def train_step(trainer: GateTrainer) -> float:
    """One stage-2 step (a seam for tests that interrupt training)."""
    return trainer.step()


@contextlib.contextmanager
def frozen(unet):
    """requires_grad off on every UNet parameter (restored on exit): only the gates train."""
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield unet
    finally:
        for p, f in flags:
            p.requires_grad_(f)


# =========================================================================== the method


class ACE(Method):
    name = "ace"
    version = "2"    # 2: data x_0 = VAE latents of the generated images (vae_roundtrip default); per-concept stage 2
    description = ("ACE (arXiv 2504.11850; cpebench reconstruction, spec v1: the paper has no code and its text "
                   "could not be read): per-concept gates on the 16 attn2 K/V rows of the concept's tokens, "
                   "K,V ⊙ (1 − m gᵀ); closed-form ridge gates, then 200 Adam steps of ε-matching with synonym/typo "
                   "prompts; lexical + calibrated semantic token mask")
    trains = True
    operational_hparams = ("save_every",)
    hparams_class = Hparams

    def erase(self, pipe, concepts: Sequence[Concept], hparams: Mapping[str, Any],
              ctx: EraseContext | None = None) -> Artifact:
        from tqdm.auto import tqdm

        names, hp, ctx = erase_inputs(self, pipe, concepts, hparams, ctx)
        device = torch.device(ctx.device)
        seconds: dict[str, float] = {}
        started = mark = time.perf_counter()
        unet = pipe.unet if pipe.unet.dtype == torch.float32 else copy.deepcopy(pipe.unet).float()   # fp32 (docs/methods/ace.md)
        modules = attn2_modules(unet)

        # ---- prompts, texts, mask calibration
        templates = text_list(self.name, hp.templates, "templates", ctx.data_dir, blanks=False)
        bad = [i for i, t in enumerate(templates) if hp.replace_word not in t and hp.replace_word.lower() not in t]
        if bad:
            raise DataError(f"ace: hparams.templates row {bad[0] + 1} ({templates[bad[0]]!r}) lacks the replace word "
                            f"{hp.replace_word!r}")
        per = concept_prompts(names, hp, templates)
        retain = retain_prompts(pipe, names, hp, templates, ctx.data_dir, device)
        texts = [p.prompt for c in per for p in c.erase + c.adversarial] + [p.target for c in per for p in c.erase + c.adversarial]
        bank = TextBank.of(pipe, texts + retain, device)
        sequences, owners = [], []
        for i, c in enumerate(per):
            for v in [c.name] + c.variants:
                ids = sequence_ids(pipe.tokenizer, v)
                if ids and ids not in [s for s, o in zip(sequences, owners) if o == i]:
                    sequences.append(ids)
                    owners.append(i)
        concept_rows = [bank.index([p.prompt for p in c.erase + c.adversarial]) for c in per]
        retain_rows = bank.index(retain)
        proto, tau, temp, sem, calibration = calibrate(bank, sequences, owners, concept_rows, retain_rows, len(names), hp)
        mask = TokenMask(sequences, owners, proto, tau, temp, sem, hp.gate_eos, trainable=hp.train_mask).to(device)
        seconds["prompts_and_mask"] = time.perf_counter() - mark

        # ---- generated examples + stage 1 (or both from the workdir)
        key = json.dumps({"method": self.name, "version": self.version, "concepts": names, "hparams": hp.fingerprinted(),
                          "base": weight_metadata(unet, names, PROJECTIONS)["base_kv_sha256"]}, sort_keys=True, default=str)
        data_path = Path(ctx.workdir) / DATA_FILE if ctx.workdir else None
        saved = load_state(data_path, key, "ace")
        gen = torch.Generator().manual_seed(seed_for(hp.seed, "prompts"))
        image_prompts = [[c.erase[i].prompt for i in pick(len(c.erase), hp.n_images, gen)] for c in per]
        image_targets = [[next(p.target for p in c.erase if p.prompt == q) for q in ps] for c, ps in zip(per, image_prompts)]
        retain_image_prompts = [retain[i] for i in pick(len(retain), hp.n_images, gen)] if retain else []
        if saved is not None:
            tensors, _ = saved
            concept_latents, retain_latents = tensors["concept_latents"].to(device), tensors["retain_latents"].to(device)
            gates0 = {n: tensors[f"gate.{n}"].to(device) for n in modules}
            log.info("ace: data latents and stage-1 gates restored from %s", data_path)
        else:
            mark = time.perf_counter()
            with frozen(unet):
                concept_latents = torch.stack([generate_latents(pipe, unet, ps, hp, seed_for(hp.seed, "images", n), device,
                                                                ctx.progress, f"ace: images of {n}")
                                               for n, ps in zip(names, image_prompts)])
                retain_latents = (generate_latents(pipe, unet, retain_image_prompts, hp, seed_for(hp.seed, "retain-images"),
                                                   device, ctx.progress, "ace: retain images")
                                  if retain else concept_latents.new_zeros((0, *concept_latents.shape[2:])))
            seconds["data_images"] = time.perf_counter() - mark
            mark = time.perf_counter()
            gates0 = stage1(unet, modules, mask, bank, names, image_prompts, image_targets, concept_latents,
                            alphas_cumprod(pipe), hp, device, ctx.progress)
            seconds["stage1_closed_form"] = time.perf_counter() - mark
            if data_path is not None:
                save_state(data_path, key, {"concept_latents": concept_latents, "retain_latents": retain_latents,
                                            **{f"gate.{n}": g for n, g in gates0.items()}})

        # ---- stage 2
        mark = time.perf_counter()
        data = Stage2Data(bank, [bank.index([p.prompt for p in c.erase]) for c in per],
                          [bank.index([p.target for p in c.erase]) for c in per],
                          [bank.index([p.prompt for p in c.adversarial]) for c in per],
                          [bank.index([p.target for p in c.adversarial]) for c in per],
                          retain_rows, concept_latents, retain_latents)
        total = hp.steps * len(names)
        state_path = Path(ctx.workdir) / STATE_FILE if ctx.workdir else None
        with frozen(unet):
            trainer = GateTrainer(unet, gates0, mask, data, hp, alphas_cumprod(pipe), device)
            before = trainer.load_state(state_path, key) if state_path else 0.0
            t0 = time.perf_counter()
            with kv_edit(unet, trainer.edit), tqdm(total=total, initial=trainer.step_done, unit="step", dynamic_ncols=True,
                                                     desc=f"ace: {len(names)} concept{'s' * (len(names) > 1)}",
                                                     disable=not ctx.progress) as bar:
                while trainer.step_done < total:
                    loss = train_step(trainer)
                    bar.update(1)
                    bar.set_postfix_str(f"loss {loss:.4g}")
                    if state_path and (trainer.step_done % hp.save_every == 0 or trainer.step_done == total):
                        trainer.save_state(state_path, key, before + time.perf_counter() - t0)
        gates = trainer.gates()
        seconds["stage2_finetune"] = time.perf_counter() - mark

        tensors = {f"gate.{n}": g for n, g in gates.items()}
        tensors.update(mask_tensors(mask))
        meta = weight_metadata(pipe.unet, names, PROJECTIONS)
        losses = trainer.losses
        meta["ace"] = {
            "label": LABEL, "resolved_hparams": asdict(hp),
            "concepts": [{"name": c.name, "neutral": c.neutral, "variants": c.variants, "erase_prompts": len(c.erase),
                          "adversarial_prompts": len(c.adversarial), "image_prompts": ps}
                         for c, ps in zip(per, image_prompts)],
            "retain_prompts": {"count": len(retain), "sha256": hashlib.sha256("\n".join(retain).encode()).hexdigest(),
                               "image_prompts": retain_image_prompts},
            "mask_calibration": calibration, "token_sequences": len(sequences),
            "stage1_gate_mean": {n: float(g.float().mean()) for n, g in gates0.items()},
            "gate_mean": {n: float(g.mean()) for n, g in gates.items()},
            "stage2": {"steps": total, "loss_first": losses[0] if losses else None,
                       "loss_last": losses[-1] if losses else None,
                       "loss_mean_per_50": [round(sum(losses[i: i + 50]) / len(losses[i: i + 50]), 8)
                                            for i in range(0, len(losses), 50)]},
        }
        meta["seconds"] = round(time.perf_counter() - started, 3)
        meta["stage_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        meta["seconds_per_concept"] = {k: round(v / len(names), 3) for k, v in seconds.items()}
        log.info("ace: %d concepts, %s", len(names), ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))
        return Artifact(method=self.name, tensors=tensors, metadata=meta)

    def apply(self, pipe, artifact: Artifact):
        return applied(pipe, artifact, self.name)


def alphas_cumprod(pipe) -> torch.Tensor:
    """ᾱ_t of the DDPM training schedule of the pipeline's scheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.float()


@torch.no_grad()
def stage1(unet, modules, mask: TokenMask, bank: TextBank, names, image_prompts, image_targets, latents: torch.Tensor,
           abar: torch.Tensor, hp: Hparams, device, progress: bool = False) -> dict[str, torch.Tensor]:
    """The closed-form gates: statistics from every (image, timestep) row, batched over rows and concepts."""
    from tqdm.auto import tqdm

    n_c, n_i = latents.shape[:2]
    steps = len(abar)
    timesteps = [int((k + 0.5) * steps / hp.stats_timesteps) for k in range(hp.stats_timesteps)]
    eps = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed_for(hp.seed, "stats-noise"))).to(device)
    # rows: (concept, image, timestep)
    rows = [(c, i, t) for c in range(n_c) for i in range(n_i) for t in timesteps]
    prompt_rows = torch.stack([bank.index(ps) for ps in image_prompts])          # [C, n]
    target_rows = torch.stack([bank.index(ps) for ps in image_targets])
    own = mask(bank.emb[prompt_rows.flatten()], bank.ids[prompt_rows.flatten()], bank.lengths[prompt_rows.flatten()])
    own = own.view(n_c, n_i, n_c, -1)[torch.arange(n_c), :, torch.arange(n_c)]   # [C, n, 77]: each row's own concept
    abar = abar.to(device)
    gates = None
    for _ in range(hp.cf_iters):
        stats = GateStatistics(modules, n_c, hp.gate_keys, device)
        with context_edit(unet, stats):
            for s in tqdm(range(0, len(rows), hp.stats_batch), disable=not progress, desc="ace: stage 1", leave=False):
                chunk = rows[s : s + hp.stats_batch]
                c = torch.tensor([r[0] for r in chunk], device=device)
                i = torch.tensor([r[1] for r in chunk], device=device)
                t = torch.tensor([r[2] for r in chunk], device=device)
                a = abar[t].view(-1, 1, 1, 1)
                x = a.sqrt() * latents[c, i] + (1 - a).sqrt() * eps[c, i]
                stats.rows = StatsRows(bank.emb[target_rows[c, i]], own[c, i], c, gates)
                unet(x, t, encoder_hidden_states=bank.emb[prompt_rows[c, i]], return_dict=False)
        gates = {n: solve_gates(stats.num[n], stats.den[n], stats.qdo[n], hp) for n in modules}
    return gates


@contextlib.contextmanager
def applied(pipe, artifact: Artifact, method: str = "ace"):
    """The erased model: ``Gates`` installed as a K/V edit and as a ContextEdit (for the texts); exact exit."""
    unet = pipe.unet
    check_base_kv(artifact, unet, method)
    modules = attn2_modules(unet)
    hp = artifact.metadata.get("ace", {}).get("resolved_hparams", {})
    missing = [n for n in modules if f"gate.{n}" not in artifact.tensors]
    if missing:
        raise ConfigError(f"{method} artifact has no gate for layer {missing[0]!r}: it was made for another UNet")
    device = next(unet.parameters()).device
    gates = {n: artifact.tensors[f"gate.{n}"].to(device, torch.float32) for n in modules}
    mask = mask_from_tensors(artifact.tensors, bool(hp.get("gate_eos", True))).to(device)
    edit = Gates(gates, mask, pipe.tokenizer, bool(hp.get("gate_keys", True)))
    with kv_edit(unet, edit), context_edit(unet, edit):
        yield
