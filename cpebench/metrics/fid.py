"""FID and KID under clean-fid's protocol (protocols.md §4-5, §8), written for streaming and shards.

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
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError

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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class InceptionFeatures:
    """Images -> pool features, as clean-fid computes them."""

    def __init__(self, spec: str = "auto", device: str = "cpu", batch_size: int = 64):
        self.path = find_inception(spec)
        self.sha256 = file_sha256(self.path)
        self.device = device
        self.batch_size = batch_size
        try:
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
