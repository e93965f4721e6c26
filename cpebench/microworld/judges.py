"""The micro world's judges: one small CNN that reads colour, shape, background, style and character.

A generated image is soft: a small autoencoder blurs edges, lowers saturation and adds noise. A
classifier trained only on crisp renders under-reads such images (0.53 on autoencoder reconstructions
of true images in the first probes), so the judge trains on clean renders put through random
degradations: colour jitter (gain, brightness, desaturation; never a hue shift, which would change the
label), Gaussian blur, a 32→16→32 down-up sample and Gaussian noise. It is measured on held-out renders,
clean and under fixed degradations (``DEGRADATIONS``).

One trunk with a head per kind, not one network per kind: the kinds share their low-level features
(edges, hues, textures) and one training run fits the budget (under 2 minutes on one CPU thread).
Characters are trained on a larger share of scenes (``Recipe.p_character``) than the world's default
so each name is seen often; the character head's classes are the names and ``none``. Impostors (generic
objects wearing an accessory, ``Recipe.p_impostor``) are ``none``: without them the head named a
character from its accessory alone (a red star with Zorbin's ring read as Zorbin 24 % of the time).

Training is seeded: the same recipe on the same number of threads gives the same weights. Weights are
saved with safetensors; the file's metadata records the recipe and every head's classes, and loading
refuses a file whose classes differ from this world's.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CpebenchError
from . import world

NONE = "none"
CLASSES: dict[str, tuple[str, ...]] = {
    "colour": tuple(world.COLOURS),
    "shape": world.SHAPES,
    "background": tuple(world.BACKGROUNDS),
    "style": world.STYLES,
    "character": (NONE, *world.CHARACTERS),
}
_FORMAT = "cpebench-micro-judge/2"


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    n_train: int = 20_000        # train-split renders, degraded afresh at every step
    steps: int = 2_000
    batch_size: int = 128
    lr: float = 3e-3             # AdamW, linear decay to 0
    weight_decay: float = 1e-4
    p_character: float = 0.35    # share of character scenes in the judge's training data
    p_impostor: float = 0.2      # share of the other scenes that wear an accessory
    n_recon: int = 5_000         # with a model's autoencoder: this many train renders are also seen as its
    p_recon: float = 0.5         # reconstructions, each drawn image taken as one with this probability

    @property
    def mix(self) -> dict:
        return {"p_character": self.p_character, "p_impostor": self.p_impostor}


class Judge(nn.Module):
    """Three conv blocks (32→16→8→4), a 64-unit layer and a linear head per kind: 70 k parameters."""

    def __init__(self, classes: dict[str, Sequence[str]] = CLASSES):
        super().__init__()
        self.classes = {k: tuple(v) for k, v in classes.items()}

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

        self.trunk = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 48), nn.Flatten(),
                                   nn.Linear(48 * 4 * 4, 64), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(64, len(v)) for k, v in self.classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: float N×3×32×32 in [0, 1] → logits per kind."""
        h = self.trunk(x * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 512) -> dict[str, list[str]]:
        """Class names per kind for uint8 N×32×32×3 images."""
        self.eval()
        x = to_tensor(images)
        idx = {k: [] for k in self.classes}
        for i in range(0, len(x), batch_size):
            for k, logits in self(x[i:i + batch_size]).items():
                idx[k].append(logits.argmax(1))
        return {k: [self.classes[k][j] for j in torch.cat(v).tolist()] for k, v in idx.items()}


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 N×32×32×3 → float N×3×32×32 in [0, 1]."""
    images = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    return images.permute(0, 3, 1, 2).float() / 255


def targets(labels: Sequence[dict], classes: dict[str, Sequence[str]] = CLASSES) -> dict[str, torch.Tensor]:
    """Class indices per kind from the world's labels (a scene without a character is ``none``)."""
    out = {}
    for kind, names in classes.items():
        index = {n: i for i, n in enumerate(names)}
        out[kind] = torch.tensor([index[lab[kind] or NONE] for lab in labels])
    return out


# --------------------------------------------------------------------------- degradations


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (0 leaves the image unchanged)."""
    n, c, h, w = x.shape
    t = torch.arange(-3, 4, dtype=x.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)           # (n·c, 7)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def _down_up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)


def _desaturate(x: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    grey = x.mean(1, keepdim=True)
    return x + (grey - x) * amount[:, None, None, None]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random training degradations, independently per image."""
    n = len(x)

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    x = x * u(0.9, 1.1, 3, 1, 1) * u(0.8, 1.2, 1, 1, 1)          # channel gain, brightness
    x = _desaturate(x, u(0.0, 0.35))
    x = _blur(x, u(0.0, 1.2) * (torch.rand(n, generator=g) < 0.8))
    x = torch.where((torch.rand(n, generator=g) < 0.3)[:, None, None, None], _down_up(x), x)
    x = x + torch.randn(x.shape, generator=g) * u(0.0, 0.08, 1, 1, 1)
    return x.clamp(0, 1)


