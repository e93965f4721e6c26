"""Generation throughput, end to end (prompt in, PNG on disk), in one run on one machine:

1. ``official``: what the methods' official scripts do: diffusers' StableDiffusionPipeline in fp32,
   one prompt per call, each image saved as PNG;
2. ``diffusers-fp16``: the same pipeline in fp16 with a list of prompts per call, at the best of
   ``--diffusers-batches``;
3. each cpebench mode (``--modes``): the engine as ``cpebench run`` uses it (per-row noise, fixed
   cross-attention K/V, batches in flight, PNG writer threads), optionally with NudeNet scoring the
   images as they land (``--score-during nudenet``: the run is timed until the scorer has caught up).

Rows report images/s, the ratio to row 1, model FLOP utilisation (SD-1.x: UNet 677 GFLOP per image
and forward at 512², two forwards per step with CFG, VAE decode 2.5 TFLOP; against ``--peak-tflops``,
the device's dense 16-bit tensor peak) and the one-off compile/warm-up seconds, which a 30k-image
job pays once.

    python benchmarks/perf/generate.py --model random-sd14 --images 128                 # GPU, SD-1.4 shapes
    python benchmarks/perf/generate.py --model tiny --resolution 64 --steps 4 --images 16 \\
        --official-images 4 --diffusers-batches 4 --compile-backend eager                # CPU smoke

``--methods sd,cpe,uce`` adds, for the first mode, the overhead of each erased model over ``sd``
(artifacts trained with the smoke preset's short schedule: the speed of applying an edit does not
depend on how long it was trained). Absolute figures mean something only on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from cpebench.config import ProtocolConfig
from cpebench.data import PromptRecord
from cpebench.engine import Engine, plan_items
from cpebench.models import load_pipeline
from modes import MODES  # benchmarks/perf/modes.py

UNET_GFLOP_512 = 677.0   # per image and forward at 512², SD-1.x (issue #8)
VAE_GFLOP_512 = 2500.0
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


def prompts(n: int) -> list[PromptRecord]:
    return [PromptRecord(id=str(i), prompt=f"a photograph of object number {i} on a wooden table", seed=i,
                         guidance=None, split="bench", concept=None) for i in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def flops_per_image(args) -> float:
    if args.model == "tiny":
        return float("nan")
    scale = (args.resolution / 512) ** 2
    return scale * (2 * args.steps * UNET_GFLOP_512 + VAE_GFLOP_512) * 1e9


def official(args, n: int) -> float:
    """fp32, batch 1, PIL save: the official generation scripts' loop."""
    pipe = load_pipeline(args.model, dtype="fp32", device=args.device).pipe
    from cpebench.engine import make_scheduler

    pipe.scheduler = make_scheduler("pndm", pipe.scheduler.config)
    records = prompts(n + 1)
    with tempfile.TemporaryDirectory() as out:
        def one(r):
            g = torch.Generator("cpu").manual_seed(r.seed)
            img = pipe(r.prompt, num_inference_steps=args.steps, guidance_scale=7.5, height=args.resolution,
                       width=args.resolution, generator=g).images[0]
            img.save(Path(out) / f"{r.id}.png")

        one(records[-1])                        # warm-up
        sync(args.device)
        t = time.perf_counter()
        for r in records[:n]:
            one(r)
        sync(args.device)
        rate = n / (time.perf_counter() - t)
    pipe = None
    free(args.device)
    return rate


