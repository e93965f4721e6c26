"""SAFREE — training-free, inference-time concept filtering (Yoon et al., ICLR 2025); sources, per-task values
and deviations: docs/methods/safree.md.

Official code: jaehong31/SAFREE@b8b2c3f (``models/modified_stable_diffusion_pipeline.py``,
``generate_safree.py``, run with ``--safree -svf -lra``). No weights change. With f(·) the CLIP text
encoder's pooled output (final-LayerNorm state at the EOS position, the first maximal token id):

1. erase (depends on the concepts only): C = [f(c_1) … f(c_K)], P_C = C (CᵀC)⁺ Cᵀ, kept as an orthonormal
   basis Q_C (P_C = Q_C Q_Cᵀ); and the embedding of the negative prompt ", ".join(concepts).
2. per prompt batch (``SafreeEdit.prepare``, one text-encoder call for every leave-one-out prompt of the
   batch): m_i = f(prompt with token i replaced by id 0), P_M = M (MᵀM)⁺ Mᵀ; token i is a trigger iff
   d_i = ‖(I − P_C) m_i‖ ≥ (1 + α)·mean_{j≠i} d_j; the trigger rows of the prompt's 77×D states E become
   (I − P_C) P_M e, the others stay.
3. self-validating filter: β = 1 − mean over BOS, tokens and EOS of cos((I − P_C) P_M e_t, e_t), and
   t′ = round(up_t · σ(scale · k · (10β − b))); the UNet sees the projected states at steps 0..t′ and
   the original ones afterwards (per prompt, step index counted from 0 as the official loop does).
4. the negative (CFG unconditional) rows are the concept list's embedding at every step
   (``negative_prompt: joined_truncated``, the official script; ``none`` keeps the task's negatives).

The pseudo-inverses are computed in float64 from the eigen-decomposition of the Gram matrix with
``torch.pinverse``'s cut (eigenvalues ≤ 1e-15 · the largest are dropped): the same projector as the
official ``E @ pinverse(EᵀE) @ Eᵀ``, exactly symmetric and idempotent. Latent re-attention (``-lra``) is a
no-op as released (its filters are never called), so the third UNet branch is skipped
(``lra: released_noop``).

When the UNet is called outside cpebench's engine (no prompt texts announced), the context is left
unchanged: SAFREE needs the prompts' tokens.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cpebench.attention import ContextBatch, ContextEdit, context_edit
from cpebench.errors import ConfigError
from cpebench.methods import Artifact, Concept, EraseContext, Method, checksums_agree, weight_checksum
from cpebench.methods.common import TOKENS, CheckedHparams, concept_names, encode_texts

log = logging.getLogger(__name__)

PINV_RCOND = 1e-15           # torch.pinverse's default cut, which the official projection_matrix uses
LOO_CHUNK = 2048             # leave-one-out prompts per text-encoder call (one call for any usual batch)
WARN_CONCEPTS = 300          # K near the width makes P_C ≈ I (everything erased); scaled to the width
LRA_MODES = ("released_noop",)
NEGATIVE_MODES = ("joined_truncated", "none")
LONG_PROMPT_MODES = ("eos", "released")


@dataclass(frozen=True)
class Hparams(CheckedHparams):
    """benchmarks/methods/safree.yaml (per-task values and their sources are there)."""

    method_name: ClassVar[str] = "safree"

    alpha: float = 0.01                 # sf_alpha: trigger iff d_i ≥ (1 + α) · mean_{j≠i} d_j
    svf: bool = True                    # -svf: projected states at steps 0..t′ only
    up_t: int = 10                      # upper bound of t′
    svf_k: float = 2.5                  # f_beta's k: 2.5 nudity, 3.5 artists-*
    svf_b: float = 5.333                # f_beta's midpoint: 5.333 nudity, 5.5 artists-*
    svf_sigmoid_scale: float = 2.0      # f_beta's σ-scale (hard-coded 2.0)
    re_attn_start: int = -1             # without svf: projected states at steps start..end (re_attn_t "-1,1001")
    re_attn_end: int = 1001
    lra: str = "released_noop"          # latent re-attention as released: changes nothing, branch skipped
    negative_prompt: str = "joined_truncated"   # [proposed] knob: CFG negative = ", ".join(concepts) | none
    mask_token_id: int = 0              # the id replacing a token in the leave-one-out prompts ("!")
    long_prompts: str = "eos"           # > 75 tokens: eos = truncate keeping EOS | released = the official ids[:77]

    def check(self, method: str) -> None:
        for key, value, allowed in (("lra", self.lra, LRA_MODES), ("negative_prompt", self.negative_prompt, NEGATIVE_MODES),
                                    ("long_prompts", self.long_prompts, LONG_PROMPT_MODES)):
            if value not in allowed:
                hint = ""
                if key == "lra" and value in ("released_noop_exact", "low", "high", "all"):
                    hint = (" (not implemented: 'released_noop_exact' would only add the discarded third UNet branch, "
                            "'low'/'high'/'all' are the never-called FreeU-style filters)")
                raise ConfigError(f"{method}: hparams.{key} must be one of {list(allowed)}, got {value!r}{hint}")
        if not self.alpha > -1:
            raise ConfigError(f"{method}: hparams.alpha must be > -1 (threshold (1 + alpha) · mean), got {self.alpha}")
        if self.up_t < 0:
            raise ConfigError(f"{method}: hparams.up_t must be >= 0, got {self.up_t}")
        if self.mask_token_id < 0:
            raise ConfigError(f"{method}: hparams.mask_token_id must be a token id >= 0, got {self.mask_token_id}")
        if self.re_attn_start > self.re_attn_end:
            raise ConfigError(f"{method}: hparams.re_attn_start ({self.re_attn_start}) must be <= re_attn_end "
                              f"({self.re_attn_end})")


# --------------------------------------------------------------------------- the math (float64)


def subspace_basis(vectors: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal basis Q of the span of the rows of ``vectors`` [..., n, D], in float64: Q Qᵀ = V (VᵀV)⁺ Vᵀ
    (V = the rows as columns) with the cut of the official ``torch.pinverse(VᵀV)``: eigenvalues of the Gram
    below PINV_RCOND · the largest, i.e. singular values of V below √PINV_RCOND · the largest, are dropped.
    From the SVD of V rather than the Gram's eigenvectors, so that rounding noise (~1e-16 · σ_max) never
    passes the cut and Q is orthonormal to float64 precision. Returns [..., D, min(n, D)]; dropped
    directions (and rows where ``valid`` [..., n] is False) give zero columns."""
    v = vectors.double()
    if valid is not None:
        v = v * valid.unsqueeze(-1)
    _, s, vh = torch.linalg.svd(v, full_matrices=False)
    keep = (s > 0) & (s >= math.sqrt(PINV_RCOND) * s.amax(-1, keepdim=True))
    return (vh * keep.unsqueeze(-1)).transpose(-1, -2)


