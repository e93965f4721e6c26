"""RECE — Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models (Gong et al., ECCV 2024).

Sources, per-task values and deviations: docs/methods/rece.md.
Official code: CharlesGong12/RECE@403a67f (``train.py``, ``train_artists.py``, ``train_object.py``,
``erase_methods/uce.py:edit_model_adversarial``, ``utils/embedding_calculation/close_form_emb.py``).

1. Start from UCE (the paper code, ``uce_*`` hyperparameters; UCE's edit from ``cpebench.methods.closed_form``).
2. For each epoch:
   a. per concept, the adversarial embedding in closed form from the current weights W_l and the
      original weights W_l^o over all edited matrices l (32 = 16 × {to_k, to_v}), every one of the 77
      token rows c of the concept's CLIP output independently (``emb_computing``):
        close_regzero      c' = (Σ W_lᵀW_l + λI)⁻¹ (Σ W_lᵀW_l^o) c                    (all README configs)
        close_standardreg  c' = (Σ W_lᵀW_l + λI)⁻¹ (λ c_tgt + Σ W_lᵀW_l^o c)       c_tgt: ``old_target_concept``
        close_surrogatereg 1st:  [(1+λ) Σ W_lᵀW_l]⁻¹ [Σ W_lᵀW_l^o + λ Σ W_lᵀW_l] c
                           both: the same with λI added to both brackets
                           2nd:  (λI + Σ W_lᵀW_l)⁻¹ (λI + Σ W_lᵀW_l^o) c
      with λ = ``regular_scale``;
   b. one UCE-style closed-form edit anchored at the *current* weights, whose targets come from the
      current weights too (``edit_model_adversarial``):
        W ← (λ W + s_e Σ_i Σ_t (W g_t) c'_{i,t}ᵀ + s_p Σ_r Σ_t (W r_t) r_tᵀ)(λI + s_e Σ c'c'ᵀ + s_p Σ r rᵀ)⁻¹
      with all 77 token positions aligned one to one (token t of c'_i ↦ token t of the guide), no
      last-token slicing, λ = ``lamb``, s_e = ``erase_scale``, s_p = ``preserve_scale``.
   Texts are encoded by a float64 copy of the text encoder, sums and solves are float64, and the weights
   stay float64 from the UCE start to the last epoch (rounded to float32 once, for the artifact): this
   is the paper code run in float64. (The official code holds them in the fp32 model between epochs;
   the normal equations amplify that rounding by their condition number.)

Deviations (recorded here, not silently):
* The official nudity/unsafe scripts generate a validation set after every epoch and keep the epoch
  with the lowest detection rate (artists/objects keep every epoch; objects stop when accuracy hits 0).
  That needs image generation and a detector inside ``erase``; cpebench keeps the last epoch. The
  epoch counts of the README configs are used, and ``epochs=k`` gives exactly the k-th epoch's model.
* The official nudity retain list is ``[' '] × len(concepts)`` (``preserve_empty: per_concept``);
  artists/objects use ``['']`` + preserve concepts (``preserve_empty: true``). '' and ' ' tokenize alike.
* The ``preserve_concepts`` bug path of ``train.py`` (it iterates over the characters of a string) is
  not reproduced: ``preserve`` is a list of texts.
* The adversarial embeddings are not rendered to images (``embedding2img``, logging only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cpebench.errors import ConfigError
from cpebench.methods import Artifact, Concept, EraseContext, Method
from cpebench.methods.closed_form import (
    NUMERICS,
    EditTerms,
    UCESettings,
    apply_transform,
    cached_preserve_gram,
    closed_form,
    edit_report,
    float64_text,
    gram,
    guides_for,
    read_weights,
    texts_record,
    to_storage,
    uce_edit,
    weight_edit,
    weight_metadata,
)
from cpebench.methods.common import (PROJECTIONS, CheckedHparams, check_choices, check_non_negative, check_projections,
                                     encode_texts, erase_inputs, parse_hparams, preserve_list)


log = logging.getLogger(__name__)

EMB_COMPUTING = ("close_regzero", "close_standardreg", "close_surrogatereg")
REG_ITEMS = ("1st", "2nd", "both")


@dataclass(frozen=True)
class Hparams(CheckedHparams):
    """benchmarks/methods/rece.yaml (per-task values and their sources are there)."""

    method_name: ClassVar[str] = "rece"

    # the UCE starting model (old UCE train_erase.py; RECE issues #4/#7: erase 1, preserve 1.0, lamb 0.5)
    uce_guide: Any = " "
    uce_preserve: Any = ()
    uce_preserve_empty: bool = True
    uce_lamb: float = 0.5
    uce_erase_scale: float = 1.0
    uce_preserve_scale: Any = "auto"
    uce_tokens: str = "sequence"
    # RECE's epochs (train.py / train_artists.py / train_object.py defaults)
    epochs: int = 3
    emb_computing: str = "close_regzero"
    regular_scale: float = 0.1
    reg_item: str = "1st"                  # close_surrogatereg only
    old_target_concept: Any = None         # close_standardreg only (e.g. ' ')
    guide: Any = " "
    preserve: Any = ()
    preserve_empty: Any = "per_concept"    # per_concept: [' '] × len(concepts) (train.py) | true: [''] | false
    lamb: float = 0.1
    erase_scale: float = 1.0
    preserve_scale: float = 0.1
    projections: tuple = PROJECTIONS       # with_to_k=True

    def check(self, method: str) -> None:
        check_projections(self.projections, method)
        check_non_negative(method, lamb=self.lamb, erase_scale=self.erase_scale, preserve_scale=self.preserve_scale,
                          regular_scale=self.regular_scale, epochs=self.epochs)
        check_choices(method, self, {"emb_computing": EMB_COMPUTING, "reg_item": REG_ITEMS})
        if self.emb_computing == "close_standardreg" and not isinstance(self.old_target_concept, str):
            raise ConfigError(f"{method}: emb_computing close_standardreg needs hparams.old_target_concept (e.g. ' ')")
        empty = _parse_preserve_empty(self.preserve_empty)
        if not (isinstance(empty, bool) or empty == "per_concept"):
            raise ConfigError(f"{method}: hparams.preserve_empty must be true, false or per_concept, "
                              f"got {self.preserve_empty!r}")
        self.uce_hparams(method)

    def uce_hparams(self, method: str = "rece") -> UCESettings:
        """The UCE stage's settings (``uce_<name>`` → UCE's ``<name>``)."""
        return parse_hparams(UCESettings, {
            "guide": self.uce_guide, "preserve": self.uce_preserve, "preserve_empty": self.uce_preserve_empty,
            "lamb": self.uce_lamb, "erase_scale": self.uce_erase_scale, "preserve_scale": self.uce_preserve_scale,
            "tokens": self.uce_tokens, "projections": self.projections}, method)


def _parse_preserve_empty(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    return value


# =========================================================================== the adversarial embedding


def adversarial_embedding(c: torch.Tensor, p: torch.Tensor, q: torch.Tensor, regular_scale: float,
                          emb_computing: str = "close_regzero", reg_item: str = "1st",
                          target: torch.Tensor | None = None) -> torch.Tensor:
    """c' for every row of ``c`` [..., D] (float64), with P = Σ W_lᵀW_l (current weights) and
    Q = Σ W_lᵀW_l^o (current × original). ``target`` [..., D]: c_tgt for close_standardreg."""
    lam = regular_scale
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    flat = c.reshape(-1, c.shape[-1])
    if emb_computing == "close_regzero":
        lhs, rhs = p + lam * eye, flat @ q.T
    elif emb_computing == "close_standardreg":
        if target is None:
            raise ConfigError("rece: close_standardreg needs the target concept's embedding")
        lhs, rhs = p + lam * eye, lam * target.reshape(-1, c.shape[-1]) + flat @ q.T
    elif emb_computing == "close_surrogatereg":
        extra = lam * eye if reg_item == "both" else 0 * eye
        if reg_item == "2nd":
            lhs, rhs = lam * eye + p, flat @ (lam * eye + q).T
        else:
            lhs, rhs = (1 + lam) * p + extra, flat @ (q + lam * p + extra).T
    else:
        raise ConfigError(f"rece: unknown emb_computing {emb_computing!r}")
    try:
        out = torch.linalg.solve(lhs, rhs.T).T          # rows: lhs⁻¹ (rhs row)
    except RuntimeError as e:
        raise ConfigError(f"rece: the adversarial-embedding system is singular ({e}); use regular_scale > 0") from None
    return out.reshape(c.shape)


def attack_residual(c_adv: torch.Tensor, c: torch.Tensor, p: torch.Tensor, q: torch.Tensor, k0: torch.Tensor) -> float:
    """Σ_l Σ_t ‖W_l c'_t − W_l^o c_t‖² / Σ_l Σ_t ‖W_l^o c_t‖²: how well c' recovers the erased concept's K/V."""
    a, b = c_adv.reshape(-1, c.shape[-1]), c.reshape(-1, c.shape[-1])
    num = (a @ p * a).sum() - 2 * (a @ q * b).sum() + (b @ k0 * b).sum()
    den = (b @ k0 * b).sum()
    return float(num / den) if den > 0 else 0.0


