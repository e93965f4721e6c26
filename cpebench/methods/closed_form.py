"""The closed-form edit of the cross-attention K/V projections that UCE introduced and RECE and MACE build on.

Every ``attn2.to_k`` / ``attn2.to_v`` weight W (32 matrices in SD-1.x, W_old = the weights before the
edit) is replaced by the minimiser of

    λ‖W − W_old‖² + s_e Σ_i ‖W c_i − v_i*‖² + s_p Σ_j ‖W r_j − W_old r_j‖²

    W_new = (λ W_old + s_e Σ v_i* c_iᵀ + s_p Σ W_old r_j r_jᵀ) (λ I + s_e Σ c_i c_iᵀ + s_p Σ r_j r_jᵀ)⁻¹

with c_i the erase rows, v_i* = W_old g_i the guide rows' outputs, r_j the preserve rows. Because every
target is W_old times a text vector, the numerator is W_old · B with B = λI + s_e Σ g_i c_iᵀ + s_p Σ r_j r_jᵀ:
the edit is W_new = W_old · T with one D×D matrix T = B A⁻¹ shared by all 32 matrices (A = the bracket
above). It is solved once, in float64, and the new weights are cast back to float32. The texts are
encoded by a float64 copy of the text encoder (``float64_text``): the normal equations amplify the fp32
encoder's rounding by their condition number.

``uce_edit`` is UCE's edit (baselines/uce.py; its token rows, retain list and scales are described
there); RECE starts from it. ``weight_edit`` / ``weight_metadata`` apply and describe any artifact that
replaces K/V weights (UCE, RECE, MACE).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from ..attention import swapped_weights
from ..errors import ConfigError
from . import Artifact
from .common import (ENCODE_BATCH, PROJECTIONS, TOKENS, base_kv_checksums, base_kv_sha256, check_base_kv,
                     check_non_negative, check_projections, encode_texts, kv_layers, preserve_list)

# recorded in UCE/RECE artifacts: how the edit was computed (see float64_text)
NUMERICS = "texts encoded by a float64 copy of the text encoder; sums and solves in float64; stored as float32"


# =========================================================================== settings and texts


def resolve_preserve_scale(value: Any, n_retain: int, method: str, key: str = "preserve_scale") -> float:
    """``auto`` (or null) = the paper code's max(0.1, 1 / len(retain list))."""
    if value is None or (isinstance(value, str) and value.lower() == "auto"):
        return max(0.1, 1.0 / max(n_retain, 1))
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{method}: hparams.{key} must be a number or 'auto', got {value!r}") from None
    check_non_negative(method, **{key: out})
    return out


@dataclass(frozen=True)
class UCESettings:
    """What ``uce_edit`` reads (UCE's own Hparams has these fields too; RECE builds one from its ``uce_*``)."""

    guide: Any = " "
    preserve: Any = ()
    preserve_empty: bool = True
    lamb: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: Any = "auto"
    tokens: str = "sequence"
    projections: tuple = PROJECTIONS

    def check(self, method: str) -> None:
        check_uce_settings(self, method)


def check_uce_settings(hp, method: str) -> None:
    """The checks of the fields ``uce_edit`` reads, on any object that has them."""
    check_projections(hp.projections, method)
    check_non_negative(method, lamb=hp.lamb, erase_scale=hp.erase_scale)
    if hp.tokens not in ("sequence", "last"):
        raise ConfigError(f"{method}: hparams.tokens must be 'sequence' (paper code) or 'last' (HEAD), got {hp.tokens!r}")
    if not isinstance(hp.guide, (str, list, tuple)) or (not isinstance(hp.guide, str) and (
            not hp.guide or not all(isinstance(g, str) for g in hp.guide))):
        raise ConfigError(f"{method}: hparams.guide must be a text or a non-empty list of texts, got {hp.guide!r}")


def guides_for(method: str, guide: Any, names: Sequence[str], key: str = "guide") -> list[str]:
    """One guide text per concept. The paper code maps a guide of '' to ' ' (the same tokens)."""
    guides = [guide] if isinstance(guide, str) else list(guide)
    if len(guides) == 1:
        guides = guides * len(names)
    if len(guides) != len(names):
        raise ConfigError(f"{method}: hparams.{key} has {len(guides)} texts for {len(names)} concepts "
                          "(give one for all, or one per concept)")
    return [g if g != "" else " " for g in guides]


