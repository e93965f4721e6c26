"""SPM training speed: the official loop (train_spm.py, batch 1, fp32) vs cpebench's trainer, in the same run.

    python benchmarks/perf/spm_train.py                                   # CPU smoke: tiny, 2 concepts × 6 iterations
    python benchmarks/perf/spm_train.py --model random-sd14 --device cuda \
        --iterations 20 --autocast bf16                                   # GPU: SD-1.4 shapes, 256-448² buckets

Every run trains one membrane per concept (``--concepts``, comma-separated) for ``--iterations`` iterations:

* ``reference`` — Con6924/SPM@3dd762e ``train_spm.py`` (docs/methods/spm.md; shared/specs/baselines_adapters.md
  §1.3) restated in diffusers, one concept after the other: the SPMNetwork as forward hooks on the 192
  Linear/Conv2d layers of the transformers (``lora_up(lora_down(x)) · multiplier · scale``, computed even
  while the multiplier is 0), batch 1, fp32; every iteration resets the DDIM schedule to 30 steps, samples
  x_t with k DDIM steps at CFG 3 (membrane on, a [u; t] batch of 2), switches the schedule to 1000 steps,
  then calls the UNet four more times, each through ``predict_noise``'s CFG batch (so half of every batch
  is an unconditional row that guidance 1 throws away): positive and neutral (membrane off, batch 2 each),
  target (membrane on, batch 2), anchors on and off (batch 2S each); every prediction is copied to the CPU
  and the losses are computed there, as the official code does; AdamW, cosine-with-restarts, one step.
  Prompt embeddings are encoded once (the official PromptEmbedsCache).
* ``fp32`` — ``baselines.spm.train`` with the same settings (``concepts_per_step`` 1: membranes one after
  the other; CFG 1 calls as single conditional rows; the off passes in one batch, the on passes in another).
* ``batched`` — ``concepts_per_step`` = the number of concepts: all membranes in one batch (other draws).
* ``autocast`` / ``batched+autocast`` — the same with ``autocast`` (``--autocast``: the x_t sampling).

Deviations of the reference from the official file, for a comparable run: torch AdamW in fp32 (AdamW8bit
needs bitsandbytes and CUDA), diffusers' SDPA attention (official: xformers), and every random draw —
the init of lora_down, the prompt entry, k, the resolution, x_T, the anchors — taken from one CPU generator
seeded ``seed`` in cpebench's order (the official loop uses the unseeded global RNGs). So ``reference``,
``fp32`` and ``autocast`` do the same work from the same draws and should reach the same membranes:
ΔW rel. diff is ‖ΔW − ΔW_ref‖ / ‖ΔW_ref‖ over all 192 layers (ΔW = up·down, worst concept). The batched
runs draw for K membranes at once (other k, resolutions and noise): their ΔW diff is the scale of a
genuinely different result, and their time covers other k (the x_t cost grows with k). Each run reports
its mean loss (L_e + λ_LA L_LA per membrane and iteration). Figures: seconds, s per membrane-iteration,
s per concept at the official 3000 iterations (s/iteration × 3000), speed-up over ``reference``, peak GPU
memory. Absolute figures mean something only on a GPU with SD-1.4's shapes (``--model random-sd14``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from perf_args import apply_threads, chosen_runs

from baselines import spm
from cpebench.methods import EraseContext
from cpebench.models import load_pipeline, text_embeddings

RUNS = ("reference", "fp32", "batched", "autocast", "batched+autocast")
OFFICIAL_ITERATIONS = 3000


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# =========================================================================== the official loop, restated


class RefNetwork(torch.nn.Module):
    """SPMNetwork (src/models/spm.py) restated: a rank-r (lora_down, lora_up) pair per Linear/Conv2d inside
    every Transformer2DModel, added to that layer's output as up(down(x)) · multiplier · scale by a forward
    hook. ``with net:`` sets the multiplier to 1, leaving sets it to 0; the branch runs either way."""

    def __init__(self, unet, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.multiplier, self.scale = 1.0, alpha / rank
        self.keys, self.pairs, self._handles = [], torch.nn.ModuleList(), []
        for name, block in unet.named_modules():
            if type(block).__name__ != "Transformer2DModel":
                continue
            for child_name, child in block.named_modules():
                kind = type(child).__name__                 # the official code matches class names
                if kind == "Linear":
                    fan_in = child.in_features
                    down = torch.nn.Linear(fan_in, rank, bias=False)
                    up = torch.nn.Linear(rank, child.out_features, bias=False)
                elif kind == "Conv2d":
                    fan_in = child.in_channels * child.kernel_size[0] * child.kernel_size[1]
                    down = torch.nn.Conv2d(child.in_channels, rank, child.kernel_size, child.stride, child.padding, bias=False)
                    up = torch.nn.Conv2d(rank, child.out_channels, 1, bias=False)
                else:
                    continue
                with torch.no_grad():   # kaiming_uniform(a=√5) = U(±1/√fan_in), from the run's generator; up = 0
                    w = (torch.rand(1, rank, fan_in, generator=generator) * 2 - 1) / math.sqrt(fan_in)
                    down.weight.copy_(w.view_as(down.weight))
                    up.weight.zero_()
                pair = torch.nn.ModuleDict({"down": down, "up": up})
                self.pairs.append(pair)
                self.keys.append(f"{spm.PREFIX}.{name}.{child_name}".replace(".", "_"))
                self._handles.append(child.register_forward_hook(self._hook(pair)))

    def _hook(self, pair):
        def add_branch(module, args, output):
            return output + pair["up"](pair["down"](args[0])) * self.multiplier * self.scale
        return add_branch

    def __enter__(self):
        self.multiplier = 1.0

    def __exit__(self, *exc):
        self.multiplier = 0.0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def factors(self) -> dict:
        return {k: (p["down"].weight.detach().cpu().clone(), p["up"].weight.detach().cpu().clone())
                for k, p in zip(self.keys, self.pairs)}


def predict_noise(unet, scheduler, t, latents, context, guidance: float) -> torch.Tensor:
    """train_util.predict_noise: always a CFG batch [latents; latents] on [uncond rows; cond rows]."""
    x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
    e_u, e_c = unet(x, t, encoder_hidden_states=context).sample.chunk(2)
    return e_u + guidance * (e_c - e_u)


def draw(gen: torch.Generator, hp: spm.Hparams, target: torch.Tensor, channels: int, resolution: int,
         latent_div: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """One iteration's draws, in cpebench's order so both loops do the same work: the prompt entry (one
    here), k, the resolution bucket, x_T, then the S anchors (sampling.sample: unit-norm Gaussians kept
    with probability 1 − cos(a, t), scaled to ‖t‖ · U(0.8, 1.2)). Returns (k, x_T, anchors [S, 77, D])."""
    torch.randint(1, (1,), generator=gen)                      # the prompt pair: one per membrane
    k = int(torch.randint(1, hp.max_denoising_steps, (1,), generator=gen))
    h = w = resolution
    if hp.dynamic_resolution:                                  # get_random_resolution_in_bucket
        lo, hi = resolution // 2 // spm.BUCKET_STEP, resolution // spm.BUCKET_STEP
        h, w = (int(v) * spm.BUCKET_STEP for v in torch.randint(lo, hi, (2,), generator=gen))
    noise = torch.randn(1, channels, h // latent_div, w // latent_div, generator=gen)
    flat = target.detach().float().cpu().flatten()
    s = hp.anchors
    anchors, todo = torch.empty(s, flat.numel()), torch.ones(s, dtype=torch.bool)
    while todo.any():
        cand = torch.randn(1, s, flat.numel(), generator=gen)[0]
        cand = cand / cand.norm(dim=-1, keepdim=True)
        keep = torch.rand(1, s, generator=gen)[0] < 1 - (cand * F.normalize(flat, dim=-1)).sum(-1)
        take = todo & keep
        anchors[take] = cand[take]
        todo &= ~keep
    scale = torch.rand(1, s, generator=gen)[0] * 0.4 + 0.8
    return k, noise, (anchors * (scale * flat.norm())[:, None]).view(s, *target.shape[-2:])


def reference_concept(pipe, target: str, hp: spm.Hparams, resolution: int, latent_div: int) -> tuple[dict, list]:
    """One membrane, the official way. Returns ({official key: (down, up)}, per-iteration losses)."""
    from diffusers import DDIMScheduler
    from diffusers.optimization import (
        get_cosine_with_hard_restarts_schedule_with_warmup,
    )

    unet = pipe.unet
    device = unet.device
    gen = torch.Generator().manual_seed(hp.seed)
    net = RefNetwork(unet, hp.rank, hp.alpha, gen).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)   # official: AdamW8bit
    lr_sched = get_cosine_with_hard_restarts_schedule_with_warmup(opt, hp.lr_warmup_steps, hp.iterations, hp.lr_cycles)
    cfg = pipe.scheduler.config                                # model_util.create_noise_scheduler: DDIM, no clipping
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                          beta_schedule=cfg.beta_schedule, clip_sample=False)
    neutral = hp.neutral if isinstance(hp.neutral, str) else hp.neutral[0]
    with torch.no_grad():                                      # PromptEmbedsCache: encoded once, before the loop
        cache = {p: text_embeddings(pipe, [p]) for p in dict.fromkeys([target, neutral, ""])}
    u, t_emb, p_emb, n_emb = cache[""], cache[target], cache[target], cache[neutral]   # positive = target
    s = hp.anchors
    losses = []
    try:
        for _ in range(hp.iterations):
            with torch.no_grad():
                sched.set_timesteps(hp.max_denoising_steps, device=device)
                opt.zero_grad()
                k, noise, anchors = draw(gen, hp, t_emb, unet.config.in_channels, resolution, latent_div)
                latents = noise.to(device) * sched.init_noise_sigma
                with net:                                      # x_t from the membrane-on model, CFG 3
                    for t in sched.timesteps[0:k]:
                        eps = predict_noise(unet, sched, t, latents, torch.cat([u, t_emb]), hp.start_guidance)
                        latents = sched.step(eps, t, latents).prev_sample
                sched.set_timesteps(1000)
                t_q = sched.timesteps[int(k * 1000 / hp.max_denoising_steps)]
                positive = predict_noise(unet, sched, t_q, latents, torch.cat([u, p_emb]), 1).to("cpu", torch.float32)
                neutral_eps = predict_noise(unet, sched, t_q, latents, torch.cat([u, n_emb]), 1).to("cpu", torch.float32)
            with net:
                target_eps = predict_noise(unet, sched, t_q, latents, torch.cat([u, t_emb]), 1).to("cpu", torch.float32)
            # latent anchoring: the official list is [u, a1, u, a2, ...] and predict_noise keeps its second
            # half ({u, a3, u, a4} for S = 4); anchor_set 'drawn' puts the S anchors in that half instead
            if hp.anchor_set == "official":
                ctx = torch.cat([torch.cat([u, a[None].to(device)]) for a in anchors])
            else:
                ctx = torch.cat([u.expand(s, -1, -1), anchors.to(device)])
            x_a = latents.repeat(s, 1, 1, 1)
            with net:
                a_on = predict_noise(unet, sched, t_q, x_a, ctx, 1).to("cpu", torch.float32)
            with torch.no_grad():
                a_off = predict_noise(unet, sched, t_q, x_a, ctx, 1).to("cpu", torch.float32)
            erase = F.mse_loss(target_eps, neutral_eps - hp.guidance_scale * (positive - neutral_eps))
            loss = erase + hp.la_strength * F.mse_loss(a_on, a_off)
            loss.backward()                                    # max_grad_norm 0: no clipping
            opt.step()
            lr_sched.step()
            losses.append(float(loss.detach()))
    finally:
        net.remove()
    return net.factors(), losses


def reference_run(pipe, names, hp, resolution, latent_div) -> tuple[float, list, list]:
    device = pipe.unet.device
    sync(device)
    t0 = time.perf_counter()
    out = [reference_concept(pipe, n, hp, resolution, latent_div) for n in names]
    sync(device)
    return time.perf_counter() - t0, [f for f, _ in out], [x for _, ls in out for x in ls]


# =========================================================================== cpebench's runs


@contextlib.contextmanager
def recorded_losses(store: list):
    """spm.Trainer.step wrapped to keep every step's total loss per membrane (train() keeps the last group's)."""
    original = spm.Trainer.step

    def step(self):
        out = original(self)
        store.extend([out[0] / len(self.jobs)] * len(self.jobs))
        return out

    spm.Trainer.step = step
    try:
        yield
    finally:
        spm.Trainer.step = original


def cpebench_run(pipe, names, hp: spm.Hparams, device) -> tuple[float, list, list]:
    """spm.train, as SPM.erase calls it: (seconds, per concept {key: (down, up)}, per-iteration losses)."""
    losses: list = []
    with recorded_losses(losses):
        sync(device)
        t0 = time.perf_counter()
        tensors, _ = spm.train(pipe, names, hp, EraseContext(device=str(device), progress=False))
        sync(device)
        seconds = time.perf_counter() - t0
    tail = ".lora_down.weight"
    keys = [k[len("spm0."): -len(tail)] for k in tensors if k.startswith("spm0.") and k.endswith(tail)]
    factors = [{k: (tensors[f"spm{i}.{k}.lora_down.weight"], tensors[f"spm{i}.{k}.lora_up.weight"]) for k in keys}
               for i in range(len(names))]
    return seconds, factors, losses


# =========================================================================== comparison


def delta_rel(run: dict, ref: dict) -> float:
    """‖ΔW_run − ΔW_ref‖ / ‖ΔW_ref‖ over all layers, ΔW = up·down in float64."""
    num = den = 0.0
    for key, (d_ref, u_ref) in ref.items():
        dw_ref = u_ref.double().reshape(u_ref.shape[0], -1) @ d_ref.double().reshape(d_ref.shape[0], -1)
        d, u = run[key]
        dw = u.double().reshape(u.shape[0], -1) @ d.double().reshape(d.shape[0], -1)
        num += float(((dw - dw_ref) ** 2).sum())
        den += float((dw_ref ** 2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | random-sd14 (SD-1.4 shapes, random weights) | hub id | dir")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--concepts", default="Snoopy,Van Gogh", help="comma-separated; one membrane each")
    ap.add_argument("--iterations", type=int, default=6, help="iterations per membrane (official: 3000)")
    ap.add_argument("--max-denoising-steps", type=int, default=30, help="DDIM schedule of x_t (k ~ U{1..N-1})")
    ap.add_argument("--anchors", type=int, default=4, help="S, the latent-anchoring samples")
    ap.add_argument("--resolution", type=int, default=None, help="default: the UNet's (512 for SD-1.4, 64 for tiny)")
    ap.add_argument("--dynamic-resolution", default="auto", choices=["auto", "on", "off"],
                    help="the official 256-448 buckets; auto = on from 128 px")
    ap.add_argument("--anchor-set", default="drawn", choices=["drawn", "official"])
    ap.add_argument("--autocast", default="none", choices=["none", "bf16", "fp16"],
                    help="adds the autocast runs (the trainer's autocast of the x_t sampling)")
    ap.add_argument("--runs", default=None, help=f"comma-separated subset of {', '.join(RUNS)} "
                    "(default: reference,fp32,batched, plus the autocast runs with --autocast)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations of each run first (0: none)")
    ap.add_argument("--repeat", type=int, default=1, help="timed calls per run, interleaved; the fastest is kept")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    apply_threads(args)
    runs = chosen_runs(ap, args.runs, RUNS, ["reference", "fp32", "batched"]
                       + (["autocast", "batched+autocast"] if args.autocast != "none" else []))
    if any("autocast" in r for r in runs) and args.autocast == "none":
        ap.error("the autocast runs need --autocast bf16|fp16")
    names = [c.strip() for c in args.concepts.split(",") if c.strip()]
    device = torch.device(args.device)

    pipe = load_pipeline(args.model, device=args.device).pipe
    latent_div = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = args.resolution or pipe.unet.config.sample_size * latent_div
    dynamic = resolution >= 2 * spm.BUCKET_STEP if args.dynamic_resolution == "auto" else args.dynamic_resolution == "on"
    hp = spm.Hparams.from_dict({"iterations": args.iterations, "max_denoising_steps": args.max_denoising_steps,
                                "anchors": args.anchors, "resolution": resolution, "dynamic_resolution": dynamic,
                                "anchor_set": args.anchor_set, "seed": args.seed})
    layers = spm.membrane_layers(pipe.unet)
    probe = RefNetwork(pipe.unet, hp.rank, hp.alpha, torch.Generator())
    probe.remove()
    if probe.keys != [l.key for l in layers]:       # the reference must draw its init in cpebench's layer order
        raise SystemExit("spm_train: the reference's layers differ from baselines.spm.membrane_layers")
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"SPM model={args.model} device={where} torch={torch.__version__} concepts={names} iterations={hp.iterations} "
          f"layers={len(layers)} resolution={resolution}{' (256-448 buckets)' if dynamic else ''} "
          f"max_denoising_steps={hp.max_denoising_steps} anchors={hp.anchors} ({hp.anchor_set})", flush=True)

    variants = {"fp32": {}, "batched": {"concepts_per_step": len(names)}, "autocast": {"autocast": args.autocast},
                "batched+autocast": {"concepts_per_step": len(names), "autocast": args.autocast}}
    setting = {"reference": "official loop, fp32, batch 1", "fp32": "cpebench, fp32, 1 membrane per step",
               "batched": f"cpebench, fp32, {len(names)} membranes per step",
               "autocast": f"cpebench, autocast {args.autocast}", "batched+autocast":
               f"cpebench, autocast {args.autocast}, {len(names)} membranes per step"}

    def timed(run: str, warm_up: bool):
        h = spm.Hparams.from_dict({**spm.asdict(hp), **variants.get(run, {})})
        short = spm.Hparams.from_dict({**spm.asdict(h), "iterations": max(1, args.warmup)})
        if run == "reference":
            if warm_up and args.warmup:
                reference_run(pipe, names[:1], short, resolution, latent_div)
            return reference_run(pipe, names, hp, resolution, latent_div)
        if warm_up and args.warmup:
            cpebench_run(pipe, names[: h.concepts_per_step], short, device)
        return cpebench_run(pipe, names, h, device)

    best: dict = {}
    for rep in range(max(1, args.repeat)):   # round all runs each time: load that comes and goes hits all alike
        for run in runs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, factors, losses = timed(run, warm_up=rep == 0)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            print(f"  {run:<17} {seconds:8.2f} s", file=sys.stderr, flush=True)
            if run not in best or seconds < best[run][0]:
                best[run] = (seconds, factors, losses, peak)

    ref = best.get("reference")
    base = ref[0] if ref else None
    steps = hp.iterations * len(names)
    rows = []
    for run, (seconds, factors, losses, peak) in best.items():
        diff = (max(delta_rel(f, r) for f, r in zip(factors, ref[1])) if ref and run != "reference" else None)
        rows.append({"run": run, "setting": setting[run], "seconds": seconds, "s_per_iteration": seconds / steps,
                     "s_per_concept_3000": seconds / steps * OFFICIAL_ITERATIONS,
                     "speedup": base / seconds if base else None, "mean_loss": sum(losses) / len(losses),
                     "dw_rel_diff": diff, "peak_gib": peak})
    if device.type == "cpu":
        print(f"load average at the end {os.getloadavg()[0]:.1f} (other jobs on the machine slow every run)")
    print("\n| run | seconds | s/iteration | s/concept (3000 it., est.) | speed-up vs reference | mean loss "
          "| ΔW rel. diff | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['seconds']:.2f} | {r['s_per_iteration']:.4f} | {r['s_per_concept_3000']:.0f} | "
              f"{'–' if r['speedup'] is None else format(r['speedup'], '.2f') + '×'} | {r['mean_loss']:.4g} | "
              f"{'–' if r['dw_rel_diff'] is None else format(r['dw_rel_diff'], '.1e')} | "
              f"{'–' if r['peak_gib'] is None else format(r['peak_gib'], '.1f')} |")
    print("(ΔW rel. diff: ‖ΔW − ΔW_ref‖/‖ΔW_ref‖, worst concept; the batched runs draw differently: their diff is "
          "the scale of another result)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": where, "concepts": names,
                                               "iterations": hp.iterations, "resolution": resolution,
                                               "dynamic_resolution": dynamic, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