# =========================================================================== RECE


@dataclass
class EpochResult:
    weights: dict          # float64 solution of this epoch's edit
    adversarial: torch.Tensor   # [n_concepts, 77, D] float64
    terms: EditTerms
    transform: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    report: dict


def rece_epoch(current: Mapping[str, torch.Tensor], original: Mapping[str, torch.Tensor], concept_emb: torch.Tensor,
               guide_emb: torch.Tensor, retain_gram: torch.Tensor, n_retain_rows: int, hp: Hparams,
               target_emb: torch.Tensor | None = None, k0: torch.Tensor | None = None) -> EpochResult:
    """One epoch: adversarial embeddings from the current (float64) weights, then
    the closed-form edit anchored at them. ``concept_emb``/``guide_emb``: [n, 77, D] float64;
    ``k0`` = Σ W_oᵀW_o (computed if not given; diagnostics only)."""
    p, q = gram(current), gram(current, original)
    k0 = gram(original) if k0 is None else k0
    c_adv = adversarial_embedding(concept_emb, p, q, hp.regular_scale, hp.emb_computing, hp.reg_item, target_emb)
    d = c_adv.shape[-1]
    c_rows, g_rows = c_adv.reshape(-1, d), guide_emb.reshape(-1, d)
    terms = EditTerms.from_rows(c_rows, g_rows, retain_gram, n_retain_rows)
    t, a, b = closed_form(terms, hp.lamb, hp.erase_scale, hp.preserve_scale, "rece")
    new = apply_transform(current, t)
    report = edit_report(terms, t, a, b, p, hp.erase_scale, hp.preserve_scale, hp.lamb)
    report["attack_residual"] = [attack_residual(c_adv[i], concept_emb[i], p, q, k0) for i in range(len(c_adv))]
    report["adversarial_shift"] = [float(torch.linalg.norm(c_adv[i] - concept_emb[i]) / torch.linalg.norm(concept_emb[i]))
                                   for i in range(len(c_adv))]
    return EpochResult(new, c_adv, terms, t, a, b, report)


