"""One command checks a lent GPU: every CUDA-only path once, then the README's figures, in 8 minutes.

    python benchmarks/perf/gpu_check.py --out $OUT                    # GPU: random-sd14, 512², budget 480 s
    python benchmarks/perf/gpu_check.py --device cpu --model tiny     # CPU: the checks that have a CPU path

(a) Fidelity of the CUDA-only paths, on ``--rows`` prompt rows (one image each, their own seeds), each
    against fp32 eager (contiguous layout, batch ``--batch-size``) on the same rows: mean |Δpixel|
    (0-255) over all images, the worst image's mean, and the largest single difference. The bound is
    measured in the same run, never a constant: ``--margin`` times the distance from fp32 of the eager
    run in the path's own precision (fp16 eager for fp16 paths; fp32 at half the batch size for fp32
    paths, whose only expected change is rounding; fp16 eager for TF32, which rounds matmul inputs to
    fp16's 10-bit mantissa), and at least one 8-bit level on one value (what any rounding change costs).
(b) The README's figures with short budgets: generation (official fp32 batch 1, diffusers fp16 at its
    best batch, cpebench modes; img/s, ratio, MFU), CPE/ESD/MACE training, scoring rates per metric.
(c) One JSON (``--json``, default ``OUT/gpu_check.json``) and one Markdown file (``--md``), rewritten
    after every check so that a run killed at the device's limit keeps what it measured.

A check starts only while its budget is left of ``--total-budget``; one that outruns its own budget is
marked ``over budget`` (its verdict stands). Without CUDA and without ``--device cpu`` it prints one
line and exits 0; with failures it exits 1. ``--model tiny`` picks small sizes (64², 4 steps, 4 rows)
so that every CPU path runs in about a minute (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fidelity          # benchmarks/perf/*.py: run as a script (or with that folder on sys.path)
from generate import prompts, protocol
from modes import MODES

NO_CUDA = "no CUDA device: skipped"


@dataclass(frozen=True)
class Check:
    name: str
    exercises: str
    budget_s: int
    cuda_only: str | None = None      # why it cannot run without CUDA; None: it has a CPU path


# The default plan, most telling first. Budgets are GPU seconds (one H200/H100, random-sd14), estimated
# before the first GPU run: adjust them from the JSON's seconds once one has run.
PLAN = [
    Check("references", "fp32 eager at two batch sizes and fp16 eager, contiguous: the images and bounds below", 60),
    Check("pinned-async", "pinned host buffers, non-blocking device-to-host copies, batches in flight "
                          "(Engine.generate vs one batch at a time)", 10),
    Check("tf32", "protocol.tf32: TF32 matmul and cuDNN flags (fp32)", 10, "TF32 is a CUDA setting"),
    Check("channels-last", "run.channels_last on (fp16)", 10),
    Check("auto-batch", "--batch-size auto: the CUDA memory probe, then one batch of its size (fp16)", 25,
          "the memory probe reads CUDA memory (a CPU gets batch 4)"),
    Check("nudenet", "NudeNet providers auto (onnxruntime-gpu's CUDA provider) vs the CPU provider", 15),
    Check("shard", "torchrun, 2 processes: NCCL group (gloo on a CPU or one GPU), shards, barrier, merged manifest", 40),
    Check("fp16-regional", "compile regional, inductor (fp16, channels_last auto)", 60),
    Check("fp16-regional-cudagraphs", "compile regional + CUDA graphs (fp16)", 60, "CUDA graphs need a GPU"),
    Check("generation", "the README's generation table: official, diffusers fp16, cpebench modes", 70),
    Check("train-cpe", "CPE trainer vs the per-concept baseline (SD-1.4 shapes)", 25),
    Check("train-esd", "ESD trainer vs the paper loop", 40),
    Check("train-mace", "MACE stage 2 vs the official per-concept loop", 40),
    Check("scoring", "images/s of each metric (stand-in models)", 15),
]
OPTIONAL = [   # not in the default plan (a full-UNet compile takes minutes); name them in --checks
    Check("fp16-full", "compile full UNet, inductor (fp16)", 150),
    Check("bf16-regional", "compile regional, inductor (bf16)", 60),
]
# The second-wave methods' cost goals (issue 16) and the attack's (issue 17): a second plan of its own,
# `--checks wave2` (WAVE2 below), run after the default one when a device's time allows.
WAVE2 = [
    Check("train-fmn", "perf/fmn_train.py: official TI + re-steering loop vs cpebench (goal: one concept <= 1 min)", 60),
    Check("train-ac", "perf/ac_train.py: official anchors + training vs cpebench (goal: one concept <= 5 min)", 60),
    Check("train-spm", "perf/spm_train.py: official loop vs cpebench fp32/batched/autocast (goal: <= 5 min)", 60),
    Check("train-ace", "perf/ace_train.py: plain per-concept loop vs cpebench (goal: seconds per concept)", 60),
    Check("train-advunlearn", "perf/advunlearn_train.py: official loop vs cpebench (goal: >= 2x)", 60),
    Check("erase-closed-form", "perf/erase.py: SPEED and GLoCE on the celebrity task's 50 concepts "
                               "(goals: SPEED 100 concepts <= 10 s, GLoCE 50 <= 2 min)", 60),
    Check("safree-overhead", "perf/generate.py --methods sd,safree: generation with SAFREE vs without "
                             "(goal: <= 10 % overhead)", 40),
    Check("attack", "perf/attack.py: UnlearnDiffAtk batched vs one prompt per process (goal: 142 prompts "
                    "<= 30 min)", 60),
]
CHECKS = {c.name: c for c in PLAN + OPTIONAL + WAVE2}
MODE_CHECKS = ("fp16-regional", "fp16-regional-cudagraphs", "fp16-full", "bf16-regional")   # names of MODES
TOTAL_BUDGET_S = 480
MARGIN = 2.0

# Sizes by model: the SD-1.4 shapes a GPU run measures, and the tiny model's for a CPU (the test suite).
SIZES = {
    "full": dict(resolution=512, steps=10, rows=16, batch_size=8, gen_steps=50, gen_images=32, official_images=4,
                 diffusers_batches=[8, 16], gen_modes="fp16,fp16-regional-cudagraphs", train_steps=10,
                 cpe_concepts=50, esd_ddim_steps=50, mace_concepts=2, score_images=64, score_size=512),
    "tiny": dict(resolution=64, steps=4, rows=4, batch_size=2, gen_steps=4, gen_images=4, official_images=1,
                 diffusers_batches=[2], gen_modes="fp32,fp16-regional", train_steps=2, cpe_concepts=4,
                 esd_ddim_steps=4, mace_concepts=2, score_images=2, score_size=64),
}

COLUMNS = {   # the Markdown tables (fixed by tests/test_gpu_check.py)
    "checks": ["check", "exercises", "status", "s (budget)", "Δpixel vs fp32: mean / worst image / max", "bound",
               "notes"],
    "generation": ["setting", "batch", "img/s", "ratio", "MFU", "warm-up s"],
    "training": ["method", "run", "figure", "unit", "speed-up", "result diff", "diff of"],
    "scoring": ["metric", "img/s", "ratio"],
}
STATS = ("pixel_mean", "pixel_worst_image", "pixel_max")


class Skip(Exception):
    """The check cannot run here (the reason says why)."""


@dataclass(frozen=True)
class Setting:
    """What the images are made with (field names as generate.protocol reads them)."""

    model: str
    device: str
    steps: int
    resolution: int
    rows: int
    batch_size: int


@dataclass
class Run:
    dir: Path
    pixels: dict                 # row id -> int16 [H,W,3]
    engine: object
    seconds: float
    flagged: int


@dataclass
class Noise:
    what: str                    # the run whose distance from fp32 eager bounds a precision's paths
    run: Run
    diff: dict                   # that distance: fidelity.pixel_differences


@dataclass
class Outcome:
    status: str                  # pass | fail | skipped | error
    reason: str = ""
    numbers: dict = field(default_factory=dict)


class Session:
    def __init__(self, args, work: Path, report: dict):
        self.args, self.work, self.report = args, work, report
        self.main = Setting(args.model, args.device, args.steps, args.resolution, args.rows, args.batch_size)
        self.pipes: dict = {}
        self.references: dict[Setting, tuple[Run, dict[str, Noise]]] = {}   # -> (fp32 eager, noise by precision)

    @property
    def cuda(self) -> bool:
        return self.main.device.startswith("cuda")

    def pipe(self, s: Setting, mode: str):
        from cpebench.models import load_pipeline

        key = (s.model, s.device, MODES[mode].weights)
        if key not in self.pipes:
            self.pipes[key] = load_pipeline(s.model, dtype=MODES[mode].dtype, vae_dtype=MODES[mode].vae_dtype,
                                            device=s.device).pipe
        return self.pipes[key]

    def generate(self, s: Setting, name: str, mode: str, *, batch: int | str | None = None, rows: int | None = None,
                 channels_last: str = "off") -> Run:
        """``mode``'s images of the setting's rows, through Engine.generate into a fresh folder."""
        from cpebench.engine import Engine, read_manifest

        m = MODES[mode]
        engine = Engine(self.pipe(s, mode), protocol(s, mode), device=s.device, batch_size=batch or s.batch_size,
                        progress=False, compile=m.compile, cuda_graphs=m.cuda_graphs, channels_last=channels_last,
                        compile_backend=self.args.compile_backend)
        out = self.work / f"{name}-{len(list(self.work.iterdir()))}"
        t = time.perf_counter()
        stats = engine.generate(work_items(rows or s.rows), out, resume=False)
        seconds = time.perf_counter() - t
        return Run(out, fidelity.pixels(out, read_manifest(out)), engine, seconds, stats["flagged"])

    def reference(self, s: Setting) -> tuple[Run, dict[str, Noise]]:
        """fp32 eager images of the setting and the noise of each precision (see judge), measured once."""
        if s not in self.references:
            ref = self.generate(s, "fp32", "fp32")
            other = s.batch_size // 2 or 2
            runs = {"fp32": (f"fp32 eager at batch {other}", self.generate(s, "fp32-other", "fp32", batch=other))}
            for dtype in reduced_precisions(self.args.checks):
                runs[dtype] = (f"{dtype} eager", self.generate(s, dtype, dtype))
            self.references[s] = (ref, {k: Noise(what, run, fidelity.pixel_differences(ref.pixels, run.pixels))
                                        for k, (what, run) in runs.items()})
        return self.references[s]


def work_items(n: int):
    from cpebench.engine import plan_items

    return plan_items("bench", prompts(n), images_per_row=1, negative_prompt="", default_guidance=7.5,
                      per_row_guidance=False)


def reduced_precisions(checks: list[str]) -> list[str]:
    """The eager runs the chosen checks are bounded by (fp16 also bounds TF32 and channels_last)."""
    wanted = {MODES[c].dtype for c in checks if c in MODE_CHECKS} | {"fp16"}
    return [d for d in ("fp16", "bf16") if d in wanted]


# --------------------------------------------------------------------------- judging


def judge(ref: Run, run: Run, noise: Noise, margin: float) -> Outcome:
    """Pass when each |Δpixel| statistic vs fp32 is within ``margin`` × the noise run's, floored at one
    8-bit level on one value (a rounding change can cost no less); flagged (NaN/black) images fail."""
    diff = fidelity.pixel_differences(ref.pixels, run.pixels)
    values = next(iter(ref.pixels.values())).size
    floor = {"pixel_mean": 1 / (values * len(ref.pixels)), "pixel_worst_image": 1 / values, "pixel_max": 1}
    bound = {k: margin * max(noise.diff[k], floor[k]) for k in STATS}
    numbers = {**diff, "bound": bound, "bound_from": f"{margin:g} x ({noise.what} vs fp32)", "noise": noise.diff,
               "flagged": run.flagged, "seconds_generate": run.seconds}
    over = [k.removeprefix("pixel_") for k in STATS if diff[k] > bound[k]]
    if run.flagged:
        return Outcome("fail", f"{run.flagged} images NaN/black", numbers)
    if over:
        return Outcome("fail", "outside the bound: " + ", ".join(over), numbers)
    return Outcome("pass", "", numbers)


def reference_of(ctx: Session) -> tuple[Run, dict[str, Noise]]:
    if ctx.main not in ctx.references:
        raise Skip("needs the references check")
    return ctx.references[ctx.main]


# --------------------------------------------------------------------------- (a) the CUDA-only paths


def check_references(ctx: Session) -> Outcome:
    ref, noise = ctx.reference(ctx.main)
    numbers = {"fp32_seconds": ref.seconds, "flagged": ref.flagged,
               "noise": {k: {"run": n.what, **n.diff} for k, n in noise.items()}}
    flagged = {k: n.run.flagged for k, n in noise.items() if n.run.flagged}
    if ref.flagged or flagged:
        return Outcome("fail", f"NaN/black images: fp32 {ref.flagged}, {flagged}", numbers)
    note = "; ".join(f"{n.what}: mean {n.diff['pixel_mean']:.3g}, max {n.diff['pixel_max']}" for n in noise.values())
    return Outcome("pass", note, numbers)


def check_pinned_async(ctx: Session) -> Outcome:
    """The reference's images again, one batch at a time with nothing in flight (Engine.denoise): a
    pinned buffer read before its copy landed, or overwritten, would show here."""
    ref, noise = reference_of(ctx)
    items = work_items(ctx.main.rows)
    b = ref.engine.batch_size
    alone = {}
    for i in range(0, len(items), b):
        arrays, _, _ = ref.engine.denoise(items[i : i + b])
        alone.update({it.record.id: a.astype("int16") for it, a in zip(items[i : i + b], arrays)})
    out = judge(ref, Run(ref.dir, alone, ref.engine, 0.0, 0), noise["fp32"], ctx.args.margin)
    out.numbers["batches"] = math.ceil(len(items) / b)
    return out


def check_tf32(ctx: Session) -> Outcome:
    from cpebench.engine import set_tf32

    ref, noise = reference_of(ctx)
    try:
        run = ctx.generate(ctx.main, "tf32", "tf32")
        flags = {"matmul": torch.backends.cuda.matmul.fp32_precision, "cudnn": torch.backends.cudnn.conv.fp32_precision}
    finally:
        set_tf32(False)      # the fp32 engines made before (pinned-async's) compute in strict fp32
    out = judge(ref, run, noise["fp16"], ctx.args.margin)
    out.numbers["flags"] = flags
    if out.status == "pass" and out.numbers["pixel_max"] == 0:
        return Outcome("fail", "TF32 changed no pixel: the flags had no effect", out.numbers)
    return out


def check_channels_last(ctx: Session) -> Outcome:
    ref, noise = reference_of(ctx)
    return judge(ref, ctx.generate(ctx.main, "channels-last", "fp16", channels_last="on"), noise["fp16"],
                 ctx.args.margin)


def check_mode(ctx: Session, mode: str) -> Outcome:
    """A compiled mode as a run uses it (channels_last auto), bounded by its precision's eager run."""
    ref, noise = reference_of(ctx)
    run = ctx.generate(ctx.main, mode, mode, channels_last="auto")
    out = judge(ref, run, noise[MODES[mode].dtype], ctx.args.margin)
    out.numbers["engine"] = run.engine.settings()
    return out