def list_digest(texts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


# =========================================================================== embeddings


def last_token_index(pipe, texts: Sequence[str]) -> torch.Tensor:
    """Per text, the position of its last word token: ``attention_mask.sum() − 2`` (BOS at 0, EOS after)."""
    tok = pipe.tokenizer
    if tok.model_max_length != TOKENS:
        raise ConfigError(f"the tokenizer pads to {tok.model_max_length} tokens; UCE/RECE expect SD-1.x's {TOKENS}")
    mask = tok(list(texts), padding="max_length", max_length=TOKENS, truncation=True).attention_mask
    return torch.tensor([sum(m) - 2 for m in mask])


@torch.no_grad()
@contextlib.contextmanager
def float64_text(pipe):
    """The text side of a closed-form edit in float64: the pipe's tokenizer and a float64 copy of its text
    encoder (same device), usable wherever ``encode_texts`` takes a pipe; the copy is freed on exit.

    The normal equations amplify any rounding in their text vectors by their condition number (up to ~7e5
    with the 1,734-artist preserve set): fp32 embeddings move the edit by a few 1e-6 relative, float64 ones
    match the paper code run in float64 to about 1e-12 (tests/test_uce_rece.py). Costs one encoder copy
    (~1 GB for SD-1.x) and float64 encoding of the texts (seconds on a GPU, a minute or two on a CPU for
    the artist task's 1,734 texts)."""
    encoder = copy.deepcopy(pipe.text_encoder).to(torch.float64)
    try:
        yield SimpleNamespace(tokenizer=pipe.tokenizer, text_encoder=encoder)
    finally:
        del encoder


def erase_rows(pipe, concepts: Sequence[str], guides: Sequence[str], tokens: str, device):
    """The aligned (c_i, g_i) rows of the erase set: float64 [n, D] each, and the row count per concept."""
    texts = list(dict.fromkeys(list(concepts) + list(guides)))
    slot = {t: i for i, t in enumerate(texts)}
    emb, last = encode_texts(pipe, texts, device, torch.float64), last_token_index(pipe, texts).tolist()
    cs, gs, counts = [], [], []
    for concept, guide in zip(concepts, guides):
        a, b = last[slot[concept]], last[slot[guide]]
        e_c, e_g = emb[slot[concept]], emb[slot[guide]]
        if tokens == "sequence":   # last word token .. EOS .. padding, aligned, equal lengths
            far = max(a, b)
            c, g = e_c[a : TOKENS - (far - a)], e_g[b : TOKENS - (far - b)]
        else:                      # HEAD: the last word token only
            c, g = e_c[a : a + 1], e_g[b : b + 1]
        cs.append(c)
        gs.append(g)
        counts.append(c.shape[0])
    return torch.cat(cs), torch.cat(gs), counts


@torch.no_grad()
def preserve_gram(pipe, texts: Sequence[str], tokens: str, device, progress: bool = False,
                  desc: str = "encode preserve") -> tuple[torch.Tensor, int]:
    """Σ r rᵀ over the preserve rows (all 77 rows per text, or its last word token), float64 [D, D];
    encoded in batches so 1,700 artists never sit in memory at once. Returns (gram, number of rows)."""
    from tqdm.auto import tqdm

    d = pipe.text_encoder.config.hidden_size
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    rows = 0
    texts = list(texts)
    for i in tqdm(range(0, len(texts), ENCODE_BATCH), desc=desc, unit="batch", leave=False,
                  disable=not progress or len(texts) <= ENCODE_BATCH):
        chunk = texts[i : i + ENCODE_BATCH]
        emb = encode_texts(pipe, chunk, device, torch.float64)
        if tokens == "last":
            emb = emb[torch.arange(len(chunk)), last_token_index(pipe, chunk).to(emb.device)].unsqueeze(1)
        r = emb.reshape(-1, d)
        gram += r.T @ r
        rows += r.shape[0]
    return gram, rows


# =========================================================================== the closed form


@dataclass
class EditTerms:
    """Sufficient statistics of one closed-form edit (float64 D×D). Row vectors c, g, r as in the module docstring."""

    cc: torch.Tensor      # Σ_i c_i c_iᵀ     (erase inputs)
    gc: torch.Tensor      # Σ_i g_i c_iᵀ     (targets are W g_i)
    gg: torch.Tensor      # Σ_i g_i g_iᵀ     (diagnostics only)
    rr: torch.Tensor      # Σ_j r_j r_jᵀ     (preserve inputs)
    n_erase: int = 0
    n_preserve: int = 0

    @classmethod
    def from_rows(cls, c: torch.Tensor, g: torch.Tensor, rr: torch.Tensor, n_preserve: int) -> EditTerms:
        return cls(cc=c.T @ c, gc=g.T @ c, gg=g.T @ g, rr=rr, n_erase=c.shape[0], n_preserve=n_preserve)


def closed_form(terms: EditTerms, lamb: float, erase_scale: float, preserve_scale: float,
                method: str = "uce") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, A, B) with A = λI + s_e Σcc + s_p Σrr, B = λI + s_e Σgc + s_p Σrr and T = B A⁻¹, so that
    W_new = W_old · T for every edited matrix (the normal equations W_new A = W_old B)."""
    d = terms.cc.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=terms.cc.device)
    a = lamb * eye + erase_scale * terms.cc + preserve_scale * terms.rr
    b = lamb * eye + erase_scale * terms.gc + preserve_scale * terms.rr
    eig = torch.linalg.eigvalsh(a)                # A is symmetric positive semi-definite
    if not bool(eig[0] > eig[-1] * d * torch.finfo(torch.float64).eps):
        raise ConfigError(f"{method}: the closed form's matrix λI + s_e Σcc + s_p Σrr is singular (eigenvalues "
                          f"{float(eig[0]):.3g} .. {float(eig[-1]):.3g}); use hparams.lamb > 0")
    t = torch.linalg.solve(a, b.T).T              # (A⁻¹ Bᵀ)ᵀ = B A⁻¹
    return t, a, b


def edit_layers(unet, projections: Sequence[str] = PROJECTIONS) -> list[tuple[str, torch.nn.Linear]]:
    """The edited Linear layers: ``...attn2.<p>`` for p in projections (SD-1.x: 16 per projection)."""
    out = kv_layers(unet, projections)
    for name, module in out:
        if module.bias is not None:
            raise ConfigError(f"{name} has a bias; the UCE closed form is for SD-1.x's bias-free K/V projections")
    return out


def read_weights(unet, projections: Sequence[str], device) -> dict[str, torch.Tensor]:
    """{'<layer>.weight': W} as float64 on ``device``: the tensor names the artifact and swapped_weights use."""
    return {f"{name}.weight": lin.weight.detach().to(device=device, dtype=torch.float64)
            for name, lin in edit_layers(unet, projections)}


def gram(weights: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_l W_lᵀ W_l (or Σ_l W_lᵀ V_l): a D×D float64 summary of all edited matrices."""
    other = other if other is not None else weights
    return sum(w.T @ other[k] for k, w in weights.items())


