"""Fidelity of the fast modes: do they give the fp32 reference's images and task numbers?

For ``--rows`` prompt rows (default the first 64 of I2P, the rows where NudeNet counts mean something;
``--prompts coco`` for COCO captions), every mode generates one image per row with the rows' own seeds.
Each mode is compared with the fp32 reference (batch ``--batch-size``, no compile):

- mean |Δpixel| (0-255) over all images, and the worst image's mean |Δpixel|;
- NudeNet (the real 3.0.8 detector): total detections and the nude-image rate, and their Δ;
- CLIP score (mean 100·cos over the images) and its Δ.

``fp32-seed2`` is the reference with every seed shifted by ``SEED_SHIFT``: a different draw of the same
model, so its distance from ``fp32`` is the noise between two seeds. A mode is "within noise" when, for
each metric, |Δ| ≤ |fp32-seed2 − fp32|. That floor comes from one pair of seed sets, so it is a rough
estimate; the per-image standard errors of the CLIP score are printed so readers can judge.

    python benchmarks/perf/fidelity.py --model random-sd14 --device cuda             # GPU, SD-1.4 shapes
    python benchmarks/perf/fidelity.py --model /path/to/sd-v1-4 --device cuda \\
        --clip openai/clip-vit-base-patch32                                             # GPU, the real verdict
    python benchmarks/perf/fidelity.py --model tiny --resolution 64 --steps 4 --rows 8 \\
        --compile-backend eager                                                         # CPU smoke

``--out DIR`` keeps the images; a rerun with the same DIR reuses them (the engine resumes), so the modes
can be spread over several calls (name ``fp32-seed2`` in each for verdicts). Use one DIR per setting:
nothing checks that the model, steps or rows of the stored images match.

With random weights (``random-sd14``, ``tiny``) only the pixel differences mean something; NudeNet and
CLIP numbers need the real SD-1.4 weights (and a real CLIP: ``--clip`` defaults to the random ``tiny``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cpebench.config import ProtocolConfig
from cpebench.engine import Engine, plan_items, read_manifest
from modes import MODES as ENGINE_MODES  # benchmarks/perf/modes.py

SEED_SHIFT = 1_000_003
REFERENCE, NOISE = "fp32", "fp32-seed2"
# name: (engine settings, seed shift); fp32-seed2 is the reference with other seeds (the noise floor).
MODES = {REFERENCE: (ENGINE_MODES[REFERENCE], 0), NOISE: (ENGINE_MODES[REFERENCE], SEED_SHIFT),
         **{name: (m, 0) for name, m in ENGINE_MODES.items() if name != REFERENCE}}
PROMPT_SETS = {  # name: (data file, format, per-row guidance, drop empty rows) as in benchmarks/tasks/sets
    "i2p": ("prompts/I2P_prompts_4703.csv", "i2p", True, True),
    "coco": ("prompts/coco_30k.csv", "coco", False, False),
}


def load_rows(args):
    from cpebench import data
    from cpebench.errors import DataError

    file, fmt, per_row, drop_empty = PROMPT_SETS[args.prompts]
    try:
        path = data.resolve_data_file(file, args.data_dir)
    except DataError as e:
        sys.exit(f"fidelity: the {args.prompts} prompts are not available ({e})")
    records = data.load_prompt_set(path, fmt, split=args.prompts, drop_empty=drop_empty, limit=args.rows)
    return records, per_row


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def generate(args, pipe, mode: str, records, per_row: bool, out: Path) -> dict:
    m, shift = MODES[mode]
    if shift:
        records = [dataclasses.replace(r, seed=r.seed + shift) for r in records]
    items = plan_items(args.prompts, records, images_per_row=1, negative_prompt="", default_guidance=7.5,
                       per_row_guidance=per_row)
    proto = ProtocolConfig(model=args.model, steps=args.steps, height=args.resolution, width=args.resolution,
                           dtype=m.dtype, vae_dtype=m.vae_dtype, tf32=m.tf32)
    engine = Engine(pipe, proto, device=args.device, batch_size=args.batch_size, progress=False, compile=m.compile,
                    cuda_graphs=m.cuda_graphs, compile_backend=args.compile_backend)
    t = time.perf_counter()
    stats = engine.generate(items, out / mode)   # the next mode's Engine sets the compile state for itself
    return {"seconds": time.perf_counter() - t, "flagged": stats["flagged"], "engine": engine.settings()}


def pixels(run_dir: Path, entries: dict) -> dict[str, np.ndarray]:
    from PIL import Image

    out = {}
    for e in entries.values():
        with Image.open(run_dir / e["file"]) as im:
            out[e["row_id"]] = np.asarray(im.convert("RGB"), dtype=np.int16)
    return out


def score(run_dir: Path, nudenet, clip) -> dict:
    """Per-image NudeNet counts and CLIP scores (by row id), and the metrics' own aggregates."""
    from cpebench.metrics import GeneratedImage

    entries = read_manifest(run_dir)
    images = [GeneratedImage(run_dir / e["file"], e) for e in entries.values()]
    rows = [e["row_id"] for e in entries.values()]
    result = {}
    for metric in (nudenet, clip):
        metric.reset()
        metric.bind(run_dir)
        details = metric.score(images)
        metric.accumulate(details)
        result[metric.name] = (details, metric.compute().values)
    (nd, nv), (cd, cv) = result["nudenet"], result["clip_score"]
    clip_scores = [100.0 * d["cos"] for d in cd]
    return {
        "entries": entries,
        "nudenet_total": nv["total"], "nude_rate": nv["rate"], "nudenet_values": nv,
        "nudenet_per_image": dict(zip(rows, (len(nudenet.counted(d)) for d in nd))),
        "clip": cv[images[0].entry["set"]],
        "clip_per_image": dict(zip(rows, clip_scores)),
        "clip_se": float(np.std(clip_scores) / math.sqrt(len(clip_scores))),
    }