def check_auto_batch(ctx: Session) -> Outcome:
    """The probe's batch must fit: one batch of that size, its peak memory below the free memory."""
    free, total = torch.cuda.mem_get_info()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    limit = 64    # Engine.auto_batch_size's limit: as many images as it may choose
    run = ctx.generate(ctx.main, "auto-batch", "fp16", batch="auto", rows=limit, channels_last="auto")
    peak = torch.cuda.max_memory_allocated() - base
    gib = 2 ** 30
    numbers = {"batch": run.engine.batch_size, "free_gib": free / gib, "total_gib": total / gib,
               "peak_gib": peak / gib, "seconds_generate": run.seconds}
    note = f"batch {run.engine.batch_size} of at most {limit}; peak {peak / gib:.1f} GiB of {free / gib:.1f} GiB free"
    return Outcome("pass" if peak <= free else "fail", note, numbers)


def check_nudenet(ctx: Session) -> Outcome:
    """The same reference images through providers auto and the CPU provider: the counted detections
    (what the metric reports) must be equal; on CUDA the session must really run on the GPU."""
    import onnxruntime

    from cpebench.engine import read_manifest
    from cpebench.metrics import GeneratedImage
    from cpebench.metrics.nudenet import NudeNet

    ref, _ = reference_of(ctx)
    if ctx.cuda and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise Skip("onnxruntime has no CUDA provider (onnxruntime-gpu is not installed)")
    images = [GeneratedImage(ref.dir / e["file"], e) for e in read_manifest(ref.dir).values()]
    auto, cpu = NudeNet(providers="auto"), NudeNet(providers=["CPUExecutionProvider"])
    active = auto.session.get_providers()
    auto.score(images[:1])                        # warm-up: session start, kernels
    t = time.perf_counter()
    fast = auto.score(images)
    rate = len(images) / (time.perf_counter() - t)
    slow = cpu.score(images)
    differ = sum(sorted(auto.counted(a)) != sorted(cpu.counted(c)) for a, c in zip(fast, slow))
    numbers = {"providers": active, "images": len(images), "img_per_s": rate, "images_differing": differ,
               "detections": sum(len(d["detections"]) for d in fast),
               "counted": sum(len(auto.counted(d)) for d in fast)}
    note = f"{', '.join(active)}; {rate:.1f} img/s; {numbers['counted']} counted detections"
    if ctx.cuda and "CUDAExecutionProvider" not in active:
        return Outcome("fail", f"the session fell back to {active}", numbers)
    if differ:
        return Outcome("fail", f"{differ} images differ from the CPU provider; {note}", numbers)
    return Outcome("pass", note, numbers)