def _fixed_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _const(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((len(x),), value)


# Fixed degradations for measuring a judge (images in [0, 1]).
DEGRADATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "clean": lambda x: x,
    "blur σ1": lambda x: _blur(x, _const(x, 1.0)),
    "noise σ0.1": lambda x: _fixed_noise(x, 0.1),
    "down-up ½": _down_up,
    "all": lambda x: _fixed_noise(_down_up(_blur(_desaturate(x, _const(x, 0.2)), _const(x, 0.8))), 0.05),
}


# --------------------------------------------------------------------------- training and measuring


def train(recipe: Recipe = Recipe(), log: Callable[[str], None] | None = None,
          reconstruct: Callable[[np.ndarray], np.ndarray] | None = None) -> Judge:
    """A judge trained by ``recipe`` on the world's train split. ``reconstruct`` (uint8 images → uint8
    images, e.g. a model's autoencoder) adds the model's way of drawing: the judge also trains on the
    reconstructions of true renders, still labelled by the renders' true scenes (never by a caption,
    so it is not taught to agree with the model's mistakes)."""
    torch.manual_seed(recipe.seed)
    judge = Judge()
    images, _, labels = world.batch("train", recipe.n_train, **recipe.mix)
    x, y = torch.from_numpy(images), targets(labels)    # uint8 until a batch is drawn: 4× less memory
    recon = torch.from_numpy(reconstruct(images[:recipe.n_recon])) if reconstruct else None
    g = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(judge.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / recipe.steps)
    judge.train()
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        i = torch.randint(len(x), (recipe.batch_size,), generator=g)
        batch = x[i]
        if recon is not None:
            use = (i < len(recon)) & (torch.rand(len(i), generator=g) < recipe.p_recon)
            batch = torch.where(use[:, None, None, None], recon[i.clamp(max=len(recon) - 1)], batch)
        logits = judge(augment(to_tensor(batch), g))
        loss = sum(F.cross_entropy(logits[k], y[k][i]) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % 250 == 0:
            log(f"step {step + 1}/{recipe.steps}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f} s")
    return judge.eval()


@torch.no_grad()
def accuracy(judge: Judge, images: np.ndarray, labels: Sequence[dict], degradation: str = "clean"
             ) -> dict[str, float]:
    """Per kind, the share of images whose class the judge reads right; ``character*`` counts only
    images of a character, ``impostor`` only accessories on generic objects (read right: ``none``)."""
    judge.eval()
    logits = judge(DEGRADATIONS[degradation](to_tensor(images)))
    y = targets(labels, judge.classes)
    out = {k: (logits[k].argmax(1) == y[k]).float().mean().item() for k in judge.classes}
    right = logits["character"].argmax(1) == y["character"]
    is_char = y["character"] != 0
    is_impostor = torch.tensor([lab["accessory"] is not None for lab in labels]) & ~is_char
    for name, subset in (("character*", is_char), ("impostor", is_impostor)):
        if subset.any():
            out[name] = right[subset].float().mean().item()
    return out


def save(judge: Judge, path: str | Path, recipe: Recipe, trained_on: str = "renders") -> Path:
    """``trained_on`` says what besides the world's renders the judge saw (e.g. a model's autoencoder)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes a metadata map in hash order, so several keys give other bytes
    meta = {"cpebench": json.dumps({"format": _FORMAT, "classes": judge.classes, "recipe": asdict(recipe),
                                    "trained_on": trained_on}, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(path), metadata=meta)
    return path


def load(path: str | Path) -> tuple[Judge, Recipe]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CpebenchError(f"{path}: no such micro-world judge file")
    meta = metadata(path)
    classes = {k: tuple(v) for k, v in meta["classes"].items()}
    if classes != CLASSES:
        raise CpebenchError(f"{path}: the judge was trained for classes {classes}, but this micro world has "
                            f"{CLASSES}; retrain it (python -m cpebench.microworld.judges)")
    judge = Judge(classes)
    judge.load_state_dict(load_file(str(path)))
    return judge.eval(), Recipe(**meta["recipe"])


def metadata(path: str | Path) -> dict:
    """A judge file's record: format, classes, recipe, trained_on."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("cpebench")
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != _FORMAT:
        raise CpebenchError(f"{path}: not a micro-world judge (metadata format {meta.get('format')!r}, "
                            f"expected {_FORMAT!r})")
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cpebench.microworld.judges",
                                description="Train the micro world's judge on one thread and measure it.")
    p.add_argument("--out", default="micro-judge.safetensors")
    p.add_argument("--steps", type=int, default=Recipe.steps)
    p.add_argument("--seed", type=int, default=Recipe.seed)
    p.add_argument("--n-eval", type=int, default=2_000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    recipe = Recipe(seed=args.seed, steps=args.steps)
    t0 = time.perf_counter()
    judge = train(recipe, log=print)
    print(f"trained in {time.perf_counter() - t0:.0f} s; {sum(p.numel() for p in judge.parameters()):,} parameters")
    save(judge, args.out, recipe)
    images, _, labels = world.batch("heldout", args.n_eval, **recipe.mix)
    for name in DEGRADATIONS:
        acc = accuracy(judge, images, labels, name)
        print(f"{name:12s} " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