def pixel_differences(ref_px: dict, run_px: dict) -> dict:
    """|Δpixel| (0-255) between two runs' images of the same rows: mean over all images, the worst
    image's mean, and the largest single difference."""
    rows = sorted(ref_px)
    per_image = [float(np.abs(run_px[r] - ref_px[r]).mean()) for r in rows]
    return {"pixel_mean": float(np.mean(per_image)), "pixel_worst_image": max(per_image),
            "pixel_max": int(max(np.abs(run_px[r] - ref_px[r]).max() for r in rows))}


def compare(ref: dict, ref_px: dict, run: dict, run_px: dict) -> dict:
    rows = sorted(ref_px)
    clip_diff = [run["clip_per_image"][r] - ref["clip_per_image"][r] for r in rows]
    return {
        **pixel_differences(ref_px, run_px),
        "d_nudenet_total": run["nudenet_total"] - ref["nudenet_total"],
        "d_nude_rate": run["nude_rate"] - ref["nude_rate"],
        "d_clip": run["clip"] - ref["clip"],
        "clip_diff_se": float(np.std(clip_diff) / math.sqrt(len(rows))),
        "images_nudenet_changed": sum(run["nudenet_per_image"][r] != ref["nudenet_per_image"][r] for r in rows),
    }


DELTAS = ("d_nudenet_total", "d_nude_rate", "d_clip")


def verdict(mode: str, row: dict, floor: dict | None) -> str:
    if mode == REFERENCE:
        return "reference"
    if mode == NOISE:
        return "noise floor"
    if floor is None:
        return f"n/a (no {NOISE})"
    over = [k[2:] for k in DELTAS if abs(row[k]) > abs(floor[k]) + 1e-9]
    return "within noise" if not over else "outside noise: " + ", ".join(over)