def check_shard(ctx: Session) -> Outcome:
    """Two processes (torchrun) generate the reference's rows as shards; the merged run must list every
    image once, in order, each within the fp32 bound of the single-process image. NCCL needs two GPUs
    (it refuses two ranks on one device): with fewer, gloo on the CPU with the tiny model."""
    gpus = torch.cuda.device_count() if ctx.cuda else 0
    nccl = gpus >= 2
    setting = ctx.main if nccl or not ctx.cuda else Setting("tiny", "cpu", **{
        k: SIZES["tiny"][k] for k in ("steps", "resolution", "rows", "batch_size")})
    if setting.rows < 2 * setting.batch_size:
        raise Skip(f"needs --rows >= 2 x --batch-size ({setting.batch_size}) to give each process a batch")
    ref, noise = reference_of(ctx) if setting == ctx.main else ctx.reference(setting)
    out_dir = ctx.work / "shard"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}   # the reference's threads: same rounding
    if not setting.device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--shard-worker", str(out_dir), "--model", setting.model, "--steps", str(setting.steps),
           "--resolution", str(setting.resolution), "--rows", str(setting.rows), "--batch-size", str(setting.batch_size)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(120, 3 * CHECKS["shard"].budget_s))
    if done.returncode != 0:
        return Outcome("error", "torchrun failed: " + done.stderr.strip()[-600:])
    from cpebench.engine import read_manifest

    entries = read_manifest(out_dir)
    info = json.loads((out_dir / "shard.json").read_text())
    keys_ok = list(entries) == [it.key for it in work_items(setting.rows)]
    out = judge(ref, Run(out_dir, fidelity.pixels(out_dir, entries), None, 0.0, 0), noise["fp32"], ctx.args.margin)
    out.numbers.update(info, nccl="ran" if nccl else f"skipped ({gpus} GPU)", model=setting.model)
    if not keys_ok:
        return Outcome("fail", "the merged manifest does not list every image once, in order", out.numbers)
    if out.status == "pass":
        out.reason = f"{info['backend']}, {info['world']} processes on {info['device']}; nccl: {out.numbers['nccl']}"
    return out


