"""Seconds to erase, per method and task: ``Method.erase`` with the task's concepts and the method's
per-task hyperparameters (benchmarks/methods/<method>.yaml), as ``cpebench run`` calls it.

    python benchmarks/perf/erase.py                                                          # tiny model, CPU
    python benchmarks/perf/erase.py --model random-sd14 --methods uce,rece,esd-x --tasks nudity   # SD-1.4 shapes
    python benchmarks/perf/erase.py --model CompVis/stable-diffusion-v1-4 --device cuda            # the real model

The methods' data files come from ``$CPEBENCH_DATA`` or are downloaded once (``cpebench data fetch``).

Methods are named as in ``cpebench ls methods``; names not registered (yet) are skipped with a message,
so the same command line works while other baselines are being added. Methods that train can be given
a short schedule with ``--preset smoke`` (its ``hparams:`` only; the task's full concept list is still
used unless ``--max-concepts``). Timings include everything ``erase`` does (text encoding, data files,
solves), not model loading; one untimed warm-up call per method runs first unless ``--no-warmup``.
The artifact cache is not used. Absolute figures mean something only on the hardware they name.

MACE's detail column is its artifact's ``stage_seconds`` (caches + stage 1, stage-2 training images,
stage-2 LoRAs, stage-3 fusion); its stage-2 settings can be set with ``--hparams``, e.g.

    python benchmarks/perf/erase.py --methods mace --tasks celebrity --device cuda --model random-sd14 \
        --hparams lora_concepts_per_step=8 lora_autocast=bf16

The comparison with a plain fp32 per-concept loop in the same run is benchmarks/perf/mace_train.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="uce,rece", help="comma-separated method names (e.g. uce,rece,esd-x,esd-u,cpe)")
    ap.add_argument("--tasks", default="nudity,artist,celebrity", help="comma-separated task names")
    ap.add_argument("--model", default="tiny", help="tiny | random-sd14 | hub id | local dir")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default=None, help="take the per-method hparams of this preset (e.g. smoke)")
    ap.add_argument("--max-concepts", type=int, default=None, help="first N concepts of each task")
    ap.add_argument("--repeat", type=int, default=1, help="timed calls per (method, task); the best is reported")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--data-dir", default=None, help="data files (default: $CPEBENCH_DATA, then the cache)")
    ap.add_argument("--hparams", nargs="*", default=[], metavar="KEY=VALUE",
                    help="hyperparameters for every method timed (e.g. MACE's lora_concepts_per_step=8)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)

    from cpebench import config, runner
    from cpebench.errors import CpebenchError
    from cpebench.methods import Concept, EraseContext
    from cpebench.models import load_pipeline
    from cpebench.registry import METHODS

    known = METHODS.names()
    methods = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if name not in known:
            print(f"skip {name}: not a registered method (known: {', '.join(known)})", file=sys.stderr)
            continue
        try:
            methods.append((name, METHODS.get(name)()))
        except CpebenchError as e:   # registered, but its module is not there (yet)
            print(f"skip {name}: {e}", file=sys.stderr)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not methods or not tasks:
        print("nothing to time", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    loaded = load_pipeline(args.model, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - t0
    pipe = loaded.pipe
    device_name = (torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda")
                   else f"cpu ({torch.get_num_threads()} threads)")
    text_dim = pipe.text_encoder.config.hidden_size
    print(f"model={args.model} (text dim {text_dim}, dtype {args.dtype}, loaded in {load_s:.1f} s) device={device_name} "
          f"torch={torch.__version__}" + (f" preset={args.preset}" if args.preset else ""))

    rows = []
    for name, method in methods:
        warm = args.no_warmup
        for task in tasks:
            try:
                cfg = config.resolve_run(name, task, preset=args.preset, overrides=[f"hparams.{kv}" for kv in args.hparams])
                cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, prompts="full", data_dir=args.data_dir))
                concepts = runner.task_concepts(cfg)[: args.max_concepts]
                hparams = cfg.hparams
            except CpebenchError as e:
                print(f"skip {name} on {task}: {e}", file=sys.stderr)
                continue
            if not concepts:
                print(f"skip {name} on {task}: the task names no concepts", file=sys.stderr)
                continue
            ctx = EraseContext(device=args.device, data_dir=args.data_dir, progress=False)
            cs = [Concept(c) for c in concepts]
            try:
                if not warm:   # kernels, tokenizer caches, data-file checksums
                    method.erase(pipe, cs[:1], hparams, ctx)
                    warm = True
                best, artifact = float("inf"), None
                for _ in range(max(1, args.repeat)):
                    sync(args.device)
                    t = time.perf_counter()
                    result = method.erase(pipe, cs, hparams, ctx)
                    sync(args.device)
                    elapsed = time.perf_counter() - t
                    if elapsed < best:   # report the details of the fastest call
                        best, artifact = elapsed, result
            except CpebenchError as e:
                print(f"skip {name} on {task}: {e}", file=sys.stderr)
                continue
            meta = artifact.metadata
            detail = ""
            if "rece" in meta:
                epochs = meta["rece"]["epochs"]
                detail = (f"UCE stage {meta['uce']['seconds']:.2f} s; {len(epochs)} epoch(s) "
                          f"{sum(e['seconds'] for e in epochs):.2f} s")
            elif "mace" in meta:
                detail = "; ".join(f"{k} {v:.2f} s" for k, v in meta["stage_seconds"].items())
            elif "uce" in meta:
                detail = f"{meta['uce']['erase_rows']} erase rows, {meta['uce']['preserve']['count']} preserve texts"
            n_tensors = len(artifact.tensors)
            mb = sum(t.numel() * t.element_size() for t in artifact.tensors.values()) / 2**20
            rows.append((name, task, len(concepts), best, n_tensors, mb, detail))
            print(f"  {name:8s} {task:10s} {len(concepts):4d} concepts  {best:8.2f} s", file=sys.stderr)

    print(f"{'method':<8} {'task':<10} {'concepts':>8} {'seconds':>9} {'tensors':>8} {'MiB':>8}  detail")
    for name, task, n, s, nt, mb, detail in rows:
        print(f"{name:<8} {task:<10} {n:>8d} {s:>9.2f} {nt:>8d} {mb:>8.1f}  {detail}")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device_name, "rows": [
                {"method": r[0], "task": r[1], "concepts": r[2], "seconds": r[3], "tensors": r[4], "mib": r[5],
                 "detail": r[6]} for r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