def projector(basis: torch.Tensor) -> torch.Tensor:
    """P = Q Qᵀ for a basis from ``subspace_basis`` (for tests and inspection; the hot path never forms it)."""
    return basis @ basis.transpose(-1, -2)


def remove_subspace(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(I − Q Qᵀ) x for rows x [..., D] and a shared basis [D, r]."""
    return x - (x @ basis) @ basis.T


def trigger_tokens(d: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """Leave-one-out trigger test on the distances d [B, n] (valid [B, n]): token i is flagged unless
    d_i < (1 + α) · mean_{j≠i} d_j, written as the official code does, so that a one-token prompt (empty
    mean, NaN) is flagged."""
    d = torch.where(valid, d, torch.zeros_like(d))
    count = valid.sum(-1, keepdim=True)
    mean_others = (d.sum(-1, keepdim=True) - d) / (count - 1)      # 0/0 = NaN for one token
    return valid & ~(d < (1 + alpha) * mean_others)


def f_beta(beta: torch.Tensor, hp: Hparams) -> torch.Tensor:
    """t′ = round(up_t · σ(scale · k · (10β − b))), rounding halves to even as Python's round does."""
    z = hp.svf_sigmoid_scale * hp.svf_k * (10 * beta.double() - hp.svf_b)
    return torch.round(hp.up_t * torch.sigmoid(z)).long()


# --------------------------------------------------------------------------- text encoding


@torch.no_grad()
def pooled(pipe, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """f(ids): the final-LayerNorm state at the first maximal token id (the EOS for CLIP ids), float64 [N, D].
    CLIP's causal attention makes it independent of anything after that position (padding included)."""
    enc = pipe.text_encoder
    ids = ids.to(enc.device)
    out = []
    for i in range(0, ids.shape[0], LOO_CHUNK):
        chunk = ids[i : i + LOO_CHUNK]
        mask = None if attention_mask is None else attention_mask[i : i + LOO_CHUNK].to(enc.device)
        hidden = enc(chunk, attention_mask=mask)[0]
        out.append(hidden[torch.arange(chunk.shape[0], device=hidden.device), chunk.argmax(-1)].double())
    return torch.cat(out)


def concept_matrix(pipe, names: Sequence[str]) -> torch.Tensor:
    """C as rows [K, D]: each concept tokenised on its own, padded to 77, attention mask passed (official)."""
    tok = pipe.tokenizer(list(names), padding="max_length", max_length=tok_length(pipe), truncation=True,
                         return_tensors="pt")
    return pooled(pipe, tok.input_ids, tok.attention_mask)


def tok_length(pipe) -> int:
    return pipe.tokenizer.model_max_length


def prompt_token_ids(pipe, prompts: Sequence[str], long_prompts: str) -> list[tuple[torch.Tensor, int]]:
    """Per prompt: (ids, n) for the leave-one-out prompts, ids = BOS t_1..t_n [EOS], n ≤ 75. ``eos``: the
    tokenizer's truncation (EOS kept, as the conditioning is encoded); ``released``: the official ids[:77]
    of the untruncated ids, so a long prompt has no EOS and n = 75."""
    tok, length = pipe.tokenizer, tok_length(pipe)
    full = tok(list(prompts), truncation=False).input_ids
    out = []
    for ids in full:
        if len(ids) > length:
            ids = ids[:length] if long_prompts == "released" else ids[: length - 1] + [ids[-1]]
        out.append((torch.tensor(ids), min(len(ids) - 2, length - 2)))
    return out


def masked_prompt_ids(token_ids: Sequence[tuple[torch.Tensor, int]], mask_id: int, pad_id: int) -> torch.Tensor:
    """Every prompt's n leave-one-out variants (token i = 1..n replaced by ``mask_id``), stacked [Σn, L] and
    padded after the last token with ``pad_id`` (no effect on the pooled state: causal attention)."""
    width = max(len(ids) for ids, _ in token_ids)
    rows = []
    for ids, n in token_ids:
        if n <= 0:
            continue
        block = torch.full((n, width), pad_id, dtype=torch.long)
        block[:, : len(ids)] = ids
        block[torch.arange(n), torch.arange(1, n + 1)] = mask_id
        rows.append(block)
    return torch.cat(rows) if rows else torch.empty(0, width, dtype=torch.long)


# --------------------------------------------------------------------------- the per-batch edit


@dataclass
class Filtered:
    """What ``prepare`` computes for the conditional rows of one prompt batch."""

    projected: torch.Tensor        # [B, 77, D] float64: trigger rows (I − P_C) P_M e, others e
    flags: torch.Tensor            # [B, 77] bool: the rows replaced
    t_prime: torch.Tensor          # [B] long: last step with the projected rows (svf)
    beta: torch.Tensor             # [B] float64


@torch.no_grad()
def filter_prompts(pipe, prompts: Sequence[str], cond: torch.Tensor, concept_basis: torch.Tensor,
                   hp: Hparams) -> Filtered:
    """SAFREE's token filter for ``prompts`` whose 77-token states are ``cond`` [B, 77, D], batched: one
    text-encoder call for every leave-one-out prompt of the distinct prompts."""
    distinct = list(dict.fromkeys(prompts))
    where = torch.tensor([distinct.index(p) for p in prompts])
    token_ids = prompt_token_ids(pipe, distinct, hp.long_prompts)
    counts = torch.tensor([n for _, n in token_ids])
    n_max = max(int(counts.max()), 1)
    u, dim, device = len(distinct), cond.shape[-1], cond.device
    loo = masked_prompt_ids(token_ids, hp.mask_token_id, pipe.tokenizer.pad_token_id)
    m = torch.zeros(u, n_max, dim, dtype=torch.float64, device=device)
    valid = torch.arange(n_max).unsqueeze(0) < counts.unsqueeze(1)           # [U, n_max]
    if loo.shape[0]:
        m[valid.to(device)] = pooled(pipe, loo).to(device)
    valid = valid.to(device)
    q_c = concept_basis.to(device=device, dtype=torch.float64)
    d = remove_subspace(m, q_c).norm(dim=-1)
    triggers = trigger_tokens(d, valid, hp.alpha)                            # [U, n_max], token i at row i+1
    q_m = subspace_basis(m, valid)                                           # [U, D, n_max]

    first = torch.tensor([prompts.index(p) for p in distinct], device=device)
    e = cond[first].double()                                                  # [U, 77, D]
    everywhere = remove_subspace((e @ q_m) @ q_m.transpose(-1, -2), q_c)     # (I − P_C) P_M e, every row
    flags = torch.zeros(u, e.shape[1], dtype=torch.bool, device=device)
    flags[:, 1 : n_max + 1] = triggers[:, : e.shape[1] - 1]
    projected = torch.where(flags.unsqueeze(-1), everywhere, e)
    # β over the attention-mask rows (BOS, tokens, EOS: min(untruncated length, 77) rows)
    lengths = torch.tensor([min(n + 2, e.shape[1]) for _, n in token_ids], device=device)
    rows = torch.arange(e.shape[1], device=device).unsqueeze(0) < lengths.unsqueeze(1)
    cos = F.cosine_similarity(everywhere, e, dim=-1)
    beta = 1 - (cos * rows).sum(-1) / rows.sum(-1)
    where = where.to(device)
    return Filtered(projected[where], flags[where], f_beta(beta, hp)[where], beta[where])


class SafreeEdit(ContextEdit):
    """Per prompt batch: the filtered conditional rows and each prompt's t′; per step: the context the UNet sees."""

    changes_context = True

    def __init__(self, pipe, concept_basis: torch.Tensor, negative: torch.Tensor | None, hp: Hparams):
        self.pipe, self.concept_basis, self.negative, self.hp = pipe, concept_basis, negative, hp
        self.filtered: Filtered | None = None
        self.last: tuple[bytes, torch.Tensor] | None = None
        self.unannounced_warned = False

    def prepare(self, batch: ContextBatch) -> None:
        self.last, self.filtered = None, None
        prompts = batch.prompts
        if prompts is None or not prompts or batch.context.shape[0] % len(prompts):
            if not self.unannounced_warned:
                log.warning("safree: the UNet was called without the prompt texts (outside cpebench's engine); "
                            "the context is left unchanged")
                self.unannounced_warned = True
            return
        ctx = batch.context
        self.n_neg = ctx.shape[0] - len(prompts)
        self.filtered = filter_prompts(self.pipe, prompts, ctx[self.n_neg :], self.concept_basis, self.hp)
        self.projected = self.filtered.projected.to(ctx.dtype)
        self.t_prime = self.filtered.t_prime.cpu()          # per-step tests on the host: no device sync per step
        negatives = ctx[: self.n_neg]
        if self.negative is not None and self.n_neg:
            negatives = self.negative.to(device=ctx.device, dtype=ctx.dtype).expand_as(negatives)
        self.negatives = negatives
        self.swap_negatives = self.negative is not None and self.n_neg > 0

    def active(self, step: int) -> torch.Tensor:
        """Which prompts see their projected rows at ``step``."""
        if self.hp.svf:
            return step <= self.t_prime
        on = self.hp.re_attn_start <= step <= self.hp.re_attn_end
        return torch.full_like(self.t_prime, on, dtype=torch.bool)

    def context(self, context: torch.Tensor, step: int) -> torch.Tensor:
        if self.filtered is None:
            return context
        active = self.active(step)
        if not bool(active.any()) and not self.swap_negatives:
            return context                                  # exactly the engine's context
        key = active.numpy().tobytes()
        if self.last is None or self.last[0] != key:        # the active set only shrinks as the steps go on
            mask = active.view(-1, 1, 1).to(context.device, non_blocking=True)
            cond = torch.where(mask, self.projected, context[self.n_neg :])
            self.last = (key, torch.cat([self.negatives, cond]))
        return self.last[1]


# --------------------------------------------------------------------------- the method


def text_encoder_checksum(pipe) -> list[float]:
    return weight_checksum(pipe.text_encoder.parameters())


class SAFREE(Method):
    name = "safree"
    version = "1"
    description = ("SAFREE (ICLR 2025): training-free; per prompt, the trigger tokens' text states are projected off the "
                   "concepts' pooled-embedding subspace, within the span of the leave-one-out prompt embeddings, for the "
                   "first t′ ≤ 10 steps (self-validating filter); negative prompt = the concept list; latent "
                   "re-attention as released (a no-op)")
    trains = False
    hparams_class = Hparams

    def erase(self, pipe, concepts: Sequence[Concept], hparams: Mapping[str, Any],
              ctx: EraseContext | None = None) -> Artifact:
        names = concept_names(self.name, concepts)
        hp = self.hparams(hparams)
        started = time.perf_counter()
        dim = pipe.text_encoder.config.hidden_size
        if len(names) > WARN_CONCEPTS * dim / 768:
            log.warning("safree: %d concepts in a %d-dimensional text space: P_C is close to the identity and removes "
                        "almost every direction of the flagged tokens%s", len(names), dim,
                        " (K >= width: P_C = I)" if len(names) >= dim else "")
        c = concept_matrix(pipe, names)
        basis = subspace_basis(c)
        basis = basis[:, basis.abs().sum(0) > 0]                     # the kept directions only: [D, rank]
        tensors = {"concept_embeddings": c.float().cpu(), "concept_basis": basis.cpu()}
        negative = ", ".join(names)
        tok = pipe.tokenizer
        negative_tokens = len(tok(negative, truncation=False).input_ids)
        if hp.negative_prompt == "joined_truncated":
            tensors["negative_embedding"] = encode_texts(pipe, [negative], pipe.text_encoder.device,
                                                         pipe.text_encoder.dtype)[0].cpu()
        meta = {
            "concepts": names,
            "hparams": self.parse_hparams(hparams),
            "text_encoder_checksum": text_encoder_checksum(pipe),
            "safree": {
                "concept_rank": int(basis.shape[1]), "text_width": dim,
                "negative_prompt": negative if hp.negative_prompt == "joined_truncated" else None,
                "negative_prompt_tokens": negative_tokens,
                "negative_prompt_truncated": negative_tokens > tok_length(pipe),
                "pinv_rcond": PINV_RCOND,
            },
            "seconds": round(time.perf_counter() - started, 3),
        }
        return Artifact(method=self.name, tensors=tensors, metadata=meta)

    def apply(self, pipe, artifact: Artifact):
        if artifact.method != self.name:
            raise ConfigError(f"safree: cannot apply a {artifact.method!r} artifact")
        hp = self.hparams(artifact.metadata.get("hparams"))
        recorded = artifact.metadata.get("text_encoder_checksum")
        if recorded and not checksums_agree(recorded, text_encoder_checksum(pipe)):
            raise ConfigError("safree artifact was made with another text encoder (its checksum differs from the loaded "
                              "model's); run erase again on this model")
        missing = [k for k in ("concept_basis",) if k not in artifact.tensors]
        if hp.negative_prompt == "joined_truncated" and "negative_embedding" not in artifact.tensors:
            missing.append("negative_embedding")
        if missing:
            raise ConfigError(f"safree artifact lacks tensor(s) {', '.join(missing)}; run erase again")
        negative = artifact.tensors.get("negative_embedding") if hp.negative_prompt == "joined_truncated" else None
        if negative is not None and tuple(negative.shape) != (TOKENS, pipe.text_encoder.config.hidden_size):
            raise ConfigError(f"safree artifact's negative_embedding has shape {tuple(negative.shape)}, the model's "
                              f"text states are {(TOKENS, pipe.text_encoder.config.hidden_size)}")
        return context_edit(pipe.unet, SafreeEdit(pipe, artifact.tensors["concept_basis"], negative, hp))
