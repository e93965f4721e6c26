"""MACE stage-2 speed: the official per-concept LoRA loop vs cpebench's trainer, same inputs, same run.

    python benchmarks/perf/mace_train.py --repeat 2                                  # CPU: tiny, 6 celebrities, 10 steps
    python benchmarks/perf/mace_train.py --model random-sd14 --device cuda \
        --concepts 8 --steps 50 --per-step 4 --autocast bf16                        # GPU: SD-1.4 shapes

The task's data files come from ``$CPEBENCH_DATA`` or are downloaded once (``cpebench data fetch``).

Every run trains the LoRAs of the task's first K concepts on the same W1 (cpebench's stage 1) and the
same seeded training images (generated once, before the runs):

* ``reference`` — a plain restatement of the official loop (src/cfr_lora_training.py with
  src/mace_lora_atten_processor.py; docs/methods/mace.md), written here and independent of baselines/mace.py: one
  concept at a time, batch 1, fp32; every attention module (attn1 too) computes its probabilities
  explicitly and carries rank-1 LoRAs on q/k/v/out, of which only attn2 k/v are trained (the others stay
  zero, as in the official files); the prompt is text-encoded and the image VAE-encoded at every step;
  AdamW, clip, step.
* ``fp32`` — ``MACE.erase`` with the task's settings (1 concept per step, no autocast: the defaults).
* ``batched`` — ``lora_concepts_per_step=N`` (``--per-step``).
* ``autocast`` — ``lora_autocast`` (``--autocast``, bf16 by default), 1 concept per step.
* ``batched+autocast`` — both.
* ``seed`` — ``batched`` with hparams.seed + 1000: the scale of a genuinely different result.

Concept i's LoRA init, image order, prompt, t and noise come from one CPU generator seeded
hparams.seed + i, drawn in the same order by every run (the official code uses the global RNGs instead),
so all runs do the same work and should reach the same LoRAs. Against ``reference`` the table gives the
relative difference of ΔW = up·down (worst concept, all layers) and of the loss (worst step of any
concept). Stage seconds of the cpebench runs are the artifact's ``stage_seconds``: stage 1 reads the
preservation caches from disk (built once, before the runs), and ``stage2_data`` is ~0 because the
training images are reused. Each run is preceded by an untimed 2-step warm-up on the first concept(s);
``--repeat R`` goes round all runs R times and keeps each one's fastest. Memoising the training images
replaces ``baselines.mace.training_images`` for the duration of the runs (restored at the end).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from perf_args import apply_threads, chosen_runs

RUNS = ("reference", "fp32", "batched", "autocast", "batched+autocast", "seed")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# =========================================================================== the official loop, restated


class RefLoRA(torch.nn.Module):
    """diffusers' LoRALinearLayer: x ↦ up(down(x)), down ~ N(0, 1/rank), up = 0, no bias, scale 1."""

    def __init__(self, n_in: int, n_out: int, rank: int, gen: torch.Generator):
        super().__init__()
        self.down = torch.nn.Parameter(torch.randn(rank, n_in, generator=gen) / rank)
        self.up = torch.nn.Parameter(torch.zeros(n_out, rank))

    def forward(self, x):
        return (x @ self.down.T) @ self.up.T


class RefProcessor:
    """The official AttnProcessor with its LoRAs: softmax(q kᵀ·scale) v computed explicitly; attn2's
    probabilities are handed to the loss."""

    def __init__(self, lora: dict, record: list | None):
        self.lora, self.record = lora, record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states) + self.lora["q"](hidden_states)
        key = attn.to_k(ctx) + self.lora["k"](ctx)
        v = attn.to_v(ctx) + self.lora["v"](ctx)
        b, n, _ = q.shape
        q, key, v = (x.reshape(b, x.shape[1], attn.heads, -1).transpose(1, 2) for x in (q, key, v))
        probs = torch.softmax(q @ key.transpose(-1, -2) * attn.scale, dim=-1)      # [1, heads, n, 77]
        if self.record is not None:
            self.record.append(probs)
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        out = attn.to_out[0](out) + self.lora["out"](out)
        return attn.to_out[1](out) / attn.rescale_output_factor


