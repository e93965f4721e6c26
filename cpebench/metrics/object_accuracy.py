"""Object accuracy: ImageNet top-1 of generated object images (ESD's Imagenette task, its Table 2).

Each image's label is its prompt row's ``class`` (the manifest's ``concept``), an ImageNet-1k category
name exactly as torchvision spells it ("garbage truck", "English springer"); its index is that name's
position in torchvision's category list (church 497, tench 0), the index every ImageNet ResNet-50 uses.
An image is correct when the classifier's top-1 equals its label.

Values (in %): ``acc.<class>`` per class present (share of its images classified as it); ``acc_erased``
the mean over the run's erased classes; ``acc_others`` the mean over every other class (ESD: "the mean
of the other nine classes' accuracies"); ``acc_mean`` over all classes. The erased classes are the run's
(``erased: auto``, resolved by the runner; the unedited model has none), or a list given as the option.

Classifiers (``classifier``):

* ``torchvision`` (default, ESD's ``eval-scripts/imageclassify.py``): ``torchvision.models.resnet50``
  with ``ResNet50_Weights.DEFAULT`` (IMAGENET1K_V2, ``resnet50-11ad3fa6.pth``) and that weight's own
  preprocessing (resize 232 bilinear, centre crop 224, ImageNet mean/std). ``weights``: ``auto`` (the
  torch hub cache, else a download unless offline), a path to that ``.pth`` state dict, or ``tiny``.
* ``hf`` (UnlearnDiffAtk's object classifier; a different protocol, never mixed with ESD's Table 2):
  transformers ``ResNetForImageClassification`` with its ``AutoImageProcessor``. ``weights``: a hub id
  (``auto`` = ``microsoft/resnet-50``), a local folder, or ``tiny``.

``head: imagenette10`` is a labelled variant that takes the argmax over the ten Imagenette classes only
(one reading of a UCE maintainer's reply); the default ``imagenet1k`` is the paper's 1000-way top-1.
``tiny`` weights are random (tests and the smoke preset): their accuracies mean nothing.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from .. import data
from ..errors import ConfigError, DataError, ModelLoadError
from . import Column, GeneratedImage, Metric, MetricResult, device_and_batch_size
from .summary import IMAGENETTE, class_key

CLASSIFIERS = ("torchvision", "hf")
HEADS = ("imagenet1k", "imagenette10")
HF_DEFAULT = "microsoft/resnet-50"
TINY = "tiny"


@lru_cache(maxsize=1)
def imagenet_categories() -> tuple[str, ...]:
    """torchvision's 1,000 ImageNet category names in index order (shipped with torchvision, no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def class_index(name: str) -> int:
    try:
        return imagenet_categories().index(name)
    except ValueError:
        raise DataError(f"class {name!r} is not an ImageNet-1k category name as torchvision spells it "
                        "(e.g. 'garbage truck', 'English springer')") from None


def table_order(name: str) -> tuple[int, int]:
    """ESD Table 2's order for the Imagenette classes, then ImageNet's."""
    return (IMAGENETTE.index(name) if name in IMAGENETTE else len(IMAGENETTE), class_index(name))


# --------------------------------------------------------------------------- classifiers


def tiny_torchvision_resnet(seed: int = 0) -> torch.nn.Module:
    """A random-weight ResNet (one basic block per stage) with ImageNet's 1,000 outputs."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(seed)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=1000)


def load_torchvision(weights: str) -> tuple[torch.nn.Module, object, dict]:
    """(model, preprocessing, what the protocol card records) for ESD's classifier."""
    from torchvision.models import ResNet50_Weights, resnet50

    meta = ResNet50_Weights.DEFAULT
    preprocess = meta.transforms()
    if weights == TINY:
        return tiny_torchvision_resnet(), preprocess, {"weights": TINY}
    if weights == "auto":
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(meta.url).name
        if not cached.is_file() and data._offline():
            raise ModelLoadError(f"torchvision's ResNet-50 weights ({meta.url}) are not in the torch hub cache and "
                                 f"offline mode is set; download them once to {cached} or pass "
                                 "metrics.object_accuracy.options.weights=/path/resnet50-11ad3fa6.pth")
        try:
            model = resnet50(weights=meta)
        except Exception as e:   # urllib/hub errors
            raise ModelLoadError(f"cannot load torchvision's ResNet-50 weights ({e}); download {meta.url} and pass "
                                 "metrics.object_accuracy.options.weights=/path/resnet50-11ad3fa6.pth") from None
        path = cached
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"metrics.object_accuracy.options.weights: {path} does not exist")
        model = resnet50()
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError) as e:
            raise ModelLoadError(f"{path}: not a torchvision ResNet-50 state dict ({e})") from None
    return model, preprocess, {"weights": str(meta), "file": path.name, "sha256": data.sha256_file(path)}