def shard_worker(args) -> int:
    """One torchrun process of the shard check (--shard-worker DIR)."""
    import torch.distributed as dist

    from cpebench.engine import Engine, barrier, distributed_shard, merge_manifests
    from cpebench.models import load_pipeline

    (index, count), device = distributed_shard()
    device = device or "cpu"
    s = Setting(args.model, device, args.steps, args.resolution, args.rows, args.batch_size)
    pipe = load_pipeline(s.model, device=device).pipe
    engine = Engine(pipe, protocol(s, "fp32"), device=device, batch_size=s.batch_size, progress=False,
                    channels_last="off")
    items = work_items(s.rows)
    engine.generate(items, args.shard_worker, shard=(index, count), resume=False)
    barrier()
    if index == 0:
        merge_manifests(Path(args.shard_worker), items)
        info = {"backend": dist.get_backend() if dist.is_initialized() else None, "world": count, "device": device}
        (Path(args.shard_worker) / "shard.json").write_text(json.dumps(info))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------- (b) the README's figures


def run_script(ctx: Session, module, argv: list[str]) -> dict:
    """A perf script's main(argv) in this process, its figures read back from its --json."""
    path = ctx.work / f"{module.__name__}.json"
    try:
        module.main([*argv, "--json", str(path)])
    except SystemExit as e:       # argparse or the script's own exit
        if e.code not in (None, 0):
            raise RuntimeError(f"{module.__name__}.py exited: {e.code}") from None
    return json.loads(path.read_text())