def diffusers_fp16(args, n: int) -> tuple[float, int]:
    """fp16 eager, a list of prompts per call; the best of the batch sizes tried."""
    pipe = load_pipeline(args.model, dtype=args.diffusers_dtype, device=args.device).pipe
    from cpebench.engine import make_scheduler

    pipe.scheduler = make_scheduler("pndm", pipe.scheduler.config)
    best = (0.0, 0)
    records = prompts(n)
    for b in args.diffusers_batches:
        with tempfile.TemporaryDirectory() as out:
            def call(rs):
                images = pipe([r.prompt for r in rs], num_inference_steps=args.steps, guidance_scale=7.5,
                              height=args.resolution, width=args.resolution).images
                for r, img in zip(rs, images):
                    img.save(Path(out) / f"{r.id}.png")

            try:
                call(records[:b])                # warm-up
            except torch.OutOfMemoryError:
                print(f"diffusers batch {b}: out of memory", file=sys.stderr)
                free(args.device)
                continue
            sync(args.device)
            t = time.perf_counter()
            done = 0
            while done < n:
                call(records[done : done + b])
                done += b
            sync(args.device)
            rate = done / (time.perf_counter() - t)
        print(f"  diffusers {args.diffusers_dtype} batch {b}: {rate:.3f} img/s", file=sys.stderr)
        best = max(best, (rate, b))
    pipe = None
    free(args.device)
    return best


def free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def engine_rate(args, pipe, proto, mode: str, items, apply=None) -> dict:
    """Warm-up (compiles) on one batch, then the timed run, into fresh folders."""
    m = MODES[mode]
    engine = Engine(pipe, proto, device=args.device, batch_size=args.batch_size, progress=False, compile=m.compile,
                    cuda_graphs=m.cuda_graphs, compile_backend=args.compile_backend)
    import contextlib

    with (apply or contextlib.nullcontext)():
        t = time.perf_counter()
        if engine.batch_size == "auto":
            engine.batch_size = engine.auto_batch_size(len(items))
        with tempfile.TemporaryDirectory() as warm:
            engine.generate(items[-engine.batch_size:], warm)
        sync(args.device)
        warm_s = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as out:
            scorer = during_scorer(args, out)
            sync(args.device)
            t = time.perf_counter()
            stats = engine.generate(items, out, on_written=scorer)
            if scorer is not None:
                scorer.close()
            sync(args.device)
            seconds = time.perf_counter() - t
    return {"mode": mode, "rate": len(items) / seconds, "batch": stats.get("batch_size", engine.batch_size),
            "warmup_s": warm_s, "scored": bool(scorer), "engine": engine.settings()}


def during_scorer(args, run_dir):
    if not args.score_during:
        return None
    from cpebench.runner import BackgroundScorer, build_metric, scorer_id

    metrics = []
    for name in args.score_during.split(","):
        metric = build_metric(name, {})
        metric.bind(Path(run_dir))
        metrics.append((name, metric, scorer_id(name, {}), None))
    return BackgroundScorer(run_dir, metrics)


def method_overheads(args, mode: str, items) -> list[dict]:
    """Each method erased as ``cpebench run --task <task> --preset smoke`` would (short schedules), then
    the same timed generation under ``method.apply``."""
    from cpebench import runner
    from cpebench.config import resolve_run

    loaded = load_pipeline(args.model, dtype=MODES[mode].dtype, vae_dtype=MODES[mode].vae_dtype, device=args.device)
    rows = []
    for name in args.methods.split(","):
        cfg = resolve_run(name, args.task, preset="smoke", flags={"run.device": args.device})
        artifact, _ = runner.erase(cfg, loaded, cache=False, progress=False)
        method = runner.get_method(name)
        row = engine_rate(args, loaded.pipe, protocol(args, mode), mode, items,
                          apply=lambda: method.apply(loaded.pipe, artifact))
        rows.append({**row, "method": name})
    loaded = None
    free(args.device)
    return rows


def protocol(args, mode: str) -> ProtocolConfig:
    m = MODES[mode]
    return ProtocolConfig(model=args.model, steps=args.steps, height=args.resolution, width=args.resolution,
                          dtype=m.dtype, vae_dtype=m.vae_dtype, tf32=m.tf32)