def install_reference_loras(unet, rank: int, gen: torch.Generator, record: list, device) -> list:
    """LoRAs on q/k/v/out of every attention module (processors installed); returns the trained ones
    (attn2 k, v per module, in module order: drawn from ``gen`` in that order). The untrained ones draw
    from a spare generator so that ``gen`` stays in step with cpebench's."""
    from diffusers.models.attention_processor import Attention

    spare = torch.Generator().manual_seed(0)
    processors, trained = {}, []
    for name, m in unet.named_modules():
        if not isinstance(m, Attention):
            continue
        cross = name.endswith("attn2")
        lora = {}
        for p in ("q", "k", "v", "out"):
            lin = m.to_out[0] if p == "out" else getattr(m, f"to_{p}")
            lora[p] = RefLoRA(lin.in_features, lin.out_features, rank, gen if cross and p in "kv" else spare).to(device)
        if cross:
            trained += [lora["k"], lora["v"]]
        processors[f"{name}.processor"] = RefProcessor(lora, record if cross else None)
    unet.set_attn_processor(processors)
    return trained


def concept_span_and_padding(tokenizer, prompt: str, name: str) -> list[int]:
    """S: the name's token span in the padded prompt plus every EOS/padding position (use_pooler)."""
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    span = tokenizer(name, add_special_tokens=False).input_ids
    start = next(i for i in range(len(ids)) if ids[i : i + len(span)] == span)
    return sorted(set(range(start, start + len(span))) | {i for i, t in enumerate(ids) if t == tokenizer.eos_token_id})


def reference_concept(pipe, name: str, prompts: list[str], images: torch.Tensor, hp, seed: int, device):
    """One concept, the official way. Returns ({layer: (up, down)} of the trained LoRAs in cpebench's
    order, the losses)."""
    from diffusers import DDPMScheduler

    unet, gen = pipe.unet, torch.Generator().manual_seed(seed)
    record: list = []
    original = unet.attn_processors
    trained = install_reference_loras(unet, hp.rank, gen, record, device)
    params = [p for lora in trained for p in (lora.down, lora.up)]
    opt = torch.optim.AdamW(params, lr=hp.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=hp.weight_decay)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    steps_t = ddpm.config.num_train_timesteps
    tt = torch.arange(steps_t, dtype=torch.float64)
    focal = torch.sigmoid(0.05 * (tt - 200)) - torch.sigmoid(0.05 * (tt - 400))
    focal = focal / focal.sum()
    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(1, 3, 1, 1)
    order, losses = [], []
    try:
        for _ in range(hp.max_train_steps):
            if not order:                                    # DataLoader(shuffle=True): a new epoch
                order = torch.randperm(images.shape[0], generator=gen).tolist()
            i = order.pop(0)
            k = int(torch.randint(len(prompts), (1,), generator=gen))
            if hp.timesteps == "focal":
                t = int(torch.multinomial(focal, 1, generator=gen))
            else:
                t = int(torch.randint(steps_t, (1,), generator=gen))
            with torch.no_grad():                            # per step, as the official loop
                x = images[i : i + 1].to(device)
                x = (x - mean) / std if hp.vae_input_norm == "imagenet" else x * 2 - 1
                dist = pipe.vae.encode(x).latent_dist
                ids = pipe.tokenizer(prompts[k], padding="max_length", max_length=77, truncation=True,
                                     return_tensors="pt").input_ids.to(device)
                context = pipe.text_encoder(ids)[0]
            z0 = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device)) * pipe.vae.config.scaling_factor
            noise = torch.randn(z0.shape, generator=gen).to(device)
            zt = ddpm.add_noise(z0, noise, torch.tensor([t], device=device))
            record.clear()
            unet(zt, t, encoder_hidden_states=context)           # the output is unused (no MSE term)
            s = concept_span_and_padding(pipe.tokenizer, prompts[k], name)
            loss = sum(torch.linalg.norm(p[0][:, :, s]) for p in record)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        names = [n.removesuffix(".processor") for n in original if n.endswith("attn2.processor")]
        unet.set_attn_processor(original)   # (empties the dict)
    factors = {}
    for j, n in enumerate(names):
        for p, lora in (("to_k", trained[2 * j]), ("to_v", trained[2 * j + 1])):
            factors[f"{n}.{p}.weight"] = (lora.up.detach().cpu().clone(), lora.down.detach().cpu().clone())
    return factors, losses