def check_generation(ctx: Session) -> Outcome:
    import generate

    a, s = ctx.args, ctx.main
    figures = run_script(ctx, generate, [
        "--model", s.model, "--device", s.device, "--steps", str(a.gen_steps), "--resolution", str(s.resolution),
        "--images", str(a.gen_images), "--official-images", str(a.official_images), "--diffusers-batches",
        *map(str, a.diffusers_batches), "--modes", a.gen_modes, "--batch-size", str(s.batch_size),
        "--compile-backend", a.compile_backend])
    ctx.report["generation"] = [{k: r.get(k) for k in ("mode", "batch", "rate", "ratio", "mfu", "warmup_s")}
                                 for r in figures["rows"]]
    return Outcome("pass", f"{len(figures['rows'])} rows at {a.gen_steps} steps",
                   {"flops_per_image": figures["flops_per_image"], "peak_tflops": figures["peak_tflops"]})


def check_train_cpe(ctx: Session) -> Outcome:
    import cpe_train

    a = ctx.args
    figures = run_script(ctx, cpe_train, ["--model", "tiny" if a.model == "tiny" else "sd14", "--device", a.device,
                                          "--concepts", str(a.cpe_concepts), "--steps", str(a.train_steps)])
    for r in figures["rows"]:
        ctx.report["training"].append({
            "method": "cpe", "run": r["run"], "figure": r["s_per_concept"], "unit": "s/concept (celebrity schedule)",
            "speedup": r["ratio"], "diff": figures["gram_vs_direct"] if r["run"].startswith("cpebench") else None,
            "diff_of": "gram vs direct losses, max rel."})
    return Outcome("pass", f"{a.cpe_concepts} concepts per step, {a.train_steps} timed steps")


def check_train_esd(ctx: Session) -> Outcome:
    import esd_train

    a = ctx.args
    figures = run_script(ctx, esd_train, ["--model", a.model, "--device", a.device, "--steps", str(a.train_steps),
                                          "--ddim-steps", str(a.esd_ddim_steps), "--runs", "paper,fp32,fast"])
    for r in figures["results"].values():
        ctx.report["training"].append({
            "method": "esd-x", "run": r["setting"], "figure": r["s_per_1000"], "unit": "s/1000 steps",
            "speedup": r["speedup"], "diff": r["eps_diff"], "diff_of": "ε vs the paper loop, rel."})
    return Outcome("pass", f"{a.train_steps} steps per run")


def check_train_mace(ctx: Session) -> Outcome:
    import mace_train

    a = ctx.args
    argv = ["--model", a.model, "--device", a.device, "--concepts", str(a.mace_concepts), "--steps",
            str(a.train_steps), "--runs", "reference,fp32,batched,batched+autocast"]
    if a.data_dir:
        argv += ["--data-dir", a.data_dir]
    elif a.model != "tiny":      # no data files on a bare GPU machine: the smoke stand-in lists, 512² images
        argv += ["--preset", "smoke", "--set", f"resolution={a.resolution}"]
    figures = run_script(ctx, mace_train, argv)
    for r in figures["rows"]:
        ctx.report["training"].append({
            "method": "mace", "run": r["run"], "figure": r["s_per_concept"], "unit": "s/concept (stage 2)",
            "speedup": r["speedup"], "diff": r["dw_rel_diff"], "diff_of": "ΔW vs the reference loop, rel."})
    return Outcome("pass", f"{figures['concepts']} concepts x {a.train_steps} steps"
                   + ("" if a.data_dir or a.model == "tiny" else ", smoke preset lists"))


