"""Generation throughput: images/s of the cpebench engine for a model / batch sizes / dtype.

    python benchmarks/perf/generate.py --model tiny --batch-sizes 1 4 --steps 4 --resolution 64   # CPU
    python benchmarks/perf/generate.py --model random-sd14 --batch-sizes 1 8 16 --dtype fp16      # GPU, SD-1.4 shapes

Each configuration generates ``--images`` images into a fresh temp run dir (PNG writing included)
after one warm-up batch; speeds are reported as images/s and as a ratio to the first configuration
measured in the same run. Absolute figures mean something only on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from cpebench.config import ProtocolConfig
from cpebench.data import PromptRecord
from cpebench.engine import Engine, plan_items
from cpebench.models import load_pipeline

UNET_GFLOP_512 = 677.0   # per forward at 512², SD-1.x (issue #8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | random-sd14 | hub id | local dir")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    loaded = load_pipeline(args.model, dtype=args.dtype, device=args.device)
    proto = ProtocolConfig(model=args.model, steps=args.steps, height=args.resolution, width=args.resolution,
                           dtype=args.dtype)
    records = [PromptRecord(id=str(i), prompt=f"a photograph of object number {i}", seed=i, guidance=None,
                            split="bench", concept=None) for i in range(args.images)]
    items = plan_items("bench", records, images_per_row=1, negative_prompt="", default_guidance=7.5,
                       per_row_guidance=False)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"model={args.model} dtype={args.dtype} steps={args.steps} res={args.resolution} images={args.images} "
          f"device={device_name} torch={torch.__version__}")
    print(f"{'batch':>5} {'img/s':>9} {'ratio':>7} {'TFLOP/s':>8}")
    first = None
    for bs in args.batch_sizes:
        engine = Engine(loaded.pipe, proto, device=args.device, batch_size=bs, progress=False)
        with tempfile.TemporaryDirectory() as warm:
            engine.generate(items[:bs], warm)           # warm-up: kernels, allocator
        with tempfile.TemporaryDirectory() as out:
            _sync(args.device)
            t = time.perf_counter()
            engine.generate(items, out)
            _sync(args.device)
            dt = time.perf_counter() - t
        rate = args.images / dt
        first = first or rate
        scale = (args.resolution / 512) ** 2
        tflops = rate * scale * UNET_GFLOP_512 * 2 * args.steps / 1e3 if args.model != "tiny" else float("nan")
        print(f"{bs:>5} {rate:>9.3f} {rate / first:>6.2f}x {tflops:>8.1f}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
