"""SPEED — Scalable, Precise, and Efficient Concept Erasure for Diffusion Models (Li et al., ICLR 2026).

Official code: Ouxiang-Li/SPEED@6d3df0c (``train_erase_null.py``, all of the method); sources, per-task
values and deviations: docs/methods/speed.md. No training: one closed-form null-space edit per matrix.

Edited: the 16 ``attn2.to_v`` weights (``params: V``; ``K`` = to_k, ``KV`` = both), each independently,
W ← W + Δ. Token rows (CLIP last hidden states, 77 tokens padded): the last word token
(``attention_mask.sum() − 2``; BOS for ``''``) of every target c_i, anchor a_i and retain text r;
``tokens: auto`` = the official rule: rows 1..76 of target and anchor, position-aligned, only when the
targets are exactly ``['nudity']``. No retain texts: R = rows 1..76 of ``''``. With

    T = mean_i c_i c_iᵀ,  A = mean_i a_i c_iᵀ,  E = W (A − T)(I + T)⁻¹   (UCE-style, scoring only)
    v_min = W's weakest right-singular vector (row space when d_out < 768)
    IPF: keep the r with ‖E r‖ > mean_R ‖E r‖               (``filter``, only when aug_num > 0)
    DPA: per chunk of 128 kept r, per mini-batch of 8, ``aug_num`` copies r' = r + ξ v_min (ξ = noise·v_min,
         noise ~ N(0, I)); keep the copies with ‖E r'‖ > the chunk's mean over its copies
    R_cov = mean r rᵀ over kept + augmented;  P = U Uᵀ over R_cov's eigenvectors with |eigenvalue| < τ
    M = (T P + α I)⁻¹,  K2 = [BOS of '', 3 k-means centres of rows 1..76 of '']   (D × 4)

    Δ = W (A − T) P [I − M K2 (K2ᵀ P M K2 + λ I₄)⁻¹ K2ᵀ P] M

so Δ r = 0 for every r in the retained span (P r = 0) and, with λ = 0, Δ K2 = 0.

Fast path (cpebench): everything D×D is shared or batched over the layers (the SVDs per weight shape,
the eigendecompositions and solves as one batch), the DPA copies' norms come from ‖E r‖², (E r)·(E v)
and ‖E v‖² instead of re-multiplying every copy, and their contribution to R_cov is summed in closed
form: Σ (r + ξv)(r + ξv)ᵀ = n r rᵀ + s (r vᵀ + v rᵀ) + q v vᵀ with n, s, q the count, Σξ and Σξ² of r's
kept copies. The random numbers are drawn as the official loop draws them (same shapes, same order, one
generator on the erase device seeded with ``seed``; randperm on a CPU generator), float64 algebra
(``precision: float32`` = the official numerics).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cpebench.errors import ConfigError, DataError
from cpebench.methods import Artifact, Concept, EraseContext, Method, read_torch
from cpebench.methods.closed_form import (
    last_token_index,
    read_weights,
    texts_record,
    weight_edit,
    weight_metadata,
)
from cpebench.methods.common import (ENCODE_BATCH, CheckedHparams, check_non_negative, encode_texts, erase_inputs,
                                     text_list)

log = logging.getLogger(__name__)

PARAMS = {"V": ("to_v",), "K": ("to_k",), "KV": ("to_k", "to_v")}    # --params of train_erase_null.py
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
NULL_CLUSTERS = 3          # k-means clusters of the null text's rows 1..76 (hard-coded officially)
KMEANS_TOL = 1e-4          # kmeans_pytorch 0.3: stop when (Σ centre shifts)² < tol
KMEANS_MAX_ITER = 1000     # a cap kmeans_pytorch 0.3 lacks (the null text's rows: 12 iterations on the tiny model)
RELEASE_SD14_WIDTHS = {"down_blocks.0": 320, "up_blocks.3": 320, "down_blocks.1": 640, "up_blocks.2": 640,
                       "down_blocks.2": 1280, "up_blocks.1": 1280, "mid_block": 1280}


@dataclass(frozen=True)
class Hparams(CheckedHparams):
    """benchmarks/methods/speed.yaml (per-task values and their sources are there)."""

    method_name: ClassVar[str] = "speed"

    anchor: Any = ""                  # one text for all targets, or one per target; '' = BOS (erase towards null)
    retain: Any = ()                  # retain concepts: a list, or {file, column}; none: rows 1..76 of ''
    params: str = "V"                 # V | K | KV: the attn2 projections edited
    aug_num: int = 10                 # DPA copies per retain vector (0: no DPA and no IPF)
    threshold: float = 0.1            # τ: eigenvalues of R_cov below it span the null space P
    retain_scale: float = 1.0         # α in M = (T P + α I)⁻¹
    lamb: float = 0.0                 # λ: ridge on the K2 (IEC) constraint; 0 = exact
    filter: bool = True               # IPF (official --disable_filter = false)
    seed: int = 0                     # seed_everything(seed): k-means init, randperm, DPA noise
    tokens: str = "auto"              # auto (official: all rows iff targets == ['nudity']) | last | all
    chunk_size: int = 128             # DPA chunk (its mean thresholds the copies)
    mini_batch: int = 8               # DPA draw granularity (changes only which random numbers are drawn)
    shuffle: bool = True              # randperm of the retain vectors (order sets the chunks)
    precision: str = "float64"        # float64 (cpebench) | float32 (official numerics)

    def check(self, method: str) -> None:
        if self.params not in PARAMS:
            raise ConfigError(f"{method}: hparams.params must be one of {', '.join(PARAMS)} (attn2 to_v, to_k, both), "
                              f"got {self.params!r}")
        if self.tokens not in ("auto", "last", "all"):
            raise ConfigError(f"{method}: hparams.tokens must be 'auto' (official), 'last' or 'all', got {self.tokens!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{method}: hparams.precision must be float64 or float32, got {self.precision!r}")
        check_non_negative(method, aug_num=self.aug_num, threshold=self.threshold, lamb=self.lamb, seed=self.seed)
        if self.retain_scale <= 0:
            raise ConfigError(f"{method}: hparams.retain_scale must be > 0 (α makes T P + α I invertible), "
                              f"got {self.retain_scale}")
        for key in ("chunk_size", "mini_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{method}: hparams.{key} must be >= 1, got {getattr(self, key)}")
        if not isinstance(self.anchor, (str, list, tuple)) or (not isinstance(self.anchor, str) and (
                not self.anchor or not all(isinstance(a, str) for a in self.anchor))):
            raise ConfigError(f"{method}: hparams.anchor must be a text or a non-empty list of texts, got {self.anchor!r}")

    @property
    def projections(self) -> tuple[str, ...]:
        return PARAMS[self.params]


# =========================================================================== texts


def anchors_for(anchor: Any, names: Sequence[str]) -> list[str]:
    """One anchor per target, stripped; a single anchor is broadcast. (The official ``--anchor_concepts`` is one
    comma-separated string; here a list gives several, and a text is always one anchor.)"""
    anchors = [anchor] if isinstance(anchor, str) else list(anchor)
    anchors = [a.strip() for a in anchors]
    if len(anchors) == 1:
        anchors = anchors * len(names)
    if len(anchors) != len(names):
        raise ConfigError(f"speed: hparams.anchor has {len(anchors)} texts for {len(names)} concepts "
                          "(give one for all, or one per concept)")
    return anchors


def retain_texts(spec: Any, names: Sequence[str], data_dir) -> tuple[list[str], int]:
    """The retain concepts (unique, first-seen order) without any that contains a target as a whole word,
    case-insensitive (the official regex filter); none: ``['']``. Returns (texts, number dropped)."""
    texts = [t for t in dict.fromkeys(text_list("speed", spec, "retain", data_dir)) if t]
    if not texts:
        return [""], 0
    targets = re.compile(r"\b(?:" + "|".join(re.escape(n.lower()) for n in names) + r")\b")
    kept = [t for t in texts if not targets.search(t.lower())]
    if not kept:
        raise ConfigError(f"speed: every one of the {len(texts)} hparams.retain texts contains an erased concept")
    return kept, len(texts) - len(kept)


@contextlib.contextmanager
def text_side(pipe, dtype: torch.dtype):
    """The tokenizer and a text encoder in ``dtype`` (a copy unless the pipe's already is), usable wherever
    ``encode_texts`` takes a pipe."""
    if pipe.text_encoder.dtype == dtype:
        yield pipe
        return
    encoder = copy.deepcopy(pipe.text_encoder).to(dtype)
    try:
        yield type("TextSide", (), {"tokenizer": pipe.tokenizer, "text_encoder": encoder})()
    finally:
        del encoder


@torch.no_grad()
def token_rows(text, texts: Sequence[str], device, dtype, all_rows: bool) -> torch.Tensor:
    """[N, 1, D]: each text's last word token row; ``all_rows``: [N, 76, D], rows 1..76 (all but BOS).
    Encoded in batches, keeping only the rows used (1,734 artists never sit in memory as 77 rows)."""
    out = []
    for i in range(0, len(texts), ENCODE_BATCH):
        chunk = list(texts[i : i + ENCODE_BATCH])
        emb = encode_texts(text, chunk, device, dtype)
        if all_rows:
            out.append(emb[:, 1:])
        else:
            out.append(emb[torch.arange(len(chunk), device=emb.device), last_token_index(text, chunk).to(emb.device)][:, None])
    return torch.cat(out)


# =========================================================================== k-means (kmeans_pytorch 0.3, Euclidean)


def kmeans(x: torch.Tensor, clusters: int, seed: int) -> tuple[torch.Tensor, dict]:
    """Lloyd's k-means as kmeans_pytorch 0.3 runs it: initial centres = the rows numpy's
    ``choice(n, k, replace=False)`` picks right after ``np.random.seed(seed)`` (SPEED's first numpy draw),
    squared Euclidean assignment, stop when (Σ centre shifts)² < 1e-4. An empty cluster keeps its centre
    (kmeans_pytorch would make it NaN)."""
    init = np.random.RandomState(seed).choice(len(x), clusters, replace=False)
    centres = x[torch.as_tensor(init, device=x.device)].clone()
    for iteration in range(1, KMEANS_MAX_ITER + 1):
        assign = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        onehot = torch.nn.functional.one_hot(assign, clusters).to(x.dtype)
        counts = onehot.sum(0)[:, None]
        new = torch.where(counts > 0, (onehot.T @ x) / counts.clamp(min=1), centres)
        shift = ((new - centres) ** 2).sum(1).sqrt().sum()
        centres = new
        if float(shift) ** 2 < KMEANS_TOL:
            break
    return centres, {"init_rows": [int(i) + 1 for i in init], "iterations": iteration,
                     "sizes": torch.bincount(assign, minlength=clusters).tolist()}


# =========================================================================== the closed form


@dataclass
class Inputs:
    """What every layer's edit reads (working dtype, on the erase device)."""

    t: torch.Tensor          # T = mean_i c_i c_iᵀ                  [D, D]
    a: torch.Tensor          # A = mean_i a_i c_iᵀ                  [D, D]
    k2: torch.Tensor         # [BOS, 3 centres]                    [D, 4]
    retain: torch.Tensor     # retain rows, shuffled               [N, D]
    targets: torch.Tensor    # target rows c (all targets' rows)   [m, D]
    anchors: torch.Tensor    # aligned anchor rows a               [m, D]
    n_targets: int


def weakest_directions(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """[L, D]: the last right-singular vector of each W (reduced SVD, as ``torch.svd``), batched per shape."""
    out = [None] * len(weights)
    shapes: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        shapes.setdefault(tuple(w.shape), []).append(i)
    for idx in shapes.values():
        vh = torch.linalg.svd(torch.stack([weights[i] for i in idx]), full_matrices=False).Vh
        for j, i in enumerate(idx):
            out[i] = vh[j, -1]
    return torch.stack(out)


def dpa_noise(n: int, hp: Hparams, v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """ξ [n, aug_num]: the official draws (per chunk, per mini-batch of 8, per copy: randn [rows, D] in
    float32 on the erase device), projected on v_min (noise @ v vᵀ = (noise·v) vᵀ)."""
    rows, copies, blocks = [], [], []
    d = v.shape[0]
    for c0 in range(0, n, hp.chunk_size):
        c1 = min(c0 + hp.chunk_size, n)
        for i in range(c0, c1, hp.mini_batch):
            j = min(i + hp.mini_batch, c1)
            for k in range(hp.aug_num):
                blocks.append(torch.randn(j - i, d, generator=gen, device=v.device, dtype=torch.float32))
                rows.append(torch.arange(i, j))
                copies.append(torch.full((j - i,), k))
    xi = torch.empty(n, hp.aug_num, dtype=v.dtype, device=v.device)
    if blocks:
        xi[torch.cat(rows).to(v.device), torch.cat(copies).to(v.device)] = torch.cat(blocks).to(v.dtype) @ v
    return xi


def refined_covariance(r: torch.Tensor, er: torch.Tensor, ev: torch.Tensor, v: torch.Tensor, hp: Hparams,
                       gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """R_cov of one layer after IPF and DPA. ``er`` = E r [N, d_out] for the retain rows r [N, D], ``ev`` = E v_min."""
    score = (er * er).sum(1)                                   # ‖E r‖²
    kept = torch.ones_like(score, dtype=torch.bool)
    if hp.aug_num > 0 and hp.filter:
        norm = score.sqrt()
        kept = norm > norm.mean()
        if not bool(kept.any()):      # every ‖E r‖ equal (e.g. E = 0: anchor = target): keep all, Δ is 0 anyway
            kept = torch.ones_like(kept)
    rk, a = r[kept], score[kept]
    n_kept = rk.shape[0]
    cov = rk.T @ rk
    n_aug = 0
    if hp.aug_num > 0:
        xi = dpa_noise(n_kept, hp, v, gen)
        b, c = er[kept] @ ev, ev @ ev                          # (E r)·(E v), ‖E v‖²
        norm = (a[:, None] + 2 * xi * b[:, None] + xi * xi * c).clamp(min=0).sqrt()   # ‖E (r + ξ v)‖
        chunk = torch.arange(n_kept, device=r.device) // hp.chunk_size
        sums = torch.zeros(int(chunk[-1]) + 1, dtype=norm.dtype, device=r.device).index_add_(0, chunk, norm.sum(1))
        mean = sums / (torch.bincount(chunk) * hp.aug_num)
        keep = (norm > mean[chunk][:, None]).to(r.dtype)
        count, s, q = keep.sum(1), (keep * xi).sum(1), (keep * xi * xi).sum(1)
        rs = rk.T @ s
        cov = cov + (rk * count[:, None]).T @ rk + torch.outer(rs, v) + torch.outer(v, rs) + q.sum() * torch.outer(v, v)
        n_aug = int(count.sum())
    return cov / (n_kept + n_aug), {"kept": n_kept, "augmented": n_aug}


@torch.no_grad()
def speed_deltas(weights: Sequence[torch.Tensor], inp: Inputs, hp: Hparams, gen: torch.Generator,
                 progress: bool = False) -> tuple[list[torch.Tensor], dict]:
    """Δ for every W (in the order given, which is the order the random numbers are drawn in)."""
    from tqdm.auto import tqdm

    t, a, k2 = inp.t, inp.a, inp.k2
    eye = torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    score_map = torch.linalg.solve(eye + t, (a - t).T).T      # E = W · score_map = W (A − T)(I + T)⁻¹
    v_min = weakest_directions(weights)
    x, xv = inp.retain @ score_map.T, v_min @ score_map.T       # rows (score_map r)ᵀ, (score_map v)ᵀ
    covs, counts = [], []
    for w, v, gv in tqdm(list(zip(weights, v_min, xv)), desc="speed: retain priors", unit="layer", leave=False,
                         disable=not progress):
        cov, info = refined_covariance(inp.retain, x @ w.T, w @ gv, v, hp, gen)
        covs.append(cov)
        counts.append(info)
    evals, evecs = torch.linalg.eigh(torch.stack(covs))         # R_cov is symmetric PSD: SVD = eigendecomposition
    # The official test is on torch.svd's singular values, i.e. |eigenvalue|: eigh returns the null directions'
    # rounding as tiny negative eigenvalues, which `evals < τ` would take even at τ = 0 (where the official P is 0).
    null = (evals.abs() < hp.threshold).to(t.dtype)
    p = (evecs * null[:, None, :]) @ evecs.transpose(1, 2)     # projector on the (near-)null space
    m = torch.linalg.inv(t @ p + hp.retain_scale * eye)         # M = (T P + α I)⁻¹
    pk = p @ k2                                                 # P K2
    inner = pk.transpose(1, 2) @ m @ k2 + hp.lamb * torch.eye(k2.shape[1], dtype=t.dtype, device=t.device)
    y = (a - t) @ p @ m                                         # (A − T) P M
    # With λ = 0 the 4×4 system is singular when P K2 is (K2 inside the retained span): a solve then returns
    # rounding noise × 1/rounding noise, not an error. Measured on K2's unit columns (BOS is ~25× the centres).
    k2_unit = k2 / k2.norm(dim=0, keepdim=True)
    k2_null = torch.linalg.svdvals(p @ k2_unit)[:, -1]        # smallest singular value of P K2 per layer
    if hp.lamb == 0 and float(k2_null.min()) < torch.finfo(t.dtype).eps ** 0.5:
        raise ConfigError(f"speed: the K2 constraint system K2ᵀ P M K2 + λI is singular to working precision: K2 lies "
                          f"in the retained span (smallest singular value of P K2 {float(k2_null.min()):.3g}); use "
                          "hparams.lamb > 0 (the official nudity recipe uses 0.5)")
    x_map = y - (y @ k2) @ torch.linalg.solve(inner, pk.transpose(1, 2) @ m)
    deltas = [w @ xm for w, xm in zip(weights, x_map)]
    report = {"kept": [c["kept"] for c in counts], "augmented": [c["augmented"] for c in counts],
              "null_dims": null.sum(1).int().tolist(), "k2_null_min": float(k2_null.min())}
    return deltas, report


def edit_report(weights, deltas, inp: Inputs) -> dict:
    """Summed over the layers: mean_i ‖W c_i − W a_i‖² before and after, ‖Δ K2‖ / ‖W K2‖."""
    diff = inp.targets - inp.anchors
    before = sum(float(((w @ diff.T) ** 2).sum()) for w in weights) / inp.n_targets
    after = sum(float((((w + d) @ inp.targets.T - w @ inp.anchors.T) ** 2).sum())
                for w, d in zip(weights, deltas)) / inp.n_targets
    k2 = sum(float((d @ inp.k2).norm() ** 2) for d in deltas) ** 0.5 / sum(float((w @ inp.k2).norm() ** 2)
                                                                         for w in weights) ** 0.5
    return {"erase_residual_before": before, "erase_residual_after": after,
            "erase_residual_ratio": after / before if before > 0 else 0.0, "k2_change_relative": k2}


def speed_inputs(pipe, names: Sequence[str], anchors: Sequence[str], retain: Sequence[str], hp: Hparams, device,
                 dtype) -> tuple[Inputs, dict]:
    """Token rows, T, A, K2 and the shuffled retain rows, from the pipe's tokenizer and text encoder in ``dtype``."""
    all_rows = hp.tokens == "all" or (hp.tokens == "auto" and list(names) == ["nudity"])
    with text_side(pipe, dtype) as text:
        texts = list(dict.fromkeys(list(names) + list(anchors) + [""]))
        slot = {s: i for i, s in enumerate(texts)}
        rows = token_rows(text, texts, device, dtype, all_rows)
        c = rows[[slot[n] for n in names]]                     # [n, r, D]
        an = rows[[slot[x] for x in anchors]]
        null = encode_texts(text, [""], device, dtype)[0]      # BOS + 76 rows of ''
        if retain == [""]:
            r = null[1:]                                       # no retain texts: rows 1..76 of ''
        else:
            r = token_rows(text, retain, device, dtype, all_rows=False)[:, 0]
    if hp.shuffle:
        r = r[torch.randperm(r.shape[0], generator=torch.Generator().manual_seed(hp.seed)).to(r.device)]
    centres, km = kmeans(null[1:], NULL_CLUSTERS, hp.seed)
    k2 = torch.cat([null[:1], centres]).T
    t = torch.einsum("nrd,nre->de", c, c) / len(names)
    a = torch.einsum("nrd,nre->de", an, c) / len(names)
    d = c.shape[-1]
    inp = Inputs(t=t, a=a, k2=k2, retain=r, targets=c.reshape(-1, d), anchors=an.reshape(-1, d), n_targets=len(names))
    return inp, {"token_rows": "all" if all_rows else "last", "retain_rows": int(r.shape[0]), "kmeans": km}


# =========================================================================== released checkpoints


def load_release(path: str | Path, method: str = "speed") -> Artifact:
    """A released SPEED checkpoint (HF lioooox/SPEED): a ``torch.save`` dict of full edited
    ``attn2.to_v.weight`` tensors (diffusers UNet names; ``to_k`` for params K, both for KV)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such SPEED checkpoint (.pt) or cpebench artifact folder")
    sd = read_torch(path)
    if not isinstance(sd, Mapping) or not sd:
        raise DataError(f"{path}: expected a dict of attn2 weight tensors (SPEED's torch.save layout)")
    keys = sorted(sd)
    bad = [k for k in keys if not re.fullmatch(r".*attn2\.to_[kv]\.weight", k) or not isinstance(sd[k], torch.Tensor)]
    if bad:
        raise DataError(f"{path}: {bad[0]!r} is not an attn2 to_k/to_v weight tensor; not a SPEED checkpoint")
    kinds = {k.rsplit(".", 2)[-2] for k in keys}
    blocks = {k.rsplit(".attn2", 1)[0] for k in keys}
    expected = {f"{b}.attn2.{p}.weight" for b in blocks for p in kinds}
    if len(blocks) != 16 or set(keys) != expected:
        raise DataError(f"{path}: holds {len(keys)} tensors over {len(blocks)} blocks; a SPEED checkpoint has the "
                        f"{', '.join(sorted(kinds))} weight of each of SD-1.x's 16 cross-attention blocks")
    widths = {sd[k].shape[1] if sd[k].ndim == 2 else None for k in keys}
    if len(widths) != 1 or None in widths or any(not sd[k].is_floating_point() for k in keys):
        raise DataError(f"{path}: the tensors must be 2-D float matrices of one input width, got shapes "
                        f"{sorted({tuple(sd[k].shape) for k in keys})}")
    if widths == {768}:      # SD-1.4 itself: the release's shapes (320/640/1280 × 768)
        for k in keys:
            want = next(w for prefix, w in RELEASE_SD14_WIDTHS.items() if k.startswith(prefix))
            if tuple(sd[k].shape) != (want, 768):
                raise DataError(f"{path}: {k} has shape {tuple(sd[k].shape)}, SD-1.4's is {(want, 768)}")
    params = "KV" if len(kinds) == 2 else ("K" if kinds == {"to_k"} else "V")
    concept = path.parent.name if path.stem == "weight" else path.stem   # official scripts: <targets>/weight.pt
    return Artifact(method=method, tensors={k: sd[k].to(torch.float32).contiguous() for k in keys}, metadata={
        "concepts": [concept], "source": "official checkpoint (lioooox/SPEED)", "official_file": str(path),
        "params": params, "layers": sorted(blocks)})


# =========================================================================== the method


class SPEED(Method):
    name = "speed"
    version = "1"
    description = ("SPEED (ICLR 2026): closed-form null-space edit of the 16 attn2.to_v matrices (IPF, DPA, IEC); "
                   "defaults = Ouxiang-Li/SPEED@6d3df0c train_erase_null.py: aug_num 10, threshold 0.1, retain_scale 1, "
                   "lamb 0, filter on, seed 0; per task: nudity (all rows, α 0.7, λ 0.5), celebrity (τ 1e-4, α 0.05, no IPF)")
    trains = True    # no training (seconds), but the artifact is cached like a trained one
    hparams_class = Hparams

    def erase(self, pipe, concepts: Sequence[Concept], hparams: Mapping[str, Any],
              ctx: EraseContext | None = None) -> Artifact:
        names, hp, ctx = erase_inputs(self, pipe, concepts, hparams, ctx)
        device, dtype = torch.device(ctx.device), PRECISIONS[hp.precision]
        started = time.perf_counter()
        anchors = anchors_for(hp.anchor, names)
        retain, dropped = retain_texts(hp.retain, names, ctx.data_dir)
        inp, info = speed_inputs(pipe, names, anchors, retain, hp, device, dtype)
        old = {k: w.to(dtype) for k, w in read_weights(pipe.unet, hp.projections, device).items()}
        gen = torch.Generator(device=device).manual_seed(hp.seed)
        deltas, report = speed_deltas(list(old.values()), inp, hp, gen, ctx.progress)
        tensors = {k: (w + d).to(torch.float32).cpu() for (k, w), d in zip(old.items(), deltas)}
        meta = weight_metadata(pipe.unet, names, hp.projections)
        meta["speed"] = {"anchors": anchors, "retain": texts_record(retain), "retain_dropped": dropped, **info,
                         **report, **edit_report(list(old.values()), deltas, inp),
                         "numerics": f"texts encoded and edit computed in {hp.precision}; stored as float32"}
        meta["seconds"] = round(time.perf_counter() - started, 3)
        log.info("speed: %d concepts, %d retain rows, %d layers, %.2f s", len(names), info["retain_rows"],
                 len(tensors), meta["seconds"])
        return Artifact(method=self.name, tensors=tensors, metadata=meta)

    def apply(self, pipe, artifact: Artifact):
        return weight_edit(pipe.unet, artifact, self.name)

    def load_release(self, path: Path) -> Artifact:
        """A released SPEED ``.pt`` checkpoint (the module's ``load_release``)."""
        return load_release(path, self.name)