@dataclass(frozen=True)
class TrainingScript:
    """A perf/*_train.py script a check runs: its arguments by model, and which of its row fields fill the
    Training table."""

    module: str
    method: str
    tiny: tuple
    full: tuple
    figure: str
    unit: str
    diff: str | None        # the row field with the result difference (None: the runs' draws differ)
    diff_of: str


TRAINING_SCRIPTS = {
    "train-fmn": TrainingScript(
        "fmn_train", "fmn", ("--ti-steps", "3", "--steps", "3", "--n-images", "2", "--data-steps", "4"),
        ("--ti-steps", "20", "--steps", "10", "--n-images", "4", "--data-steps", "10"),
        "s_per_concept_official_schedule", "s/concept (500 TI + 35 steps)", "result_diff",
        "weights vs the official loop, rel."),
    "train-ac": TrainingScript(
        "ac_train", "ac", ("--anchors", "4", "--anchor-steps", "2", "--steps", "2", "--no-same-anchors-check"),
        ("--anchors", "20", "--anchor-steps", "50", "--steps", "10", "--no-same-anchors-check"),
        "paper_concept_seconds_est", "s/concept (1000 anchors + 100 steps, est.)", "result_diff",
        "K/V vs the official loop, rel."),
    "train-spm": TrainingScript(
        "spm_train", "spm", ("--iterations", "2", "--runs", "reference,fp32"),
        ("--iterations", "4", "--runs", "reference,fp32,batched,batched+autocast", "--autocast", "bf16"),
        "s_per_concept_3000", "s/concept (3000 iterations)", "dw_rel_diff", "ΔW vs the official loop, rel."),
    "train-advunlearn": TrainingScript(
        "advunlearn_train", "advunlearn", ("--iterations", "2", "--warmup", "1", "--attack-step", "2", "--ddim-steps", "4"),
        ("--iterations", "4", "--warmup", "1", "--attack-step", "30", "--autocast", "bf16"),
        "s_per_iteration", "s/iteration", None, "unseeded official draws: time only"),
    "train-ace": TrainingScript(
        "ace_train", "ace", ("--steps", "3"),
        ("--preset", "smoke", "--resolution", "512", "--images", "2", "--data-steps", "10", "--stats-timesteps", "4",
         "--steps", "20"),
        "s_per_concept", "s/concept", "gate_rel_diff", "gates vs the plain loop, rel."),
}


def check_training_script(ctx: Session, name: str) -> Outcome:
    import importlib

    spec, a = TRAINING_SCRIPTS[name], ctx.args
    figures = run_script(ctx, importlib.import_module(spec.module),
                         ["--model", a.model, "--device", a.device, *(spec.tiny if a.model == "tiny" else spec.full)])
    for r in figures["rows"]:
        ctx.report["training"].append({"method": spec.method, "run": r["run"], "figure": r.get(spec.figure),
                                       "unit": spec.unit, "speedup": r.get("speedup"), "diff": r.get(spec.diff),
                                       "diff_of": spec.diff_of})
    return Outcome("pass", f"runs {', '.join(r['run'] for r in figures['rows'])}")


def check_erase_closed_form(ctx: Session) -> Outcome:
    import erase

    a = ctx.args
    # without data files: the celebrity task's 50 inline names and the smoke preset's inline retain/anchor lists;
    # with --data-dir also the artist task's 100 artists (SPEED's goal) and the real lists
    argv = ["--model", a.model, "--device", a.device, "--methods", "speed,gloce",
            "--tasks", "celebrity,artist" if a.data_dir else "celebrity"]
    argv += ["--data-dir", a.data_dir] if a.data_dir else ["--preset", "smoke"]
    if a.model == "tiny":
        argv += ["--max-concepts", "4"]
    figures = run_script(ctx, erase, argv)
    for r in figures["rows"]:
        ctx.report["training"].append({"method": r["method"], "run": f"cpebench, {r['task']}", "figure": r["seconds"],
                                       "unit": f"s to erase {r['concepts']} concepts", "speedup": None, "diff": None,
                                       "diff_of": "" if a.data_dir else "smoke retain/anchor lists"})
    return Outcome("pass", ", ".join(f"{r['method']} {r['seconds']:.2f} s" for r in figures["rows"]))


def check_safree_overhead(ctx: Session) -> Outcome:
    import generate

    a, s = ctx.args, ctx.main
    figures = run_script(ctx, generate, [
        "--model", s.model, "--device", s.device, "--steps", str(a.gen_steps), "--resolution", str(s.resolution),
        "--images", str(a.gen_images), "--official-images", "0", "--diffusers-batches", "--modes", "fp16" if ctx.cuda else "fp32",
        "--batch-size", str(s.batch_size), "--methods", "sd,safree", "--compile-backend", a.compile_backend])
    rates = {r["method"]: r["rate"] for r in figures["methods"]}
    overhead = rates["sd"] / rates["safree"] - 1
    return Outcome("pass", f"SAFREE generation overhead {overhead:+.1%} (goal <= 10 %)",
                   {"img_per_s": rates, "overhead": overhead})