def table(results: dict) -> str:
    floor = results.get(NOISE)
    lines = ["| mode | mean \\|Δpixel\\| vs fp32 (0-255) | worst image | NudeNet total (Δ) | nude rate (Δ) | "
             "CLIP score (Δ) | verdict |", "|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(f"| {mode} | {r['pixel_mean']:.2f} | {r['pixel_worst_image']:.2f} | "
                     f"{r['nudenet_total']:.0f} ({r['d_nudenet_total']:+.0f}) | {r['nude_rate']:.3f} "
                     f"({r['d_nude_rate']:+.3f}) | {r['clip']:.2f} ({r['d_clip']:+.2f}) | "
                     f"{verdict(mode, r, floor)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-sd14", help="tiny | random-sd14 | hub id | local dir")
    ap.add_argument("--modes", default=",".join(MODES), help=f"of: {', '.join(MODES)} (fp32 is always run)")
    ap.add_argument("--prompts", default="i2p", choices=sorted(PROMPT_SETS))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--data-dir", default=None, help="prompt files (default $CPEBENCH_DATA, then the cache)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile-backend", default="inductor", help="eager: check the compile path quickly on a CPU")
    ap.add_argument("--clip", default="tiny", help="CLIP score model: tiny (random) | hub id | open_clip:ARCH")
    ap.add_argument("--out", help="keep the images here (default: a temporary folder)")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    chosen = {m for m in args.modes.split(",") if m}
    unknown = chosen - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    modes = [m for m in MODES if m in chosen | {REFERENCE}]
    if not args.device.startswith("cuda") and any(MODES[m][0].cuda_graphs for m in modes):
        print(f"skipping {[m for m in modes if MODES[m][0].cuda_graphs]}: CUDA graphs need a GPU", file=sys.stderr)
        modes = [m for m in modes if not MODES[m][0].cuda_graphs]
    if NOISE not in modes:
        print(f"no {NOISE}: no noise floor, so no verdicts", file=sys.stderr)

    import diffusers

    from cpebench.metrics.clip_score import ClipScore
    from cpebench.metrics.nudenet import NudeNet
    from cpebench.models import load_pipeline

    records, per_row = load_rows(args)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({torch.get_num_threads()} threads)"
    info = {"date": time.strftime("%Y-%m-%d"), "device": device_name, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "model": args.model, "steps": args.steps,
            "resolution": args.resolution, "rows": len(records), "prompts": args.prompts,
            "batch_size": args.batch_size, "clip": args.clip, "compile_backend": args.compile_backend,
            "seed_shift": SEED_SHIFT}
    print(" ".join(f"{k}={v}" for k, v in info.items()))

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        runs, loaded, key = {}, None, None
        for mode in modes:                      # 1. every mode's images, one pipeline per (dtype, vae dtype)
            if key != MODES[mode][0].weights:
                loaded = None
                free(args.device)
                key = MODES[mode][0].weights
                loaded = load_pipeline(args.model, dtype=key[0], vae_dtype=key[1], device=args.device)
            try:
                runs[mode] = generate(args, loaded.pipe, mode, records, per_row, out)
            except torch.OutOfMemoryError as e:
                print(f"{mode}: out of memory ({e})", file=sys.stderr)
                free(args.device)
                continue
            print(f"  {mode}: {runs[mode]['seconds']:.1f} s", file=sys.stderr)
        loaded = None
        free(args.device)

        nudenet, clip = NudeNet(providers="auto", batch_size=16), ClipScore(model=args.clip)
        if REFERENCE not in runs:
            sys.exit(f"fidelity: the {REFERENCE} reference was not generated")
        ref = score(out / REFERENCE, nudenet, clip)    # 2. metrics on every mode, differences to fp32 (by row id)
        ref_px = pixels(out / REFERENCE, ref["entries"])
        results = {}
        for mode, gen in runs.items():
            run = ref if mode == REFERENCE else score(out / mode, nudenet, clip)
            run_px = ref_px if mode == REFERENCE else pixels(out / mode, run["entries"])
            results[mode] = {**gen, **compare(ref, ref_px, run, run_px),
                             **{k: run[k] for k in ("nudenet_total", "nude_rate", "clip", "clip_se",
                                                    "nudenet_values")}}

    print()
    print(table(results))
    print(f"\nCLIP score per-image standard error: fp32 {ref['clip_se']:.2f}; paired Δ vs fp32: " +
          ", ".join(f"{m} {r['clip_diff_se']:.2f}" for m, r in results.items() if m != REFERENCE))
    print("Images whose NudeNet count changed vs fp32: " +
          ", ".join(f"{m} {r['images_nudenet_changed']}" for m, r in results.items() if m != REFERENCE))
    flagged = {m: r["flagged"] for m, r in results.items() if r["flagged"]}
    if flagged:
        print(f"Images flagged NaN/black: {flagged}")
    print(f"The noise floor is one pair of seed sets ({REFERENCE} vs {NOISE}, seeds +{SEED_SHIFT}): a rough estimate.")
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "modes": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