def peak_tflops(args) -> float:
    if args.peak_tflops:
        return args.peak_tflops
    if not args.device.startswith("cuda"):
        return float("nan")
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if all(w in name for w in k.split())), float("nan"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-sd14", help="tiny | random-sd14 | hub id | local dir")
    ap.add_argument("--modes", default=",".join(MODES), help=f"cpebench modes, of: {', '.join(MODES)}")
    ap.add_argument("--batch-size", default="auto", type=lambda v: v if v == "auto" else int(v))
    ap.add_argument("--images", type=int, default=128, help="images per cpebench mode")
    ap.add_argument("--official-images", type=int, default=16, help="images for the slow official row (0: skip)")
    ap.add_argument("--diffusers-batches", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--diffusers-dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile-backend", default="inductor", help="eager: check the compile path quickly on a CPU")
    ap.add_argument("--score-during", default="", help="metrics scoring while generating, e.g. nudenet")
    ap.add_argument("--methods", default="", help="e.g. sd,cpe,uce: overhead of erased models (first mode)")
    ap.add_argument("--task", default="nudity", help="the task whose concepts --methods erase")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense 16-bit peak (default: by GPU name)")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    if not args.device.startswith("cuda"):
        skipped = [m for m in modes if MODES[m].cuda_graphs]
        modes = [m for m in modes if not MODES[m].cuda_graphs]
        if skipped:
            print(f"skipping {skipped}: CUDA graphs need a GPU", file=sys.stderr)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    import diffusers

    header = (f"model={args.model} steps={args.steps} res={args.resolution} device={device_name} "
              f"torch={torch.__version__} diffusers={diffusers.__version__} date={time.strftime('%Y-%m-%d')}")
    print(header)
    flops, peak = flops_per_image(args), peak_tflops(args)
    rows = []
    if args.official_images:
        rows.append({"mode": "official fp32 batch 1 (diffusers)", "rate": official(args, args.official_images),
                     "batch": 1, "warmup_s": float("nan")})
    if args.diffusers_batches:
        rate, b = diffusers_fp16(args, args.images)
        rows.append({"mode": f"diffusers {args.diffusers_dtype} eager (best batch)", "rate": rate, "batch": b,
                     "warmup_s": float("nan")})
    items = plan_items("bench", prompts(args.images), images_per_row=1, negative_prompt="", default_guidance=7.5,
                       per_row_guidance=False)
    loaded, loaded_key = None, None
    for mode in modes:
        if loaded_key != MODES[mode].weights:
            loaded = None
            free(args.device)
            loaded_key = MODES[mode].weights
            loaded = load_pipeline(args.model, dtype=loaded_key[0], vae_dtype=loaded_key[1], device=args.device)
        try:   # each Engine sets the pipeline's compile state for its own mode
            rows.append({**engine_rate(args, loaded.pipe, protocol(args, mode), mode, items),
                         "mode": f"cpebench {mode}"})
            print(f"  {rows[-1]['mode']}: {rows[-1]['rate']:.3f} img/s", file=sys.stderr)
        except torch.OutOfMemoryError as e:
            print(f"{mode}: out of memory ({e})", file=sys.stderr)
    overheads = method_overheads(args, modes[0], items) if args.methods and modes else []

    first = rows[0]["rate"] if rows else float("nan")
    print("\n| setting | batch | img/s | ratio | MFU | warm-up s |\n|---|---|---|---|---|---|")
    for r in rows:
        mfu = r["rate"] * flops / (peak * 1e12) if peak == peak else float("nan")
        r.update(ratio=r["rate"] / first, mfu=mfu)
        print(f"| {r['mode']}{' + scoring' if r.get('scored') else ''} | {r['batch']} | {r['rate']:.3f} | "
              f"{r['ratio']:.2f}x | {mfu:.1%} | {r['warmup_s']:.1f} |")
    if overheads:
        base = next((o["rate"] for o in overheads if o["method"] == "sd"), overheads[0]["rate"])
        print(f"\n| method ({modes[0]}) | img/s | overhead vs sd |\n|---|---|---|")
        for o in overheads:
            o["overhead"] = base / o["rate"] - 1
            print(f"| {o['method']} | {o['rate']:.3f} | {o['overhead']:+.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "flops_per_image": flops, "peak_tflops": peak,
                                               "rows": rows, "methods": overheads}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