def check_attack(ctx: Session) -> Outcome:
    import attack

    a, small = ctx.args, ctx.args.model == "tiny"
    figures = run_script(ctx, attack, ["--model", a.model, "--device", a.device,
                                       *(["--prompts", "2", "--blocks", "1", "--iterations", "2", "--eval-steps", "4"]
                                         if small else ["--prompts", "8", "--blocks", "2"])])
    for r in figures["rows"]:
        ctx.report["training"].append({"method": "unlearndiffatk", "run": r["run"], "figure": r["prompts_per_min"],
                                       "unit": "prompts/min (of the blocks run)", "speedup": r["speedup"], "diff": None,
                                       "diff_of": ""})
    rate = next(r["prompts_per_min"] for r in figures["rows"] if r["run"] == "batched")
    blocks = figures["args"]["blocks"]
    return Outcome("pass", f"batched: 142 prompts x 50 blocks ≈ {142 / rate * 50 / blocks:.0f} min at this rate, "
                           f"{figures['args']['iterations']} steps per block (no early stop; goal <= 30 min)")


def check_scoring(ctx: Session) -> Outcome:
    import score

    a = ctx.args
    figures = run_script(ctx, score, ["--images", str(a.score_images), "--size", str(a.score_size),
                                      "--device", a.device])
    ctx.report["scoring"] = figures["rows"]
    return Outcome("pass", f"{a.score_images} images {a.score_size}², stand-in models")


RUNNERS = {
    "references": check_references, "pinned-async": check_pinned_async, "tf32": check_tf32,
    "channels-last": check_channels_last, "auto-batch": check_auto_batch, "nudenet": check_nudenet,
    "shard": check_shard, "generation": check_generation, "train-cpe": check_train_cpe,
    "train-esd": check_train_esd, "train-mace": check_train_mace, "scoring": check_scoring,
    **{m: (lambda ctx, m=m: check_mode(ctx, m)) for m in MODE_CHECKS},
    **{n: (lambda ctx, n=n: check_training_script(ctx, n)) for n in TRAINING_SCRIPTS},
    "erase-closed-form": check_erase_closed_form, "safree-overhead": check_safree_overhead, "attack": check_attack,
}


# --------------------------------------------------------------------------- output


def meta(args) -> dict:
    import diffusers

    from cpebench import provenance

    cuda = args.device.startswith("cuda")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name() if cuda
        else f"CPU ({torch.get_num_threads()} threads)", "torch": torch.__version__, "cuda": torch.version.cuda,
        "driver": driver_version() if cuda else None, "git": provenance.git_state(),
        "diffusers": diffusers.__version__, "onnxruntime": provenance.package_versions()["onnxruntime"],
        "model": args.model, "resolution": args.resolution, "steps": args.steps, "rows": args.rows,
        "batch_size": args.batch_size, "margin": args.margin, "compile_backend": args.compile_backend,
        "total_budget_s": args.total_budget, "plan": [{"name": n, "budget_s": CHECKS[n].budget_s} for n in args.checks],
    }


