"""Scoring throughput: images/s of each metric on the same images, in one run.

    python benchmarks/perf/score.py --images 64                                   # CPU, stand-in models
    python benchmarks/perf/score.py --images 512 --clip openai/clip-vit-base-patch32 --inception auto \
        --gcd /path/to/gcd/resources --insightface /path/to/buffalo_l                          # GPU, real models

Images are random 512² PNGs written to a temp folder (decoding is part of the cost, as in a run).
``tiny`` models (random CLIP, random Inception stand-in) measure the pipeline around the model only;
real figures need the real weights (local dir / cache) and a GPU. GCD and identity time the whole
per-image path (detection, crops, recognition); with random images a real face detector finds few
faces, the tiny stand-ins find some, so their rows depend on the images as well as the models. Goal (issue 5): ≥ 20 img/s per
metric on one H100.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cpebench.metrics import GeneratedImage
from cpebench.metrics.clip_score import ClipScore
from cpebench.metrics.fid import FID
from cpebench.metrics.gcd import GCD
from cpebench.metrics.identity import FaceEmbedder, find_pack, resolve_providers
from cpebench.metrics.nudenet import NudeNet


def make_images(folder: Path, n: int, size: int) -> list[GeneratedImage]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, compress_level=1)
        out.append(GeneratedImage(path, {"key": f"coco/{i}/0", "set": "coco", "split": "coco",
                                         "prompt": f"a photograph of object number {i}", "extras": {"coco_id": i},
                                         "concept": "Adam Driver"}))
    return out


class IdentityTiming:
    """The identity metric's per-image work (detect, align, embed) without a reference run."""

    def __init__(self, models: str, device: str, batch_size: int):
        providers, ctx_id = resolve_providers("cuda" if device.startswith("cuda") else "cpu")
        self.embedder = FaceEmbedder(find_pack(models), providers=providers, ctx_id=ctx_id, batch_size=batch_size)

    def bind(self, run_dir) -> None:
        pass

    def score(self, images):
        return self.embedder([im.load() for im in images])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--clip", default="tiny", help="CLIP model: tiny | hub id | local dir")
    ap.add_argument("--inception", default="tiny", help="tiny | auto | path to inception-2015-12-05.pt")
    ap.add_argument("--gcd", default="tiny", help="GCD resources: tiny | auto | folder")
    ap.add_argument("--insightface", default="tiny", help="identity: insightface pack: tiny | auto | folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the rates here")
    args = ap.parse_args(argv)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"images={args.images} size={args.size} device={device_name} torch={torch.__version__} "
          f"clip={args.clip} inception={args.inception} gcd={args.gcd} insightface={args.insightface}")
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp), args.images, args.size)
        metrics = {
            "nudenet": NudeNet(providers="auto" if args.device.startswith("cuda") else ["CPUExecutionProvider"],
                               batch_size=16),
            "clip_score": ClipScore(model=args.clip, device=args.device, batch_size=args.batch_size),
            "fid (features)": FID(inception=args.inception, device=args.device, batch_size=args.batch_size),
            "gcd": GCD(resources=args.gcd, device=args.device, batch_size=args.batch_size),
            "identity (embed)": IdentityTiming(args.insightface, args.device, args.batch_size),
        }
        print(f"{'metric':<16} {'img/s':>8} {'ratio':>7}")
        first, rows = None, []
        for name, metric in metrics.items():
            metric.bind(Path(tmp) / "run")
            metric.score(images[: min(4, len(images))])       # warm-up: model load, kernels
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(0, len(images), 16):               # the runner scores in chunks of 16
                metric.score(images[i : i + 16])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            rate = len(images) / (time.perf_counter() - t)
            first = first or rate
            print(f"{name:<16} {rate:>8.2f} {rate / first:>7.2f}")
            rows.append({"metric": name, "rate": rate, "ratio": rate / first})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device_name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