def save_tiny_hf_resnet(path: str | Path, seed: int = 0) -> Path:
    """A random-weight transformers ResNet with 1,000 labels and a ConvNext-style processor, saved like a hub
    model (the ``hf`` classifier's ``tiny`` weights, and the tests' stand-in for a local folder)."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=1000)
    path = Path(path)
    ResNetForImageClassification(config).save_pretrained(path)
    ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875).save_pretrained(path)
    return path


class _HFClassifier(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def load_hf(weights: str) -> tuple[torch.nn.Module, object, dict]:
    from transformers import AutoImageProcessor, ResNetForImageClassification

    if weights == TINY:
        import transformers

        from ..models import build_once

        tag = f"tiny-hf-resnet-seed0-transformers{transformers.__version__}"
        source = str(build_once(data.cache_dir() / "models" / tag, "config.json", save_tiny_hf_resnet))
    else:
        source = HF_DEFAULT if weights == "auto" else weights
    try:
        model = ResNetForImageClassification.from_pretrained(source)
        processor = AutoImageProcessor.from_pretrained(source)
    except OSError as e:
        raise ModelLoadError(f"metrics.object_accuracy.options.weights: cannot load {source!r} ({e})") from None
    if model.config.num_labels != 1000:
        raise ModelLoadError(f"{source}: {model.config.num_labels} labels; an ImageNet-1k classifier has 1000")

    def preprocess(image):
        return processor(images=image, return_tensors="pt").pixel_values[0]

    return _HFClassifier(model), preprocess, {"weights": TINY if weights == TINY else source,
                                              "commit": getattr(model.config, "_commit_hash", None)}


# --------------------------------------------------------------------------- the metric


class ObjectAccuracy(Metric):
    name = "object_accuracy"
    higher_is_better = True
    description = "ImageNet top-1 accuracy per object class (ResNet-50): erased class ↓, the other classes ↑"
    erased_classes_auto = True        # the runner resolves erased=auto to the run's erased concepts

    def __init__(self, classifier: str = "torchvision", weights: str = "auto", head: str = "imagenet1k",
                 erased="auto", device: str = "auto", batch_size: int = 64):
        if classifier not in CLASSIFIERS:
            raise ConfigError(f"metrics.object_accuracy.options.classifier: {classifier!r}; choose "
                              + " or ".join(CLASSIFIERS))
        if head not in HEADS:
            raise ConfigError(f"metrics.object_accuracy.options.head: {head!r}; choose " + " or ".join(HEADS))
        if erased == "auto":
            erased = ()       # a metric built outside a run (tests, `score` of an unedited run): none erased
        if isinstance(erased, str) or not all(isinstance(c, str) for c in erased):
            raise ConfigError(f"metrics.object_accuracy.options.erased: a list of class names, got {erased!r}")
        for c in erased:
            class_index(c)
        self.classifier, self.weights, self.head = classifier, str(weights), head
        self.erased = tuple(erased)
        self.device, self.batch_size = device_and_batch_size(self.name, device, batch_size)
        self._model = None
        super().__init__()

    def reset(self) -> None:
        self.correct: dict[str, int] = defaultdict(int)
        self.total: dict[str, int] = defaultdict(int)

    def model(self):
        if self._model is None:
            loader = load_torchvision if self.classifier == "torchvision" else load_hf
            model, preprocess, self._card = loader(self.weights)
            self._model = (model.eval().to(self.device), preprocess)
        return self._model

    def check(self) -> None:
        self.model()

    @torch.no_grad()
    def score(self, images: Sequence[GeneratedImage]) -> list[dict]:
        model, preprocess = self.model()
        labels = []
        for im in images:
            cls = im.entry.get("concept")
            if not cls:
                raise DataError(f"image {im.key} (prompt set {im.entry.get('set')!r}): no class; object sets need "
                                "a 'class' column")
            labels.append(class_index(cls))
        restrict = torch.tensor([class_index(c) for c in IMAGENETTE])
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            x = torch.stack([preprocess(im.load()) for im in chunk]).to(self.device)
            logits = model(x).float().cpu()
            top5 = logits.topk(5, dim=1).indices
            top1_10 = restrict[logits[:, restrict].argmax(dim=1)]
            for j, im in enumerate(chunk):
                out.append({"label": labels[i + j], "class": im.entry["concept"], "top5": top5[j].tolist(),
                            "top1_imagenette": int(top1_10[j])})
        return out

    def accumulate(self, details: Sequence[dict]) -> None:
        for d in details:
            pred = d["top1_imagenette"] if self.head == "imagenette10" else d["top5"][0]
            self.total[d["class"]] += 1
            self.correct[d["class"]] += int(pred == d["label"])

    def merge(self, other: "ObjectAccuracy") -> None:
        for c, n in other.total.items():
            self.total[c] += n
            self.correct[c] += other.correct[c]

    def compute(self) -> MetricResult:
        acc = {c: 100.0 * self.correct[c] / n for c, n in self.total.items()}
        values: dict[str, float] = {}
        for c in sorted(acc, key=table_order):
            values[class_key(c)], values[class_key(c) + "_n"] = acc[c], float(self.total[c])
        erased = [c for c in acc if c in self.erased]
        others = [c for c in acc if c not in self.erased]
        for key, group in (("acc_erased", erased), ("acc_others", others), ("acc_mean", list(acc))):
            if group:     # a mean over classes (each class weighs the same, as ESD averages them)
                values[key] = sum(acc[c] for c in group) / len(group)
                values[f"{key}_n"] = float(sum(self.total[c] for c in group))
        missing = [c for c in self.erased if c not in acc]
        columns = [Column("acc_erased", "Acc erased class", False), Column("acc_others", "Acc other classes", True)]
        columns += [Column(class_key(c), c, None) for c in sorted(acc, key=table_order)]
        return MetricResult(self.name, values, sum(self.total.values()), columns,
                            {"erased": list(self.erased), "erased_not_generated": missing, **self.protocol()})

    def protocol(self) -> dict:
        card = getattr(self, "_card", None) or {"weights": self.weights}
        return {"classifier": self.classifier, "head": self.head, "top1_of": "1000 ImageNet classes"
                if self.head == "imagenet1k" else "the 10 Imagenette classes", **card}
