"""CLIP score: 100·cos(image, prompt) of CLIP's projected embeddings (protocol v1, "CS"; docs/protocol.md).

Model: a transformers CLIP checkpoint by hub id or local directory (default
``openai/clip-vit-base-patch32`` with its CLIPProcessor: shortest side 224, bicubic, centre crop),
``tiny`` (a random-weight CLIP with the real tokenizer, for tests and the smoke preset), or an
open_clip model, ``open_clip:<arch>`` (a registered name such as ``ViT-B-32``, or the path of a
model-config JSON) with option ``pretrained`` (an open_clip tag such as ``openai``, or a local
weights file) and open_clip's own preprocessing and tokenizer. Text is
truncated to 77 tokens (v1 Δ: CPE's script silently skips longer prompts). The score is unclipped
(v1); ``floor_at_zero: true`` gives the 100·max(cos, 0) variant (torchmetrics/RECE), which differs
only for images whose cosine is negative.

Reported per prompt set: the mean and population std of the score (CS_e on an erased set, CS_r on a
remaining one, CS on COCO), and H_a = CS_r − CS_e when a task scores one erased and at least one
remaining set (MACE's artist summary, auxiliary). Sets whose split is ``erased`` are lower-is-better.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ConfigError, DataError, ModelLoadError
from . import Column, GeneratedImage, Metric, MetricResult
from .summary import h_a

log = logging.getLogger(__name__)

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
TEXTS = ("prompt", "clean_prompt")   # what each image is scored against (clean_prompt: a set's clean_file)
TINY = "tiny"
HUB_FILES = ["*.json", "*.txt", "*.safetensors"]


def save_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """A random-weight CLIP (32-d, 32² images) with the real 49,408-token tokenizer, saved like a hub model."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    from ..models import write_clip_tokenizer_files

    torch.manual_seed(seed)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    path = Path(path)
    write_clip_tokenizer_files(path)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer.from_pretrained(path))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_clip_dir(seed: int = 0) -> Path:
    import transformers

    from .. import data
    from ..models import build_once

    tag = f"tiny-clip-seed{seed}-torch{torch.__version__}-transformers{transformers.__version__}"
    return build_once(data.cache_dir() / "models" / tag, "config.json", lambda d: save_tiny_clip(d, seed))


def resolve_clip(model: str, revision: str | None = None) -> tuple[Path, str | None]:
    """Local directory and hub commit of a CLIP model (``tiny``, a directory, or a hub id, cache first)."""
    from ..models import resolve_model_dir

    if model == TINY:
        return tiny_clip_dir(), None
    return resolve_model_dir(model, revision, allow_patterns=HUB_FILES, option="metrics.clip_score.options.model")


OPEN_CLIP = "open_clip:"


class OpenClipModel:
    """An open_clip model behind the same two calls the metric needs (image and text embeddings)."""

    def __init__(self, spec: str, pretrained: str | None, device: str):
        import open_clip

        arch = spec[len(OPEN_CLIP):]
        if arch.endswith(".json"):               # a model config file: registered under its stem
            if not Path(arch).is_file():
                raise ModelLoadError(f"metrics.clip_score.options.model: open_clip config {arch} does not exist")
            open_clip.add_model_config(arch)
            arch = Path(arch).stem
        if arch not in open_clip.list_models():
            raise ModelLoadError(f"metrics.clip_score.options.model: {arch!r} is not an open_clip model "
                                 f"(open_clip {open_clip.__version__} knows e.g. ViT-B-32, ViT-L-14)")
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained,
                                                                                   device=device)
        except Exception as e:  # noqa: BLE001  (open_clip raises RuntimeError/OSError/hub errors): name the option
            raise ModelLoadError(f"metrics.clip_score.options.pretrained: open_clip {arch} with pretrained="
                                 f"{pretrained!r} could not be loaded: {type(e).__name__}: {e}") from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = device
        weights = Path(pretrained) if pretrained and Path(pretrained).is_file() else None
        from ..data import sha256_file

        self.info = {"id": OPEN_CLIP + arch, "pretrained": pretrained, "open_clip": open_clip.__version__,
                     "weights_sha256": sha256_file(weights) if weights else None}

    def embed(self, images, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        tokens = self.tokenizer(list(prompts)).to(self.device)      # open_clip truncates to 77, keeping EOT
        return self.model.encode_image(pixels), self.model.encode_text(tokens)


def load_clip(model: str, revision: str | None = None, device: str = "cpu"):
    """(CLIPModel, CLIPProcessor, info) from ``tiny``, a local directory or a hub id (cache first)."""
    from transformers import CLIPModel, CLIPProcessor

    from ..models import check_tokenizer

    path, commit = resolve_clip(model, revision)
    try:
        clip = CLIPModel.from_pretrained(path).to(device).eval()
        processor = CLIPProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"CLIP model {model!r} ({path}) could not be loaded: {e}") from None
    check_tokenizer(processor.tokenizer, f"CLIP model {model}")
    return clip, processor, {"id": model, "revision": commit}