def reference_run(pipe, names, hp, images, w1, device) -> tuple[float, list]:
    from baselines import mace as M
    from cpebench.attention import swapped_weights

    results = []
    with M.frozen_unet(pipe.unet), swapped_weights(pipe.unet, M.to_fp32(w1)):
        sync(device)
        t0 = time.perf_counter()
        for i, n in enumerate(names):
            results.append(reference_concept(pipe, n, M.prompts_for(hp, n), images[n], hp, hp.seed + i, device))
        sync(device)
        seconds = time.perf_counter() - t0
    return seconds, results


# =========================================================================== cpebench's runs


def cpebench_run(pipe, names, hparams: dict, device, data_dir) -> tuple[dict, list]:
    """MACE.erase with a workdir: (stage_seconds, [(factors, losses)] from the per-concept LoRA states)."""
    from baselines.mace import MACE, load_lora_state
    from cpebench.methods import Concept, EraseContext

    with tempfile.TemporaryDirectory() as work:
        ctx = EraseContext(device=str(device), data_dir=data_dir, progress=False, workdir=work)
        sync(device)
        art = MACE().erase(pipe, [Concept(n) for n in names], hparams, ctx)
        sync(device)
        states = [load_lora_state(Path(work) / f"mace-lora-{i:04d}.safetensors", None) for i in range(len(names))]
    return art.metadata["stage_seconds"], [(factors, losses) for factors, losses, _ in states]


