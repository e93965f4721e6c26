"""FID and KID under clean-fid's protocol (docs/protocol.md), written for streaming and shards.

* Images: RGB uint8 -> each channel resized in float32 with PIL bicubic straight to 299x299 (no crop,
  no quantisation: clean-fid's "clean" mode).
* Features: the Inception-v3 torchscript ``inception-2015-12-05.pt`` that clean-fid uses, its
  ``layers`` applied to (x - 128) / 128, 2048-d pool features. Loaded from a local file, the user cache,
  or clean-fid's own download location; ``tiny`` is a small random torchscript model with the same
  interface, for tests and the smoke preset.
* FID: Gaussian fits (mean, unbiased covariance) accumulated in float64 as (n, sum, sum of outer
  products), so shards merge exactly; Fréchet distance with scipy's sqrtm and clean-fid's 1e-6 fallback.
* KID: clean-fid's unbiased polynomial-kernel MMD² averaged over 100 subsets of m = min(n1, n2, 1000),
  with numpy's RandomState seeded (v1 Δ: clean-fid draws from the unseeded global state).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError, ModelLoadError
from . import Column, GeneratedImage, Metric, MetricResult

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
FEATURE_DIM = 2048
SIZE = 299


# --------------------------------------------------------------------------- images


def clean_resize(image) -> np.ndarray:
    """clean-fid "clean" mode: per channel, float32, PIL bicubic, straight to 299x299 -> [299, 299, 3]."""
    from PIL import Image

    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    channels = [np.asarray(Image.fromarray(array[:, :, c], mode="F").resize((SIZE, SIZE), resample=Image.BICUBIC))
                for c in range(3)]
    return np.stack(channels, axis=2).astype(np.float32)


# --------------------------------------------------------------------------- feature extractor


class _TinyInception(torch.nn.Module):
    """Random stand-in with the torchscript interface clean-fid uses (a ``layers`` module)."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(16, dim, 3, stride=2), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def forward(self, x):
        return self.layers(x)


def tiny_inception_path(seed: int = 0) -> Path:
    from .. import data

    path = data.cache_dir() / "models" / f"tiny-inception-seed{seed}-torch{torch.__version__}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with warnings.catch_warnings():   # torchscript is deprecated, but clean-fid's Inception is one
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.script(_TinyInception()), str(tmp))
        os.replace(tmp, path)
    return path


def inception_candidates() -> list[Path]:
    """Where an already-downloaded clean-fid Inception may be: our cache, clean-fid's default (/tmp)."""
    from .. import data

    return [data.cache_dir() / "models" / INCEPTION_FILE, Path("/tmp") / INCEPTION_FILE,
            Path.home() / ".cache" / "clean-fid" / INCEPTION_FILE]


def find_inception(spec: str = "auto") -> Path:
    """``tiny``, a path to ``inception-2015-12-05.pt``, or ``auto`` (known locations, else a download
    into the cache unless offline)."""
    if spec == "tiny":
        return tiny_inception_path()
    if spec != "auto":
        p = Path(spec).expanduser()
        if not p.is_file():
            raise ModelLoadError(f"Inception weights {p} do not exist (metrics.<fid|kid>.options.inception)")
        return p
    for p in inception_candidates():
        if p.is_file():
            return p
    target = inception_candidates()[0]
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "CPEBENCH_OFFLINE"))
    hint = (f"download {INCEPTION_URL} once and pass it with metrics.<fid|kid>.options.inception=/path/{INCEPTION_FILE}, "
            f"or put it at {target}")
    if offline:
        raise ModelLoadError(f"clean-fid's Inception weights are not on this machine and offline mode is set; {hint}")
    try:
        import urllib.request

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        urllib.request.urlretrieve(INCEPTION_URL, tmp)
        os.replace(tmp, target)
    except OSError as e:
        raise ModelLoadError(f"cannot download clean-fid's Inception weights ({e}); {hint}") from None
    return target


