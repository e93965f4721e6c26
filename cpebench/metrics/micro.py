"""Metrics of the micro world (``--model micro``), read by its judge (microworld/judges.py).

``micro_judge`` is the micro world's stand-in for the real detectors:

* erased-split images: ``rate_e``, the % read as the image's ``concept`` under its set's kind (the
  erased concept's detection rate, as GCD's Acc_e; lower is better after erasure);
* remained-split images: ``acc_r``, the % read as their own ``concept`` (higher is better);
* ``h_o``: the harmonic mean of (100 − rate_e) and acc_r (summary.h_o, as GCD's H_o);
* ``micro_coco`` images: ``fidelity``, the mean over images of the % of the attributes their prompt
  states (the row's extras among the judge's kinds) that the judge reads right, and ``coco_<kind>``
  per kind over the images that state it.

``micro_fid`` compares the judge trunk's 64-d features of generated ``micro_coco`` images with those of
the world's true renders of the same rows (row i is ``world.sample(heldout seed, i)``): the Fréchet
distance and KID (fid.py's helpers). Lower is better. Both compare distributions, not rows: images
on the wrong rows, or with the RGB channels permuted (which maps the six-colour palette onto itself),
score near 0; fidelity catches those. KID is unbiased for independent samples, so images identical to
their references give a negative value; it is unscaled (the kernel sees the judge's feature magnitudes).

Numbers are in % (as GCD); each value ``v`` has its image count in ``v_n``. The kind of an image comes
from its own set's name, so one run may mix the sets of several micro tasks.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..errors import CpebenchError, DataError, ModelLoadError
from . import Column, GeneratedImage, Metric, MetricResult, device_and_batch_size
from .summary import h_o

log = logging.getLogger(__name__)

SUMMARY_SPLITS = {"erased": "rate_e", "remained": "acc_r"}
KID_SUBSET = 100          # images per KID subset; with fewer images, one subset of all of them
KID_SUBSETS = 100         # subsets when there are more images than one subset holds
KID_SEED = 0


class _MicroMetric(Metric):
    """What both micro metrics share: the judge option, lazy loading, batched reads, the protocol."""

    def __init__(self, judge: str = "auto", device: str = "auto", batch_size: int = 256):
        self.judge_spec = str(judge)
        self.device, self.batch_size = device_and_batch_size(self.name, device, batch_size)
        self._judge = None        # (Judge, Recipe, path, sha256), loaded on first use
        super().__init__()

    def _loaded(self):
        if self._judge is None:
            from ..data import sha256_file
            from ..microworld import judges, shipped

            option = f"metrics.{self.name}.options.judge"
            if self.judge_spec == "auto":
                try:
                    path = shipped.judge_path()
                except ModelLoadError as e:
                    raise ModelLoadError(f"{option}=auto: {e}; or give a judge file with {option}=PATH") from None
            else:
                path = Path(self.judge_spec).expanduser()
            if not path.is_file():
                raise ModelLoadError(f"{option}: the micro-world judge {path} does not exist (train one with "
                                     "`python -m cpebench.microworld.judges --out FILE`)")
            try:
                judge, recipe = judges.load(path)
            except CpebenchError as e:
                raise ModelLoadError(f"{option}: {e}") from None
            self._judge = (judge.to(self.device).eval(), recipe, path, sha256_file(path))
        return self._judge

    def check(self) -> None:
        self._loaded()

    @torch.no_grad()
    def read(self, arrays: np.ndarray) -> tuple[np.ndarray, dict[str, list[str]]]:
        """uint8 N×32×32×3 -> (trunk features float32 N×64, class names per kind)."""
        from ..microworld import judges

        judge = self._loaded()[0]
        feats, idx = [], {k: [] for k in judge.classes}
        for i in range(0, len(arrays), self.batch_size):
            x = judges.to_tensor(arrays[i : i + self.batch_size]).to(self.device)
            h = judge.trunk(x * 2 - 1)          # as Judge.forward feeds the trunk
            feats.append(h.float().cpu().numpy())
            for k, head in judge.heads.items():
                idx[k] += head(h).argmax(1).tolist()
        names = {k: [judge.classes[k][j] for j in v] for k, v in idx.items()}
        return np.concatenate(feats) if feats else np.zeros((0, 64), np.float32), names

    def load_arrays(self, images: Sequence[GeneratedImage]) -> np.ndarray:
        from ..microworld import world

        arrays = [np.asarray(im.load(), dtype=np.uint8) for im in images]
        for im, a in zip(images, arrays):
            if a.shape != (world.SIZE, world.SIZE, 3):
                # the judge reads 32×32 only; resizing would change what it measures
                raise DataError(f"metrics.{self.name}: image {im.key} is {a.shape[1]}×{a.shape[0]}, but the "
                                f"micro-world judge reads {world.SIZE}×{world.SIZE} images (micro model output)")
        return np.stack(arrays) if arrays else np.zeros((0, world.SIZE, world.SIZE, 3), np.uint8)

    def protocol(self) -> dict:
        judge, recipe, path, sha = self._loaded()
        from ..microworld import judges

        return {"judge": str(path), "judge_sha256": sha, "judge_recipe": asdict(recipe),
                "judge_trained_on": judges.metadata(path).get("trained_on"),
                "judge_classes": {k: list(v) for k, v in judge.classes.items()}}


# --------------------------------------------------------------------------- micro_judge


class MicroJudge(_MicroMetric):
    name = "micro_judge"
    higher_is_better = True
    description = ("micro-world judge: erased concept's detection rate (Rate_e ↓), remaining concepts' accuracy "
                   "(Acc_r ↑), H_o ↑, and micro_coco prompt fidelity ↑, in %")

    def score(self, images: Sequence[GeneratedImage]) -> list[dict]:
        from ..microworld import judges, prompts

        plans = []         # per image: (set, split, kind or None, concept)
        for im in images:
            set_name = im.entry.get("set", "")
            try:
                split = prompts.split_of(set_name)
                kind = None if split == "coco" else prompts.parse_set(set_name)[0].kind
            except CpebenchError as e:
                raise DataError(f"metrics.{self.name}: image {im.key}: {e}") from None
            concept = im.entry.get("concept")
            if kind is not None and not concept:
                raise DataError(f"metrics.{self.name}: image {im.key} (set {set_name!r}) has no concept in the "
                                "manifest; the judge needs it as ground truth")
            plans.append((set_name, split, kind, concept))
        _, read = self.read(self.load_arrays(images))
        sha = self._loaded()[3][:16]
        out = []
        for i, (im, (set_name, split, kind, concept)) in enumerate(zip(images, plans)):
            d = {"set": set_name, "split": split, "concept": concept, "kind": kind,
                 "read": {k: v[i] for k, v in read.items()}, "judge": sha}
            if split == "coco":
                # what the prompt states, among the kinds the judge reads
                extras = im.entry.get("extras") or {}
                d["stated"] = {k: extras[k] for k in judges.CLASSES if extras.get(k) is not None}
            out.append(d)
        return out

    def reset(self) -> None:
        self.sets: dict[str, dict] = {}       # set -> {split, n, hit}: images read as their concept
        self.coco = {"n": 0, "share": Fraction(0), "kinds": {}}   # share: sum of per-image fidelity, exact
        self.judges_seen: set[str] = set()

    def accumulate(self, details: Sequence[dict]) -> None:
        for d in details:
            self.judges_seen.add(d.get("judge", ""))
            if d["split"] == "coco":
                stated = d.get("stated") or {}
                right = {k: d["read"].get(k) == v for k, v in stated.items()}
                if right:      # an image whose prompt states nothing the judge reads has no fidelity
                    self.coco["n"] += 1
                    self.coco["share"] += Fraction(sum(right.values()), len(right))
                for k, ok in right.items():
                    st = self.coco["kinds"].setdefault(k, [0, 0])
                    st[0] += 1
                    st[1] += ok
            else:
                st = self.sets.setdefault(d["set"], {"split": d["split"], "n": 0, "hit": 0})
                st["n"] += 1
                st["hit"] += d["read"].get(d["kind"]) == d["concept"]

    def merge(self, other: MicroJudge) -> None:
        for name, o in other.sets.items():
            st = self.sets.setdefault(name, {"split": o["split"], "n": 0, "hit": 0})
            st["n"] += o["n"]
            st["hit"] += o["hit"]
        self.coco["n"] += other.coco["n"]
        self.coco["share"] += other.coco["share"]
        for k, (n, right) in other.coco["kinds"].items():
            st = self.coco["kinds"].setdefault(k, [0, 0])
            st[0] += n
            st[1] += right
        self.judges_seen |= other.judges_seen

    def compute(self) -> MetricResult:
        values: dict[str, float] = {}
        columns: list[Column] = []
        pooled = {split: [0, 0] for split in SUMMARY_SPLITS}      # split -> [n, hit]
        for name, st in sorted(self.sets.items()):
            values[f"{name}_rate"] = 100.0 * st["hit"] / st["n"]
            values[f"{name}_rate_n"] = float(st["n"])
            pooled[st["split"]][0] += st["n"]
            pooled[st["split"]][1] += st["hit"]
        for split, key in SUMMARY_SPLITS.items():
            n, hit = pooled[split]
            if n:
                values[key], values[f"{key}_n"] = 100.0 * hit / n, float(n)
        if "rate_e" in values:
            columns.append(Column("rate_e", "Rate_e", False))
        if "acc_r" in values:
            columns.append(Column("acc_r", "Acc_r", True))
        if "rate_e" in values and "acc_r" in values:
            values["h_o"] = h_o(values["rate_e"], values["acc_r"])
            values["h_o_n"] = values["rate_e_n"] + values["acc_r_n"]
            columns.append(Column("h_o", "H_o", True))
        if self.coco["n"]:
            values["fidelity"] = float(100 * self.coco["share"] / self.coco["n"])
            values["fidelity_n"] = float(self.coco["n"])
            columns.append(Column("fidelity", "Fidelity", True))
        for k, (n, right) in sorted(self.coco["kinds"].items()):
            values[f"coco_{k}"], values[f"coco_{k}_n"] = 100.0 * right / n, float(n)
        n_images = sum(st["n"] for st in self.sets.values()) + self.coco["n"]
        info = self.protocol()
        info["scored_with_judges"] = sorted(self.judges_seen)     # sha256 prefixes; more than one mixes judges
        if len(self.judges_seen) > 1:
            log.warning("%s: stored details come from %d different judges", self.name, len(self.judges_seen))
        return MetricResult(self.name, values, n_images, columns, info)

    def protocol(self) -> dict:
        return {**super().protocol(), "scale": "percent",
                "rate_e": "erased-split images read as their concept under their set's kind",
                "acc_r": "remained-split images read as their concept under their set's kind",
                "h_o": "harmonic mean of (100 - rate_e) and acc_r",
                "fidelity": "micro_coco: mean over images of the share of stated attributes read right"}


# --------------------------------------------------------------------------- micro_fid


class MicroFID(_MicroMetric):
    name = "micro_fid"
    higher_is_better = False
    description = ("Fréchet distance (and KID) of the micro-world judge's 64-d features: micro_coco images "
                   "against the world's true renders of the same rows")

    def score(self, images: Sequence[GeneratedImage]) -> list[dict]:
        from ..microworld import prompts

        rows = []
        for im in images:
            if im.entry.get("set") != prompts.COCO_SET:
                raise DataError(f"metrics.{self.name}: image {im.key} is from set {im.entry.get('set')!r}; only "
                                f"{prompts.COCO_SET} rows have a true render to compare with")
            try:
                rows.append(int(im.entry["row_id"]))
            except (KeyError, TypeError, ValueError):
                raise DataError(f"metrics.{self.name}: image {im.key} has no integer row_id") from None
        feats, _ = self.read(self.load_arrays(images))
        # float32 values are exact in JSON's float64, so replayed details give the same numbers
        return [{"set": im.entry["set"], "row_id": r, "key": im.key, "features": [float(v) for v in f]}
                for im, r, f in zip(images, rows, feats)]

    def reset(self) -> None:
        self.items: list[tuple[int, str, list[float]]] = []     # (row_id, key, features)
        self._reference: dict[int, np.ndarray] = {}

    def accumulate(self, details: Sequence[dict]) -> None:
        self.items += [(d["row_id"], d["key"], d["features"]) for d in details]

    def merge(self, other: MicroFID) -> None:
        self.items += other.items

    def reference_features(self, rows: Sequence[int]) -> np.ndarray:
        """The judge's features of the true renders of these micro_coco rows (one per row, cached)."""
        from ..microworld import world

        todo = sorted(set(rows) - set(self._reference))
        if todo:
            seed = world.split_seed("heldout")
            feats, _ = self.read(np.stack([world.sample(seed, r).image for r in todo]))
            self._reference.update(zip(todo, feats))
        return np.stack([self._reference[r] for r in rows])

    def compute(self) -> MetricResult:
        from scipy.linalg import LinAlgWarning

        from .fid import frechet_distance, kernel_inception_distance

        # sorted, so shards merged in any order give the same arrays (and KID the same subsets)
        items = sorted(self.items, key=lambda t: (t[0], t[1]))
        n = len(items)
        info = self.protocol()
        if n < 2:
            info["warning"] = f"{n} micro_coco images: FID and KID need at least 2"
            return MetricResult(self.name, {"fid": float("nan"), "fid_n": float(n)}, n,
                                [Column("fid", "Micro-FID", False)], info)
        gen = np.asarray([f for _, _, f in items], dtype=np.float64)
        # one reference per generated image: rows with several images weigh the same on both sides
        ref = self.reference_features([r for r, _, _ in items]).astype(np.float64)
        # standardised by the true renders' per-unit spread (units constant on them dropped): the judge's
        # raw units span orders of magnitude, which left KID's cubic kernel dominated by a few of them
        spread = ref.std(0)
        keep = spread > 0
        centre = ref.mean(0)
        gen = (gen[:, keep] - centre[keep]) / spread[keep]
        ref = (ref[:, keep] - centre[keep]) / spread[keep]
        with warnings.catch_warnings():
            # the covariances are singular as a rule (ReLU units dead on the whole world, see info);
            # sqrtm still returns the square root, so its "singular matrix" warnings say nothing new
            warnings.simplefilter("ignore", LinAlgWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            fid = frechet_distance(gen.mean(0), np.cov(gen, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))
        info["constant_features"] = int(np.sum((np.ptp(gen, 0) == 0) & (np.ptp(ref, 0) == 0)))
        m = min(n, KID_SUBSET)
        kid = kernel_inception_distance(gen, ref, num_subsets=1 if n <= m else KID_SUBSETS, max_subset_size=m,
                                        seed=KID_SEED)
        # KID unscaled: the kernel sees the judge's feature magnitudes, not Inception's, so clean-fid's
        # ×10³ convention does not carry over
        values = {"fid": fid, "fid_n": float(n), "kid": kid, "kid_n": float(n)}
        if n <= gen.shape[1]:
            info["warning"] = (f"{n} images <= {gen.shape[1]} feature dimensions: the covariance is rank-deficient "
                               "and FID is biased upward, comparable only at the same n")
        info["standardised_by"] = f"the true renders' mean and std per unit ({int(keep.sum())} of {len(keep)} units vary)"
        return MetricResult(self.name, values, n, [Column("fid", "Micro-FID", False),
                                                   Column("kid", "Micro-KID", False)], info)

    def protocol(self) -> dict:
        return {**super().protocol(), "features": "judge trunk, 64-d (after its ReLU)",
                "reference": "the world's true renders of the same micro_coco rows, one per generated image",
                "fid": "Fréchet distance of Gaussian fits (unbiased covariance), fid.frechet_distance",
                "kid": f"unbiased polynomial-kernel MMD², unscaled (fid.kernel_inception_distance): one subset of all "
                       f"images when n <= {KID_SUBSET}, else {KID_SUBSETS} subsets of {KID_SUBSET}, seed {KID_SEED}"}