def retain_texts(hp: Hparams, names: Sequence[str], data_dir) -> tuple[list[str], list[str]]:
    """(retain list, preserve concepts) of the RECE edit."""
    preserve = preserve_list("rece", hp.preserve, names, data_dir)
    empty = _parse_preserve_empty(hp.preserve_empty)
    blanks = [" "] * len(names) if empty == "per_concept" else ([""] if empty else [])
    return blanks + preserve, preserve


def rece(pipe, names: Sequence[str], hp: Hparams, device, data_dir=None, progress: bool = False,
         on_epoch=None) -> tuple[dict, dict]:
    """UCE, then ``hp.epochs`` RECE epochs. Returns (float32 weights, metadata record). Texts are encoded
    in float64 (``float64_text``) and the weights stay float64 from the UCE start through the last
    epoch, rounded to float32 once: the paper code run in float64."""
    started = time.perf_counter()
    original = read_weights(pipe.unet, hp.projections, device)
    grams: dict = {}
    k0 = gram(original)
    with float64_text(pipe) as text:
        start = uce_edit(pipe, names, hp.uce_hparams(), device, data_dir, progress, weights=original,
                         method="rece", gram_cache=grams, k0=k0, text=text)
        uce_seconds = time.perf_counter() - started
        guides = guides_for("rece", hp.guide, names)
        retain, preserve = retain_texts(hp, names, data_dir)
        concept_emb = encode_texts(text, names, device, torch.float64)
        unique = list(dict.fromkeys(guides))
        guide_emb = encode_texts(text, unique, device, torch.float64)[[unique.index(g) for g in guides]]
        target_emb = None
        if hp.emb_computing == "close_standardreg":
            target = encode_texts(text, [hp.old_target_concept or " "], device, torch.float64)
            target_emb = target.expand_as(concept_emb)
        rr, n_r = cached_preserve_gram(grams, text, retain, "sequence", device, progress, desc="encode retain")
    current = start.weights                  # the UCE model, float64
    epochs = []
    for e in range(hp.epochs):
        t0 = time.perf_counter()
        res = rece_epoch(current, original, concept_emb, guide_emb, rr, n_r, hp, target_emb, k0)
        current = res.weights
        record = {"epoch": e + 1, "seconds": round(time.perf_counter() - t0, 3), **res.report}
        epochs.append(record)
        if on_epoch is not None:
            on_epoch(e, res)
        log.info("rece: epoch %d/%d: attack residual %s, guide residual %.3g -> %.3g", e + 1, hp.epochs,
                 [f"{x:.3g}" for x in record["attack_residual"]], record["erase_residual_before"],
                 record["erase_residual_after"])
    meta = {
        "uce": {"guides": start.guides, "preserve": texts_record(start.preserve),
                "preserve_scale": start.preserve_scale, "seconds": round(uce_seconds, 3), **start.report},
        "rece": {"guides": guides, "retain": {"blanks": len(retain) - len(preserve), **texts_record(preserve)},
                 "emb_computing": hp.emb_computing, "regular_scale": hp.regular_scale, "epochs": epochs,
                 "selection": "last epoch (the official validation-based selection is not run)"},
        "numerics": NUMERICS + "; weights float64 between epochs",
        "seconds": round(time.perf_counter() - started, 3),
    }
    return to_storage(current), meta


class RECE(Method):
    name = "rece"
    version = "2"    # 2: texts encoded in float64, weights kept in float64 between epochs
    description = ("Reliable and Efficient Concept Erasure (ECCV 2024): UCE, then per epoch a closed-form adversarial "
                   "embedding and a closed-form re-edit of the 32 cross-attention K/V projections; defaults = 403a67f: "
                   "close_regzero, lamb 0.1, preserve 0.1; nudity 3 epochs at reg 0.1, artist 1 epoch at reg 1e-3")
    trains = True    # seconds, but the artifact is cached like a trained one
    hparams_class = Hparams

    def erase(self, pipe, concepts: Sequence[Concept], hparams: Mapping[str, Any],
              ctx: EraseContext | None = None) -> Artifact:
        names, hp, ctx = erase_inputs(self, pipe, concepts, hparams, ctx)
        weights, record = rece(pipe, names, hp, torch.device(ctx.device), ctx.data_dir, ctx.progress)
        meta = {**weight_metadata(pipe.unet, names, hp.projections), **record}
        return Artifact(method=self.name, tensors={k: v.cpu() for k, v in weights.items()}, metadata=meta)

    def apply(self, pipe, artifact: Artifact):
        return weight_edit(pipe.unet, artifact, self.name)
