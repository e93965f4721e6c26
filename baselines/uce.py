"""UCE — Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024).

Sources, per-task values and deviations: docs/methods/uce.md.
Default = the paper code (rohitgandikota/unified-concept-editing@35e91e2, ``train-scripts/train_erase.py``),
which is also the starting point of RECE. No training: one closed form per projection matrix.

Every ``attn2.to_k`` / ``attn2.to_v`` weight W (32 matrices in SD-1.x, W_old = the weights before the
edit) is replaced by the minimiser of

    λ‖W − W_old‖² + s_e Σ_i ‖W c_i − v_i*‖² + s_p Σ_j ‖W r_j − W_old r_j‖²

    W_new = (λ W_old + s_e Σ v_i* c_iᵀ + s_p Σ W_old r_j r_jᵀ) (λ I + s_e Σ c_i c_iᵀ + s_p Σ r_j r_jᵀ)⁻¹

with c_i the erase rows, v_i* = W_old g_i the guide rows' outputs (``technique: replace``), r_j the
preserve rows. The solution is W_new = W_old · T with one D×D matrix T shared by all 32 matrices, solved
once in float64 from texts encoded in float64 (cpebench/methods/closed_form.py, which RECE and MACE
share). (The official code inverts per layer in float32: same math.)

Token rows (``tokens``):
* ``sequence`` (paper code, default; what RECE starts from): erase text and guide text are aligned
  from their last word token (index ``attention_mask.sum() − 2``) through EOS and the padding, both
  cut to the same length 77 − max(idx_erase, idx_guide); every aligned pair is one (c_i, g_i).
  Preserve texts contribute all 77 rows. The retain list is ``['']`` + preserve concepts (the empty
  prompt is always preserved), and ``preserve_scale: auto`` = max(0.1, 1 / len(retain list)).
  A guide of ``''`` is turned into ``' '``, as the official code does (both tokenize to BOS, EOS).
* ``last`` (HEAD ``uce_sd_erase.py``): one row per text, its last word token (BOS for ``''``). The
  HEAD defaults are ``preserve_empty: false, preserve_scale: 1``.

Preserve concepts that equal an erased concept (case-insensitive) are dropped, as in the official
``train_erase.py``; duplicates are dropped too.

Not implemented: ``technique: tensor`` (old code only, not used by any published configuration), the
``--add_prompts`` expansion (a hyperparameter-free list change: pass the expanded concepts instead)
and the unseeded ``<N>artists`` sampling (the task gives the concepts).
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
from cpebench.methods.closed_form import (NUMERICS, check_uce_settings, texts_record, to_storage, uce_edit,
                                          weight_edit, weight_metadata)
from cpebench.methods.common import PROJECTIONS, CheckedHparams, erase_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hparams(CheckedHparams):
    """benchmarks/methods/uce.yaml (per-task values and their sources are there)."""

    method_name: ClassVar[str] = "uce"

    guide: Any = " "                   # one text for all concepts, or a list (one per concept); ' ' = unconditional
    preserve: Any = ()                 # preserve concepts: a list, or {file: <data file>, column: <name>}
    preserve_empty: bool = True        # the paper code always adds '' to the retain list
    lamb: float = 0.5                  # λ, hard-coded 0.5 in train_erase.py __main__
    erase_scale: float = 1.0           # s_e
    preserve_scale: Any = "auto"       # s_p; auto = max(0.1, 1 / len(retain list))
    tokens: str = "sequence"           # sequence (paper code) | last (HEAD)
    technique: str = "replace"         # v* = W_old g (the only technique implemented)
    projections: tuple = PROJECTIONS   # with_to_k=True: to_k and to_v

    def check(self, method: str) -> None:
        check_uce_settings(self, method)
        if self.technique != "replace":
            raise ConfigError(f"{method}: hparams.technique {self.technique!r} is not implemented; only 'replace' "
                              "(v* = W_old · guide, the erasing default of the paper code)")


class UCE(Method):
    name = "uce"
    version = "2"    # 2: texts encoded in float64 (cached version-1 artifacts hold the fp32-encoded edit)
    description = ("Unified Concept Editing (WACV 2024): closed-form edit of the 32 cross-attention K/V projections; "
                   "defaults = paper code 35e91e2: lamb 0.5, erase 1, preserve auto (max(0.1, 1/|retain|)), '' always "
                   "preserved, token sequences; artist: guide 'art', the other artists of artists1734 preserved")
    trains = True    # no training (seconds), but the artifact is cached like a trained one
    hparams_class = Hparams

    def erase(self, pipe, concepts: Sequence[Concept], hparams: Mapping[str, Any],
              ctx: EraseContext | None = None) -> Artifact:
        names, hp, ctx = erase_inputs(self, pipe, concepts, hparams, ctx)
        device = torch.device(ctx.device)
        started = time.perf_counter()
        res = uce_edit(pipe, names, hp, device, ctx.data_dir, ctx.progress)
        tensors = {k: v.cpu() for k, v in to_storage(res.weights).items()}
        meta = weight_metadata(pipe.unet, names, hp.projections)
        meta["uce"] = {"guides": res.guides, "preserve": texts_record(res.preserve),
                       "preserve_empty": hp.preserve_empty, "preserve_scale": res.preserve_scale,
                       "lamb": hp.lamb, "erase_scale": hp.erase_scale, "tokens": hp.tokens,
                       "numerics": NUMERICS, **res.report}
        meta["seconds"] = round(time.perf_counter() - started, 3)
        log.info("uce: %d concepts, %d erase rows, %d preserve texts, %.2f s", len(names), res.terms.n_erase,
                 len(res.preserve), meta["seconds"])
        return Artifact(method=self.name, tensors=tensors, metadata=meta)

    def apply(self, pipe, artifact: Artifact):
        return weight_edit(pipe.unet, artifact, self.name)