class InceptionFeatures:
    """Images -> pool features, as clean-fid computes them."""

    def __init__(self, spec: str = "auto", device: str = "cpu", batch_size: int = 64):
        self.path = find_inception(spec)
        from ..data import sha256_file

        self.sha256 = sha256_file(self.path)
        self.device = device
        self.batch_size = batch_size
        try:
            with warnings.catch_warnings():   # torchscript is deprecated, but clean-fid's Inception is one
                warnings.simplefilter("ignore", FutureWarning)
                self.model = torch.jit.load(str(self.path), map_location=device).eval()
        except (RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{self.path} is not a torchscript Inception model: {e}") from None

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = np.stack([clean_resize(im) for im in images[i : i + self.batch_size]])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
            feats = self.model.layers((x - 128) / 128)
            out.append(feats.reshape(x.shape[0], -1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))

    def info(self) -> dict:
        return {"feature_extractor": str(self.path.name), "sha256": self.sha256, "resize": "clean (PIL bicubic, float32, 299)"}


# --------------------------------------------------------------------------- statistics


class GaussianStats:
    """Streaming mean / unbiased covariance in float64; ``merge`` adds shards exactly."""

    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self.sum = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    def update(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f

    def merge(self, other: "GaussianStats") -> None:
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer

    def mean(self) -> np.ndarray:
        return self.sum / self.n

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError("a covariance needs at least 2 images")
        mu = self.mean()
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def to_npz(self, path: Path) -> None:
        np.savez(path, n=self.n, sum=self.sum, outer=self.outer)

    @classmethod
    def from_npz(cls, path: Path) -> "GaussianStats":
        z = np.load(path)
        s = cls(z["sum"].shape[0])
        s.n, s.sum, s.outer = int(z["n"]), z["sum"], z["outer"]
        return s


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||² + tr(S1 + S2 - 2 sqrt(S1 S2)), as clean-fid computes it."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        log.warning("FID: singular product; adding %g to the covariance diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_stats(a: GaussianStats, b: GaussianStats) -> float:
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


def kernel_inception_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int | None = 0) -> float:
    """clean-fid's ``kernel_distance(feats1, feats2)`` (same draw order: feats2's subset first), with a
    seeded RandomState (None = numpy's global state, as clean-fid)."""
    rng = np.random if seed is None else np.random.RandomState(seed)
    feats1, feats2 = np.asarray(feats1, dtype=np.float64), np.asarray(feats2, dtype=np.float64)
    n = feats1.shape[1]
    m = min(feats1.shape[0], feats2.shape[0], max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 images on each side")
    t = 0.0
    for _ in range(num_subsets):
        x = feats2[rng.choice(feats2.shape[0], m, replace=False)]
        y = feats1[rng.choice(feats1.shape[0], m, replace=False)]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


# --------------------------------------------------------------------------- the FID metric


_COCO_ID = re.compile(r"(\d{12})$")


def coco_id_of(path: Path) -> int | None:
    """The 12-digit zero-padded id a COCO file name ends with (COCO_val2014_000000203564.jpg), else None."""
    m = _COCO_ID.search(path.stem)
    return int(m.group(1)) if m else None


class InceptionMetric(Metric):
    """Shared by FID and KID: Inception features of the scored images, kept beside the run as .npy
    chunks; ``scores.jsonl`` holds only (chunk, row), so a resumed run replays without recomputing."""

    def __init__(self, inception: str = "auto", device: str = "auto", batch_size: int = 64):
        self.inception = inception
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.batch_size = int(batch_size)
        self.store: Path | None = None
        self._extractor: InceptionFeatures | None = None
        self._chunk: tuple[str, np.ndarray] | None = None
        super().__init__()

    def bind(self, run_dir: Path) -> None:
        self.store = Path(run_dir) / "features"

    def extractor(self) -> InceptionFeatures:
        if self._extractor is None:
            self._extractor = InceptionFeatures(self.inception, self.device, self.batch_size)
        return self._extractor

    def chunk_name(self, keys: Sequence[str]) -> str:
        """Feature file of these image keys under this extractor."""
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        return f"inception-{self.extractor().sha256[:12]}-{digest}.npy"

    def features(self, images: Sequence[GeneratedImage], store: Path) -> tuple[str, np.ndarray]:
        """Features of ``images`` written to a chunk in ``store`` (named by the extractor and the keys)."""
        feats = self.extractor()([im.load() for im in images])
        chunk = self.chunk_name([im.key for im in images])
        store.mkdir(parents=True, exist_ok=True)
        tmp = store / f".{chunk}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, feats)
        os.replace(tmp, store / chunk)
        return chunk, feats

    def score(self, images: Sequence[GeneratedImage]) -> list[dict]:
        if self.store is None:
            raise RuntimeError(f"{self.name}: bind(run_dir) must be called before scoring (features live beside the run)")
        chunk, _ = self.features(images, self.store)
        return [{"chunk": chunk, "row": i, "set": im.entry["set"], "key": im.key,
                 "coco_id": (im.entry.get("extras") or {}).get("coco_id")} for i, im in enumerate(images)]

    def grouped(self, details: Sequence[dict]):
        """(set, features [k, d], details) per (chunk, set), in order: one matrix op per chunk, not per image."""
        groups: dict[tuple[str, str], list[dict]] = {}
        for d in details:
            groups.setdefault((d["chunk"], d["set"]), []).append(d)
        for (chunk, set_name), ds in groups.items():
            if self._chunk is None or self._chunk[0] != chunk:
                if self.store is None:
                    raise RuntimeError(f"{self.name}: bind(run_dir) must be called before replaying stored details")
                self._chunk = (chunk, np.load(self.store / chunk))
            yield set_name, self._chunk[1][[d["row"] for d in ds]], ds

    def protocol(self) -> dict:
        return {**self.extractor().info(), "mode": "clean-fid clean"}


class FID(InceptionMetric):
    """FID of each scored prompt set against the real images of the same COCO ids (protocol v1)."""

    name = "fid"
    higher_is_better = False
    description = "FID (clean-fid protocol) against real MS-COCO images selected by coco_id"

    def __init__(self, reference_images: str | None = "auto", inception: str = "auto", device: str = "auto",
                 batch_size: int = 64):
        # auto: $CPEBENCH_COCO (a folder of the real MS-COCO images, e.g. val2014/)
        self.reference_images = (os.environ.get("CPEBENCH_COCO") or None) if reference_images == "auto" else reference_images
        super().__init__(inception, device, batch_size)

    def check(self) -> None:
        if not self.reference_images:
            raise ConfigError("metrics.fid needs the real MS-COCO images: set CPEBENCH_COCO=/path/to/val2014 or "
                              "metrics.fid.options.reference_images=DIR (or leave FID out: metrics=<the others>)")
        if not Path(self.reference_images).expanduser().is_dir():
            raise ConfigError(f"metrics.fid.options.reference_images: {self.reference_images} is not a directory")

    def reset(self) -> None:
        self.stats: dict[str, GaussianStats] = {}
        self.ids: dict[str, list[int]] = {}

    def accumulate(self, details: Sequence[dict]) -> None:
        for set_name, feats, ds in self.grouped(details):
            self.stats.setdefault(set_name, GaussianStats(feats.shape[1])).update(feats)
            self.ids.setdefault(set_name, []).extend(d["coco_id"] for d in ds)

    def merge(self, other: "FID") -> None:
        for name, st in other.stats.items():
            if name in self.stats:
                self.stats[name].merge(st)
            else:
                self.stats[name] = st
            self.ids.setdefault(name, []).extend(other.ids.get(name, []))

    def reference_stats(self, ids: Sequence[int]) -> tuple[GaussianStats, dict]:
        """Statistics of the real images with these COCO ids; cached under a name that encodes the id
        set, the resize mode and the feature extractor."""
        from .. import data

        if not self.reference_images:
            self.check()
        if any(i is None for i in ids):
            raise ConfigError("metrics.fid: some scored images have no coco_id (FID is for the COCO prompt set)")
        ext = self.extractor()
        wanted = sorted({int(i) for i in ids})
        id_hash = hashlib.sha256(",".join(map(str, wanted)).encode()).hexdigest()[:12]
        name = f"coco-ids{id_hash}-n{len(wanted)}-clean{SIZE}-inception{ext.sha256[:12]}.npz"
        cached = data.cache_dir() / "fid-reference" / name
        info = {"reference": str(self.reference_images), "reference_stats": str(cached), "reference_n": len(wanted)}
        if cached.exists():
            return GaussianStats.from_npz(cached), info
        root = Path(self.reference_images).expanduser()
        if not root.is_dir():
            raise DataError(f"metrics.fid.options.reference_images: {root} is not a directory")
        found = {}
        for p in root.rglob("*"):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png") and (i := coco_id_of(p)) is not None:
                found.setdefault(i, p)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise DataError(f"{root}: {len(missing)} of {len(wanted)} COCO ids have no image (first: "
                            f"{missing[0]:012d}); give the folder that holds them (val2014 for coco_30k)")
        from PIL import Image
        from tqdm.auto import tqdm

        stats: GaussianStats | None = None
        paths = [found[i] for i in wanted]
        for k in tqdm(range(0, len(paths), self.batch_size), desc="fid reference", unit="batch", leave=False):
            images = []
            for p in paths[k : k + self.batch_size]:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            feats = ext(images)
            stats = stats or GaussianStats(feats.shape[1])
            stats.update(feats)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.stem}.{os.getpid()}.npz")
        stats.to_npz(tmp)
        os.replace(tmp, cached)
        return stats, info

    def compute(self) -> MetricResult:
        values, columns, info, n = {}, [], {}, 0
        for name, st in sorted(self.stats.items()):
            ref, ref_info = self.reference_stats(self.ids[name])
            values[name] = fid_from_stats(st, ref)
            values[f"{name}_n"] = st.n
            n += st.n
            columns.append(Column(name, f"FID {name}", False))
            info[name] = ref_info
            if st.n <= st.dim:
                # Fewer images than feature dimensions: the covariance is singular and FID is biased
                # upward (and depends strongly on n); such values compare only with the same n.
                note = (f"FID {name}: {st.n} images <= {st.dim} feature dimensions; the covariance is rank-deficient "
                        f"and FID is biased upward, comparable only at the same n")
                log.warning(note)
                info[name] = {**ref_info, "warning": note}
        return MetricResult(self.name, values, n, columns, {**self.protocol(), "sets": info})

    def protocol(self) -> dict:
        return {**super().protocol(), "reference": "real MS-COCO images by coco_id"}


class KID(InceptionMetric):
    """KID of each scored prompt set against the unedited model's images of the same rows and seeds
    (protocol v1: the reference is a run of ``sd`` under the same protocol)."""

    name = "kid"
    higher_is_better = False
    uses_reference_run = True    # the runner resolves reference_run=auto to the unedited model's run
    description = "KID×10³ (clean-fid kernel, seeded subsets) against the unedited model's images of the same rows"

    def __init__(self, reference_run: str | None = None, inception: str = "auto", device: str = "auto",
                 batch_size: int = 64, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0):
        self.reference_run = None if reference_run == "auto" else reference_run   # auto: resolved by the runner
        self.num_subsets, self.max_subset_size, self.seed = int(num_subsets), int(max_subset_size), seed
        super().__init__(inception, device, batch_size)

    def check(self) -> None:
        if not self.reference_run:
            raise ConfigError("metrics.kid.options.reference_run: give the run directory of the unedited model "
                              "(`cpebench run` resolves `auto` to it and generates it when missing)")

    def reset(self) -> None:
        self.feats: dict[str, list[np.ndarray]] = {}
        self.keys: dict[str, list[str]] = {}

    def accumulate(self, details: Sequence[dict]) -> None:
        for set_name, feats, ds in self.grouped(details):
            self.feats.setdefault(set_name, []).append(feats)
            self.keys.setdefault(set_name, []).extend(d["key"] for d in ds)

    def merge(self, other: "KID") -> None:
        for name in other.feats:
            self.feats.setdefault(name, []).extend(other.feats[name])
            self.keys.setdefault(name, []).extend(other.keys[name])

    def reference_features(self, keys: Sequence[str]) -> tuple[np.ndarray, dict]:
        """Features of the reference run's images with these keys (cached in that run's features/)."""
        from ..engine import read_manifest

        if not self.reference_run:
            raise ConfigError("metrics.kid.options.reference_run: give the run directory of the unedited model "
                              "(`cpebench generate --method sd --task <task>` with the same protocol)")
        root = Path(self.reference_run).expanduser()
        entries = read_manifest(root)
        missing = [k for k in keys if k not in entries]
        if missing:
            raise DataError(f"{root}: the reference run lacks {len(missing)} of the {len(keys)} images scored here "
                            f"(first: {missing[0]}); generate them with the unedited model and the same protocol")
        ref = [GeneratedImage(root / entries[k]["file"], entries[k]) for k in keys]
        cached = root / "features" / self.chunk_name(keys)
        feats = np.load(cached) if cached.exists() else self.features(ref, root / "features")[1]
        method = None
        gen = root / "generation.json"
        if gen.exists():
            import json

            method = json.loads(gen.read_text()).get("method", {}).get("name")
        return feats, {"reference_run": str(root), "reference_method": method, "reference_n": len(keys)}

    def compute(self) -> MetricResult:
        values, columns, info, n = {}, [], {}, 0
        for name in sorted(self.feats):
            gen = np.concatenate(self.feats[name])
            ref, ref_info = self.reference_features(self.keys[name])
            raw = kernel_inception_distance(gen, ref, self.num_subsets, self.max_subset_size, self.seed)
            values[name], values[f"{name}_raw"], values[f"{name}_n"] = raw * 1e3, raw, gen.shape[0]
            n += gen.shape[0]
            columns.append(Column(name, f"KID×10³ {name}", False))
            info[name] = ref_info
        return MetricResult(self.name, values, n, columns, {**self.protocol(), "sets": info})

    def protocol(self) -> dict:
        return {**super().protocol(), "kernel": "(x·y/d + 1)^3, unbiased MMD²", "subsets": self.num_subsets,
                "max_subset_size": self.max_subset_size, "seed": self.seed,
                "reference": "the unedited model's images of the same rows and seeds"}