def delta_rel(a: dict, b: dict) -> float:
    """‖ΔW_a − ΔW_b‖ / ‖ΔW_b‖ over all layers (ΔW = up·down, float64)."""
    num = den = 0.0
    for k, (u, d) in b.items():
        ref = u.double() @ d.double()
        ua, da = a[k]
        num += float(((ua.double() @ da.double() - ref) ** 2).sum())
        den += float((ref ** 2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def compare(results: list, reference: list) -> tuple[float, float]:
    dw = max(delta_rel(fa, fb) for (fa, _), (fb, _) in zip(results, reference))
    dl = max(abs(x - y) / abs(y) for (_, la), (_, lb) in zip(results, reference) for x, y in zip(la, lb))
    return dw, dl


# =========================================================================== main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | random-sd14 | hub id | local dir")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--task", default="celebrity")
    ap.add_argument("--concepts", type=int, default=6, help="the task's first K concepts")
    ap.add_argument("--steps", type=int, default=10, help="LoRA steps per concept (official: 50; 120 for nudity)")
    ap.add_argument("--per-step", type=int, default=None, help="lora_concepts_per_step of the batched runs (default: K)")
    ap.add_argument("--autocast", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    ap.add_argument("--preset", default=None, help="hparams of this preset (default: smoke for --model tiny, else none)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more hparams, e.g. n_images=2")
    ap.add_argument("--data-dir", default=None, help="data files (default: $CPEBENCH_DATA, then the cache)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=1, help="timed calls per run, interleaved; the fastest is reported")
    ap.add_argument("--json", help="write the table's figures here")
    args = ap.parse_args(argv)
    apply_threads(args)
    runs = chosen_runs(ap, args.runs, RUNS)

    from baselines import mace as M
    from cpebench import config, runner
    from cpebench.data import cache_dir
    from cpebench.models import load_pipeline

    preset = args.preset if args.preset is not None else ("smoke" if args.model == "tiny" else None)
    overrides = [f"hparams.max_train_steps={args.steps}"] + [f"hparams.{kv}" for kv in args.set]
    cfg = config.resolve_run("mace", args.task, preset=preset or None, overrides=overrides)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, prompts="full", data_dir=args.data_dir))
    all_names = runner.task_concepts(cfg)
    names = [M.train_name(n) for n in all_names[: args.concepts]]
    hparams = dict(cfg.hparams)
    hp = M.Hparams.from_dict(hparams)
    if hp.masks != "none":
        ap.error("the reference loop here is mask-free: run with masks=none (the default)")
    per_step = args.per_step or len(names)
    device = torch.device(args.device)

    pipe = load_pipeline(args.model, dtype="fp32", device=args.device).pipe
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"model={args.model} device={where} torch={torch.__version__} task={args.task} concepts={len(names)} "
          f"(of {len(all_names)}) steps={hp.max_train_steps} images={hp.n_images}x{hp.resolution}^2 "
          f"per-step={per_step} autocast={args.autocast}" + (f" preset={preset}" if preset else ""), flush=True)

    # Shared inputs: training images (generated once; MACE.erase below reuses them) and W1.
    t0 = time.perf_counter()
    images = {n: M.training_images(pipe, n, hp, device)[0] for n in names}
    data_s = time.perf_counter() - t0
    memo = dict(images)
    real_images = M.training_images
    M.training_images = lambda pipe_, name, hp_, device_: (memo[name], {"reused": True}) if name in memo \
        else real_images(pipe_, name, hp_, device_)
    t0 = time.perf_counter()
    w0 = M.layer_weights(pipe.unet, device)
    pres, _ = M.preservation(pipe, hp, names, device, args.data_dir, cache_dir())   # builds the disk caches once
    terms = M.stage1_terms(pipe, names, M.mapping_for(hp, names), hp, device)
    w1 = M.stage1(w0, terms, pres, hp.lamb, hp.preserve_sigma1())[0]
    stage1_s = time.perf_counter() - t0
    print(f"training images {data_s:.2f} s ({data_s / len(names):.3f} s/concept); caches + stage 1 {stage1_s:.2f} s "
          "(first call: builds the preservation caches unless on disk)", flush=True)
    if device.type == "cuda":   # the runs below train with these
        print(f"tf32: matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}")

    variants = {"fp32": {}, "batched": {"lora_concepts_per_step": per_step}, "autocast": {"lora_autocast": args.autocast},
                "batched+autocast": {"lora_concepts_per_step": per_step, "lora_autocast": args.autocast},
                "seed": {"lora_concepts_per_step": per_step, "seed": hp.seed + 1000}}

    def timed(run: str, warm_up: bool):
        if run == "reference":
            if warm_up:
                reference_run(pipe, names[:1], dataclasses.replace(hp, max_train_steps=2), images, w1, device)
            seconds, results = reference_run(pipe, names, hp, images, w1, device)
            return seconds, {}, results
        h = {**hparams, **variants[run]}
        if warm_up:
            n_warm = variants[run].get("lora_concepts_per_step", 1)
            cpebench_run(pipe, names[:n_warm], {**h, "max_train_steps": 2}, device, args.data_dir)
        stages, results = cpebench_run(pipe, names, h, device, args.data_dir)
        return stages["stage2_loras"], stages, results

    # Repeats go round all runs (load that comes and goes hits every run alike); the fastest is kept.
    best: dict = {}
    for rep in range(max(1, args.repeat)):
        for run in runs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                seconds, stages, results = timed(run, warm_up=rep == 0)
            except torch.cuda.OutOfMemoryError:   # e.g. too many concepts per step: report it, go on
                print(f"  {run}: out of GPU memory (try a smaller --per-step)", file=sys.stderr, flush=True)
                torch.cuda.empty_cache()
                continue
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            print(f"  {run:<17} stage 2 {seconds:8.2f} s", file=sys.stderr, flush=True)
            if run not in best or seconds < best[run][0]:
                best[run] = (seconds, stages, results, peak)
    ref = best["reference"][2] if "reference" in best else None
    rows = [(run, s, st, compare(res, ref) if ref is not None else (None, None), peak)
            for run, (s, st, res, peak) in best.items()]
    M.training_images = real_images

    if device.type == "cpu":
        print(f"load average at the end {os.getloadavg()[0]:.1f} (other jobs on the machine slow every run)")
    base = rows[0][1] if rows and rows[0][0] == "reference" else None
    n_task = len(all_names)
    print(f"\n| run | s/concept | stage 2 s ({n_task} concepts, est.) | speed-up vs reference | ΔW rel. diff | loss rel. diff "
          "| stage 1 / 2 data / 2 LoRAs / 3 s (artifact) | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    figures = []
    for run, s, stages, (dw, dl), peak in rows:
        per = s / len(names)
        if run == "reference":
            dw = dl = None
        figures.append({"run": run, "s_per_concept": per, "speedup": base / s if base else None, "dw_rel_diff": dw,
                        "loss_rel_diff": dl, "stage_seconds": stages, "peak_gib": peak})
        st = " / ".join(f"{stages[k]:.2f}" for k in ("caches_and_stage1", "stage2_data", "stage2_loras", "stage3_fusion")) \
            if stages else "–"
        print(f"| {run} | {per:.3f} | {per * n_task:.1f} | {base / s if base else float('nan'):.2f}× | "
              f"{'–' if dw is None else f'{dw:.1e}'} | {'–' if dl is None else f'{dl:.1e}'} | {st} | "
              f"{'–' if peak is None else f'{peak:.1f}'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": where, "concepts": len(names),
                                               "rows": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