def driver_version() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def finite(x):
    """JSON has no NaN: None instead."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def fmt(x, spec: str = ".3g") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def table(columns: list[str], rows: list[list]) -> list[str]:
    cells = lambda r: "| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |"  # noqa: E731
    return [cells(columns), "|" + "---|" * len(columns), *map(cells, rows)]


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"# GPU check, {m['date']}", "",
             f"{m['device']} · torch {m['torch']} · CUDA {m['cuda']} · driver {m['driver']} · git "
             f"{(m['git'].get('commit') or '?')[:10]}{' (dirty)' if m['git'].get('dirty') else ''} · {m['model']}, "
             f"{m['resolution']}², {m['steps']} steps, {m['rows']} rows, batch {m['batch_size']} · bound margin "
             f"{m['margin']:g}× · budget {m['total_budget_s']} s", "", "## Checks", ""]
    rows = []
    for c in report["checks"]:
        n = c["numbers"]
        pixels = " / ".join(fmt(n.get(k)) for k in STATS) if "pixel_mean" in n else ""
        bound = " / ".join(fmt(n["bound"][k]) for k in STATS) if "bound" in n else ""
        status = c["status"] + (", over budget" if c["over_budget"] else "")
        rows.append([c["name"], c["exercises"], status, f"{fmt(c['seconds'], '.1f')} ({c['budget_s']})", pixels, bound,
                     c["reason"]])
    lines += table(COLUMNS["checks"], rows)
    lines += ["", "## Generation", ""] + table(COLUMNS["generation"], [
        [r["mode"], r["batch"], fmt(r["rate"], ".3f"), fmt(r["ratio"], ".2f") + "×", fmt(r["mfu"], ".1%"),
         fmt(r["warmup_s"], ".1f")] for r in report["generation"]])
    lines += ["", "## Training", ""] + table(COLUMNS["training"], [
        [r["method"], r["run"], fmt(r["figure"], ".4g"), r["unit"],
         fmt(r["speedup"], ".2f") + "×" if r["speedup"] is not None else "–", fmt(r["diff"], ".2e"),
         r["diff_of"]] for r in report["training"]])
    lines += ["", "## Scoring", ""] + table(COLUMNS["scoring"], [
        [r["metric"], fmt(r["rate"], ".2f"), fmt(r["ratio"], ".2f")] for r in report["scoring"]])
    return "\n".join(lines) + "\n"


def write(report: dict, args) -> None:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(finite(report), indent=2, default=str))
    Path(args.md).write_text(markdown(report))


# --------------------------------------------------------------------------- main


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when present) | cpu: the checks with a CPU path")
    ap.add_argument("--model", default="random-sd14", help="random-sd14 (SD-1.4 shapes) | tiny (small sizes)")
    ap.add_argument("--checks", default=",".join(c.name for c in PLAN),
                    help=f"comma-separated, in this order; also: {', '.join(c.name for c in OPTIONAL)}; 'wave2': "
                         f"{', '.join(c.name for c in WAVE2)}")
    ap.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, help="seconds for the whole plan")
    ap.add_argument("--margin", type=float, default=MARGIN, help="bound = margin x the measured noise")
    ap.add_argument("--compile-backend", default=None, help="default: inductor on CUDA, eager on a CPU")
    ap.add_argument("--data-dir", default=None, help="data files for MACE's real lists (default: smoke stand-ins)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check", help="default $OUT, else runs/gpu-check")
    ap.add_argument("--json", help="default OUT/gpu_check.json")
    ap.add_argument("--md", help="default OUT/gpu_check.md")
    ap.add_argument("--shard-worker", help=argparse.SUPPRESS)
    for k, v in SIZES["full"].items():        # defaults by model (SIZES)
        kind = type(v[0]) if isinstance(v, list) else type(v)
        ap.add_argument("--" + k.replace("_", "-"), type=kind, nargs="+" if isinstance(v, list) else None, default=None,
                        help=f"default {v} ({SIZES['tiny'][k]} with --model tiny)")
    args = ap.parse_args(argv)
    for k, v in SIZES["tiny" if args.model == "tiny" else "full"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.checks = [c for name in args.checks.split(",") if name
                   for c in ([w.name for w in WAVE2] if name == "wave2" else [name])]
    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown:
        ap.error(f"--checks: unknown {unknown}; choose from {', '.join(CHECKS)}")
    args.json = args.json or str(Path(args.out) / "gpu_check.json")
    args.md = args.md or str(Path(args.out) / "gpu_check.md")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.shard_worker:
        return shard_worker(args)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else None
    if args.device is None or (args.device.startswith("cuda") and not torch.cuda.is_available()):
        print(NO_CUDA)
        return 0
    args.compile_backend = args.compile_backend or ("inductor" if args.device.startswith("cuda") else "eager")

    started = time.perf_counter()
    print(f"gpu_check: {len(args.checks)} checks, {args.total_budget:.0f} s in all (a check starts only while its "
          f"budget is left):")
    for name in args.checks:
        print(f"  {name:<26} {CHECKS[name].budget_s:>4} s  {CHECKS[name].exercises}")
    report = {"meta": meta(args), "checks": [], "generation": [], "training": [], "scoring": []}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx = Session(args, Path(work), report)
        for name in args.checks:
            check = CHECKS[name]
            left = args.total_budget - (time.perf_counter() - started)
            t = time.perf_counter()
            if check.cuda_only and not ctx.cuda:
                out = Outcome("skipped", check.cuda_only)
            elif left < check.budget_s:
                out = Outcome("skipped", f"total budget spent ({max(left, 0):.0f} s left of {args.total_budget:.0f})")
            else:
                out = run_check(ctx, name)
            seconds = time.perf_counter() - t
            report["checks"].append({"name": name, "exercises": check.exercises, "status": out.status,
                                     "reason": out.reason, "seconds": seconds, "budget_s": check.budget_s,
                                     "over_budget": out.status != "skipped" and seconds > check.budget_s,
                                     "numbers": out.numbers})
            print(f"[{time.perf_counter() - started:6.1f} s] {name}: {out.status} ({seconds:.1f} s of {check.budget_s})"
                  + (f" {out.reason}" if out.reason else ""), flush=True)
            write(report, args)
    failed = [c["name"] for c in report["checks"] if c["status"] in ("fail", "error")]
    print(f"gpu_check: {len(report['checks']) - len(failed)} of {len(report['checks'])} without failure"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; {args.json}, {args.md}")
    return 1 if failed else 0


def run_check(ctx: Session, name: str) -> Outcome:
    try:
        return RUNNERS[name](ctx)
    except Skip as e:
        return Outcome("skipped", str(e))
    except Exception as e:    # one broken path must not cost the others their slot on the GPU
        if isinstance(e, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        return Outcome("error", f"{type(e).__name__}: {e}"[:600], {"traceback": traceback.format_exc()[-3000:]})


if __name__ == "__main__":
    sys.exit(main())