class ClipScore(Metric):
    name = "clip_score"
    higher_is_better = True
    description = "CLIP score 100·cos(image, prompt) per prompt set (CS_e on erased sets, CS_r / CS elsewhere); H_a"

    def __init__(self, model: str = DEFAULT_MODEL, revision: str | None = None, batch_size: int = 64,
                 device: str = "auto", floor_at_zero: bool = False, pretrained: str | None = None,
                 text: str = "prompt"):
        if text not in TEXTS:
            raise ConfigError(f"metrics.clip_score.options.text: {text!r}; choose {' or '.join(TEXTS)}")
        self.text = text
        self.model_id, self.revision = model, revision
        self.pretrained = pretrained
        if pretrained is not None and not model.startswith(OPEN_CLIP):
            raise ConfigError("metrics.clip_score.options.pretrained is for open_clip models (model: open_clip:<arch>); "
                              f"{model!r} is a transformers CLIP")
        self.batch_size = int(batch_size)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.floor_at_zero = bool(floor_at_zero)
        self._clip = None
        super().__init__()

    def reset(self) -> None:
        self.sets: dict[str, dict] = {}     # set -> {"split", "n", "sum", "sumsq"}

    def _load(self):
        if self._clip is None:
            if self.model_id.startswith(OPEN_CLIP):
                self._clip = OpenClipModel(self.model_id, self.pretrained, self.device)
                self._processor, self._info = None, self._clip.info
            else:
                self._clip, self._processor, self._info = load_clip(self.model_id, self.revision, self.device)
        return self._clip, self._processor

    @torch.no_grad()
    def cosines(self, images, prompts: Sequence[str]) -> list[float]:
        """cos of the projected, normalised embeddings (what CLIP's logits_per_image divides by its scale)."""
        clip, processor = self._load()
        if isinstance(clip, OpenClipModel):
            img, txt = clip.embed(images, prompts)
            return torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).tolist()
        pixels = processor.image_processor(images=list(images), return_tensors="pt").pixel_values.to(self.device)
        text = processor.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        txt = clip.text_projection(clip.text_model(input_ids=text.input_ids.to(self.device),
                                                   attention_mask=text.attention_mask.to(self.device)).pooler_output)
        return torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).tolist()

    def score(self, images: Sequence[GeneratedImage]) -> list[dict]:
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            cos = self.cosines([im.load() for im in chunk], [self.text_of(im) for im in chunk])
            out += [{"cos": c, "set": im.entry["set"], "split": im.entry.get("split", "")} for im, c in zip(chunk, cos)]
        return out

    def text_of(self, im: GeneratedImage) -> str:
        if self.text == "prompt":
            return im.entry["prompt"]
        clean = (im.entry.get("extras") or {}).get("clean_prompt")
        if not clean:
            raise DataError(f"image {im.key} (prompt set {im.entry.get('set')!r}): no clean_prompt; "
                            "metrics.clip_score.options.text=clean_prompt needs a set with a clean_file")
        return clean

    def accumulate(self, details: Sequence[dict]) -> None:
        for d in details:
            s = 100.0 * (max(d["cos"], 0.0) if self.floor_at_zero else d["cos"])
            st = self.sets.setdefault(d["set"], {"split": d.get("split", ""), "n": 0, "sum": 0.0, "sumsq": 0.0})
            st["n"] += 1
            st["sum"] += s
            st["sumsq"] += s * s

    def merge(self, other: "ClipScore") -> None:
        for name, o in other.sets.items():
            st = self.sets.setdefault(name, {"split": o["split"], "n": 0, "sum": 0.0, "sumsq": 0.0})
            for k in ("n", "sum", "sumsq"):
                st[k] += o[k]

    def compute(self) -> MetricResult:
        values, columns, n = {}, [], 0
        for name, st in sorted(self.sets.items()):
            mean = st["sum"] / st["n"]
            values[name] = mean
            values[f"{name}_std"] = math.sqrt(max(st["sumsq"] / st["n"] - mean * mean, 0.0))
            values[f"{name}_n"] = st["n"]
            n += st["n"]
            if self.text == "clean_prompt":     # Six-CD's in-prompt CLIP score: the benign part kept, higher is better
                columns.append(Column(name, f"in-prompt CS {name}", True))
                continue
            erased = st["split"] == "erased"
            label = {"erased": "CS_e", "remained": "CS_r"}.get(st["split"], "CS")
            columns.append(Column(name, f"{label} {name}", not erased))
        erased = [values[s] for s, st in self.sets.items() if st["split"] == "erased"]
        kept = [values[s] for s, st in self.sets.items() if st["split"] == "remained"]
        if len(erased) == 1 and kept and self.text == "prompt":
            values["h_a"] = h_a(erased[0], sum(kept) / len(kept))
            columns.append(Column("h_a", "H_a", True))
        return MetricResult(self.name, values, n, columns, self.protocol())

    def protocol(self) -> dict:
        if not hasattr(self, "_info"):   # re-scored from stored details: the card needs the model's identity
            if self.model_id.startswith(OPEN_CLIP):
                self._load()
            else:
                self._info = {"id": self.model_id, "revision": resolve_clip(self.model_id, self.revision)[1]}
        info = dict(self._info)
        info.update({"score": "100*max(cos,0)" if self.floor_at_zero else "100*cos (unclipped)",
                     "text": ("the row's prompt" if self.text == "prompt" else
                              "the row's clean prompt (Six-CD's in-prompt CLIP score)") + ", truncated to 77 tokens",
                     "preprocessing": "open_clip's transform" if self.model_id.startswith(OPEN_CLIP)
                     else "the model's CLIPProcessor"})
        return info