def apply_transform(weights: Mapping[str, torch.Tensor], t: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: w @ t for k, w in weights.items()}


def to_storage(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float64 solution → the float32 weights the model (and the artifact) hold."""
    return {k: w.to(torch.float32) for k, w in weights.items()}


def edit_report(terms: EditTerms, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k0: torch.Tensor,
                erase_scale: float, preserve_scale: float, lamb: float) -> dict:
    """Summed over every edited matrix (K0 = Σ W_oldᵀ W_old turns D-space sums into K/V-space sums):
    the erase residual Σ‖W c − W_old g‖² before and after, the preserve change Σ‖(W_new − W_old) r‖²
    relative to Σ‖W_old r‖², the objective before/after and the normal-equation residual ‖TA − B‖/‖B‖."""
    tr = lambda m: float(torch.sum(k0 * m))
    eye = torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    before = tr(terms.cc - terms.gc - terms.gc.T + terms.gg)
    x = t @ terms.cc @ t.T - t @ terms.gc.T - terms.gc @ t.T + terms.gg
    after = tr(x)
    dt = t - eye
    preserve_change = tr(dt @ terms.rr @ dt.T)
    preserve_norm = tr(terms.rr)
    closeness = tr(dt @ dt.T)
    obj_before = erase_scale * before
    obj_after = lamb * closeness + erase_scale * after + preserve_scale * preserve_change
    return {
        "erase_rows": terms.n_erase, "preserve_rows": terms.n_preserve,
        "erase_residual_before": before, "erase_residual_after": after,
        "erase_residual_ratio": after / before if before > 0 else 0.0,
        "preserve_change": preserve_change,
        "preserve_change_relative": preserve_change / preserve_norm if preserve_norm > 0 else 0.0,
        "objective_before": obj_before, "objective_after": obj_after,
        "normal_equation_residual": float(torch.linalg.norm(t @ a - b) / torch.linalg.norm(b)),
    }


@dataclass
class UCEResult:
    weights: dict            # float64 solution, '<layer>.weight' -> W_new
    terms: EditTerms
    transform: torch.Tensor  # T (W_new = W_old T)
    a: torch.Tensor
    b: torch.Tensor
    guides: list
    preserve: list           # preserve concepts (without '')
    preserve_scale: float
    report: dict


def cached_preserve_gram(cache: dict | None, pipe, texts: Sequence[str], tokens: str, device, progress: bool = False,
                         desc: str = "encode preserve") -> tuple[torch.Tensor, int]:
    """``preserve_gram`` memoised in ``cache`` (RECE's retain list often equals its UCE stage's)."""
    key = (tokens, tuple(t if t.strip() else "" for t in texts))   # '' and ' ' have the same tokens
    if cache is None or key not in cache:
        value = preserve_gram(pipe, texts, tokens, device, progress=progress, desc=desc)
        if cache is None:
            return value
        cache[key] = value
    return cache[key]


def uce_edit(pipe, names: Sequence[str], hp: UCESettings, device, data_dir=None, progress: bool = False,
             weights: Mapping[str, torch.Tensor] | None = None, method: str = "uce",
             gram_cache: dict | None = None, k0: torch.Tensor | None = None, text=None) -> UCEResult:
    """The UCE closed form on ``pipe`` (left unchanged). ``weights`` = W_old (default: the pipe's);
    ``k0`` = Σ W_oldᵀ W_old if the caller has it (diagnostics only); ``text`` = the float64 text side
    (``float64_text``) if the caller has one, else one is made here for this edit."""
    guides = guides_for(method, hp.guide, names)
    preserve = preserve_list(method, hp.preserve, names, data_dir)
    retain = ([""] if hp.preserve_empty else []) + preserve
    s_p = resolve_preserve_scale(hp.preserve_scale, len(retain), method)
    with (float64_text(pipe) if text is None else contextlib.nullcontext(text)) as text:
        c, g, _ = erase_rows(text, names, guides, hp.tokens, device)
        rr, n_r = cached_preserve_gram(gram_cache, text, retain, hp.tokens, device, progress=progress)
    terms = EditTerms.from_rows(c, g, rr, n_r)
    t, a, b = closed_form(terms, hp.lamb, hp.erase_scale, s_p, method)
    w_old = dict(weights) if weights is not None else read_weights(pipe.unet, hp.projections, device)
    new = apply_transform(w_old, t)
    report = edit_report(terms, t, a, b, gram(w_old) if k0 is None else k0, hp.erase_scale, s_p, hp.lamb)
    return UCEResult(new, terms, t, a, b, guides, preserve, s_p, report)


# =========================================================================== artifacts


def weight_edit(unet, artifact: Artifact, method: str):
    """Checks, then ``swapped_weights``: inside, the UNet holds the artifact's tensors; on exit its
    original tensors are back (bit for bit)."""
    if artifact.method != method:
        raise ConfigError(f"this is a {artifact.method!r} artifact, not {method!r}")
    params = dict(unet.named_parameters())
    for name, tensor in artifact.tensors.items():
        if name not in params:
            raise ConfigError(f"{method} artifact edits {name!r}, which this UNet does not have: it was made for "
                              "another architecture")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ConfigError(f"{method} artifact tensor {name} has shape {tuple(tensor.shape)}, the model's is "
                              f"{tuple(params[name].shape)}: it was made for another base model")
    check_base_kv(artifact, unet, method)
    return swapped_weights(unet, artifact.tensors)


def weight_metadata(unet, names: Sequence[str], projections: Sequence[str]) -> dict:
    return {"concepts": list(names), "layers": [n for n, _ in edit_layers(unet, projections)],
            "projections": list(projections), "base_kv_sha256": base_kv_sha256(unet),
            "base_kv_checksums": base_kv_checksums(unet)}


def texts_record(texts: Sequence[str]) -> dict:
    return {"count": len(texts), "sha256": list_digest(texts), "texts": list(texts)}
