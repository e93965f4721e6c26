"""ACE training speed: the spec's algorithm written plainly (one concept at a time, batch 1) vs cpebench's erase.

    python benchmarks/perf/ace_train.py                                   # CPU smoke: tiny, 2 celebrities, 20 steps
    python benchmarks/perf/ace_train.py --model random-sd14 --device cuda --preset smoke \
        --resolution 512 --images 4 --data-steps 20 --stats-timesteps 10 --steps 50   # GPU: SD-1.4 shapes

ACE (arXiv 2504.11850) has **no public code**: there is no official loop to restate. The ``reference`` here is
the algorithm of shared/specs/ace.md (cpebench reconstruction, spec v1; docs/methods/ace.md) written the
plain way, with none of cpebench's batching or caching. Both sides take the task's first K concepts
(``--concepts``) with the task's hyperparameters (``--preset smoke`` by default on the tiny model, whose
inline lists need no data files):

* ``reference`` — per concept, one after the other: its prompts, retain set and mask calibration (from
  baselines.ace's prompt and mask helpers: definitions, not the loop), then everything that touches the UNet
  written out here: the ``n_images`` concept images and as many retain images generated one at a time
  (PNDM, a CFG batch of 2, both prompts encoded per image); stage 1 one (image, timestep) row per UNet pass,
  each row's prompt and neutral prompt encoded and its mask computed for that pass, an attn2 processor that
  computes O_c = Attn(Q,K_c,V_c), B = Attn(Q,K_c,m⊙V_c) and O_n = Attn(Q,K_n,V_n) from the layer's own
  queries and sums ⟨B,ΔO⟩, ‖B‖², ⟨Q,ΔO⟩ per channel, then g = clip(α num/(den + λ), 0, 1); stage 2 Adam on
  the gates, every step encoding the erase prompt, its neutral(p), the retain prompt, recomputing their
  masks, and running each row as its own batch of 1 (frozen target pass, then gated pass with grad),
  fp32; clip, step, clamp to [0, 1].
* ``cpebench-single`` — ``ACE().erase`` once per concept (one concept per call): the same work from the
  same draws as ``reference``.
* ``cpebench`` — ``ACE().erase`` on all K concepts at once, as the benchmark runs it: the concepts share one
  retain set and its images, stage 1 batches all rows of all concepts, stage 2 trains each concept's gates
  with its own optimiser (the concepts take turns, ``steps`` × K steps in all).

The reference draws everything cpebench draws, from the same seeded CPU generators in the same order (the
image prompts, the image noise, the statistics noise, per stage-2 step the prompt, image, t and ε), so
``reference`` and ``cpebench-single`` should reach the same gates: gate rel. diff is ‖g − g_ref‖ / ‖g_ref‖
over all 16 layers (worst concept). ``cpebench`` with K > 1 calibrates its masks on the shared retain set
and draws differently, so its diff is the scale of a different result, not an error. Every run reports its
mean stage-2 loss and its seconds per stage (prompts and mask / data images / stage 1 / stage 2). The
trainer has no autocast option (ACE trains in fp32), so there is no ``--autocast`` here. Absolute figures
mean something only on a GPU with SD-1.4's shapes (``--model random-sd14``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from perf_args import apply_threads, chosen_runs

from baselines import ace as A

RUNS = ("reference", "cpebench-single", "cpebench")
SETTINGS = {"reference": "spec algorithm, plain: 1 concept at a time, batch 1, fp32, no caching",
            "cpebench-single": "ACE().erase, one concept per call", "cpebench": "ACE().erase, all concepts in one call"}
STAGES = ("prompts_and_mask", "data_images", "stage1_closed_form", "stage2_finetune")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# =========================================================================== the spec's algorithm, plainly


def heads_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ/√d_h) V per head, heads concatenated back: [B, N, d]."""
    b, h = q.shape[0], attn.heads
    split = lambda x: x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, -1, q.shape[-1])


@dataclasses.dataclass
class RefState:
    """What the reference's attn2 processors read, set before every UNet pass."""

    gate_keys: bool
    mask: torch.Tensor | None = None          # [B, 77]: stage 2, gates on; stage 1, the row's own mask
    gates: dict | None = None                 # stage 2: layer -> g [d] (Parameters); stage 1: previous solution
    stats: dict | None = None                 # stage 1: layer -> [3, d] float64 sums (num, den, qdo)
    neutral: torch.Tensor | None = None       # stage 1: the neutral prompt's embedding [1, 77, D]


class RefCrossAttention:
    """An SD-1.x attn2 processor written out. Stage 2: K, V ⊙ (1 − m gᵀ) on the masked rows. Stage 1: the
    layer's output is left as it is, and the closed form's sums are accumulated from its queries."""

    def __init__(self, layer: str, state: RefState):
        self.layer, self.state = layer, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        st = self.state
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if st.stats is None and st.mask is not None:          # stage 2, gated pass
            factor = 1.0 - st.mask[..., None] * st.gates[self.layer]
            k, v = (k * factor if st.gate_keys else k), v * factor
        out = heads_attention(attn, q, k, v)
        if st.stats is not None:                              # stage 1 statistics (spec §3.3)
            with torch.no_grad():
                m = st.mask[..., None]
                k_c = k
                if st.gates is not None and st.gate_keys:     # cf_iters > 1: the previous gates on the key path
                    k_c = k * (1.0 - m * st.gates[self.layer])
                o_c = heads_attention(attn, q, k_c, v)
                b = heads_attention(attn, q, k_c, m * v)
                o_n = heads_attention(attn, q, attn.to_k(st.neutral), attn.to_v(st.neutral))
                delta = o_c - o_n
                st.stats[self.layer] += torch.stack([(b * delta).sum((0, 1)), (b * b).sum((0, 1)),
                                                     (q * delta).sum((0, 1))]).double()
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@contextlib.contextmanager
def reference_processors(unet, state: RefState):
    original = unet.attn_processors
    names = [k.removesuffix(".processor") for k in original if k.endswith("attn2.processor")]
    unet.set_attn_processor({k: RefCrossAttention(k.removesuffix(".processor"), state) if k.endswith("attn2.processor")
                             else p for k, p in original.items()})
    try:
        yield names
    finally:
        unet.set_attn_processor(original)


def encode(pipe, text: str) -> torch.Tensor:
    from cpebench.models import text_embeddings

    with torch.no_grad():
        return text_embeddings(pipe, [text]).float()


def mask_of(pipe, mask: A.TokenMask, text: str, emb: torch.Tensor) -> torch.Tensor:
    """The concept's m [1, 77] for one prompt (m = max(m_lex, m_sem), EOS rule), computed afresh."""
    ids, lengths = A.tokenize(pipe.tokenizer, [text])
    return mask(emb, ids.to(emb.device), lengths.to(emb.device))[:, 0]


@torch.no_grad()
def ref_images(pipe, prompts: list[str], hp: A.Hparams, seed: int, device) -> torch.Tensor:
    """x_0 of each prompt from the unedited model, one image at a time: [n, c, h, w]."""
    from cpebench.engine import make_scheduler

    unet = pipe.unet
    noise = torch.randn((len(prompts), *A.latent_shape(pipe, hp)), generator=torch.Generator().manual_seed(seed))
    out = []
    for i, p in enumerate(prompts):
        context = torch.cat([encode(pipe, ""), encode(pipe, p)])
        sched = make_scheduler(hp.data_scheduler, pipe.scheduler.config)
        sched.set_timesteps(hp.data_steps)
        x = noise[i : i + 1].to(device) * sched.init_noise_sigma
        for t in sched.timesteps:
            e_u, e_c = unet(sched.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=context).sample.chunk(2)
            x = sched.step(e_u + hp.data_guidance * (e_c - e_u), t, x).prev_sample
        if hp.vae_roundtrip:          # the spec's "VAE latents of the generated images" (the 8-bit picture)
            vae, sf = pipe.vae, pipe.vae.config.scaling_factor
            pixels = ((vae.decode(x / sf).sample.float() / 2 + 0.5).clamp(0, 1) * 255).round()
            x = vae.encode(pixels / 127.5 - 1).latent_dist.mean * sf
        out.append(x[0].float())
    return torch.stack(out)


@torch.no_grad()
def ref_stage1(pipe, mask, prompts, targets, latents, abar, hp: A.Hparams, device) -> dict:
    """The closed-form gates, one (image, timestep) row per UNet pass."""
    unet = pipe.unet
    eps = torch.randn((1, *latents.shape), generator=torch.Generator().manual_seed(A.seed_for(hp.seed, "stats-noise")))[0]
    timesteps = [int((k + 0.5) * len(abar) / hp.stats_timesteps) for k in range(hp.stats_timesteps)]
    state = RefState(hp.gate_keys)
    gates = None
    with reference_processors(unet, state) as names:
        for _ in range(hp.cf_iters):
            widths = {n: unet.get_submodule(n).to_v.out_features for n in names}
            state.stats = {n: torch.zeros(3, widths[n], dtype=torch.float64, device=device) for n in names}
            state.gates = gates
            for i in range(latents.shape[0]):
                for t in timesteps:
                    emb = encode(pipe, prompts[i])                  # no caching: encoded for every pass
                    state.neutral = encode(pipe, targets[i])
                    state.mask = mask_of(pipe, mask, prompts[i], emb)
                    a = abar[t]
                    x = (a.sqrt() * latents[i] + (1 - a).sqrt() * eps[i].to(device))[None]
                    unet(x, torch.tensor([t], device=device), encoder_hidden_states=emb)
            gates = {}
            for n, (num, den, qdo) in state.stats.items():        # per channel, spec §3.3
                if hp.cf_mode == "diag_q":
                    top = qdo.abs().max()
                    g = hp.alpha * qdo / top if top > 0 else torch.zeros_like(qdo)
                else:
                    total = den + hp.lambda_rel * den.mean()
                    g = torch.where(total > 0, hp.alpha * num / total.clamp_min(1e-300), torch.zeros_like(num))
                gates[n] = g.clamp(0.0, 1.0).float()
    return gates


def ref_stage2(pipe, mask, per: A.ConceptPrompts, retain: list[str], concept_latents, retain_latents, gates0: dict,
               abar, hp: A.Hparams, device) -> tuple[dict, list]:
    """Adam on the gates, ε-matching, every row its own batch of 1. Returns (gates, losses)."""
    unet = pipe.unet
    gen = torch.Generator().manual_seed(hp.seed)
    gates = {n: torch.nn.Parameter(g.detach().clone().to(device)) for n, g in gates0.items()}
    opt = torch.optim.Adam(list(gates.values()), lr=hp.lr, betas=(hp.beta1, hp.beta2))
    state = RefState(hp.gate_keys, gates=gates)
    losses = []
    with reference_processors(unet, state):
        for _ in range(hp.steps):
            rows = []                                              # (prompt, target text, x_0), drawn in cpebench's order
            for _ in range(hp.erase_batch):
                adv = len(per.adversarial) > 0 and float(torch.rand((), generator=gen)) < hp.adv_prob
                pool = per.adversarial if adv else per.erase
                pair = pool[int(torch.randint(len(pool), (), generator=gen))]
                rows.append((pair.prompt, pair.target,
                             concept_latents[int(torch.randint(concept_latents.shape[0], (), generator=gen))]))
            for _ in range(hp.retain_batch if retain else 0):
                r = retain[int(torch.randint(len(retain), (), generator=gen))]
                rows.append((r, r, retain_latents[int(torch.randint(retain_latents.shape[0], (), generator=gen))]))
            t = torch.randint(len(abar), (len(rows),), generator=gen)
            noise = torch.randn((len(rows), *rows[0][2].shape), generator=gen)
            erase, keep = [], []
            for j, (prompt, target, x0) in enumerate(rows):
                a = abar[t[j]]
                x = (a.sqrt() * x0 + (1 - a).sqrt() * noise[j].to(device))[None]
                tj = t[j : j + 1].to(device)
                emb_p, emb_t = encode(pipe, prompt), encode(pipe, target)   # no caching: every step
                with torch.no_grad():
                    state.mask = None                              # the frozen model
                    eps_target = unet(x, tj, encoder_hidden_states=emb_t).sample
                state.mask = mask_of(pipe, mask, prompt, emb_p)
                try:
                    pred = unet(x, tj, encoder_hidden_states=emb_p).sample
                finally:
                    state.mask = None
                (erase if j < hp.erase_batch else keep).append(F.mse_loss(pred, eps_target))
            loss = torch.stack(erase).mean()
            if keep:
                loss = loss + hp.lambda_p * torch.stack(keep).mean()
            opt.zero_grad()
            loss.backward()
            if hp.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(gates.values()), hp.grad_clip)
            opt.step()
            with torch.no_grad():
                for g in gates.values():
                    g.clamp_(0.0, 1.0)
            losses.append(float(loss.detach()))
    return {n: g.detach().cpu().clone() for n, g in gates.items()}, losses


def reference_concept(pipe, name: str, hp: A.Hparams, templates: list[str], data_dir, device, seconds: dict):
    """The whole erase of one concept. Returns (gates {layer: [d]}, stage-2 losses); adds to ``seconds``."""
    mark = time.perf_counter()
    per = A.concept_prompts([name], hp, templates)[0]             # prompts, retain set, mask: baselines.ace's definitions
    retain = A.retain_prompts(pipe, [name], hp, templates, data_dir, device)
    pairs = per.erase + per.adversarial
    bank = A.TextBank.of(pipe, [p.prompt for p in pairs] + [p.target for p in pairs] + retain, device)
    sequences = []
    for v in [name] + per.variants:
        ids = A.sequence_ids(pipe.tokenizer, v)
        if ids and ids not in sequences:
            sequences.append(ids)
    proto, tau, temp, sem, _ = A.calibrate(bank, sequences, [0] * len(sequences), [bank.index([p.prompt for p in pairs])],
                                           bank.index(retain), 1, hp)
    mask = A.TokenMask(sequences, [0] * len(sequences), proto, tau, temp, sem, hp.gate_eos).to(device)
    gen = torch.Generator().manual_seed(A.seed_for(hp.seed, "prompts"))
    image_prompts = [per.erase[i].prompt for i in A.pick(len(per.erase), hp.n_images, gen)]
    image_targets = [next(p.target for p in per.erase if p.prompt == q) for q in image_prompts]
    retain_image_prompts = [retain[i] for i in A.pick(len(retain), hp.n_images, gen)] if retain else []
    sync(device)
    seconds["prompts_and_mask"] += time.perf_counter() - mark

    mark = time.perf_counter()
    concept_latents = ref_images(pipe, image_prompts, hp, A.seed_for(hp.seed, "images", name), device)
    retain_latents = (ref_images(pipe, retain_image_prompts, hp, A.seed_for(hp.seed, "retain-images"), device)
                      if retain else None)
    sync(device)
    seconds["data_images"] += time.perf_counter() - mark

    abar = A.alphas_cumprod(pipe).to(device)
    mark = time.perf_counter()
    gates0 = ref_stage1(pipe, mask, image_prompts, image_targets, concept_latents, abar, hp, device)
    sync(device)
    seconds["stage1_closed_form"] += time.perf_counter() - mark

    mark = time.perf_counter()
    gates, losses = ref_stage2(pipe, mask, per, retain, concept_latents, retain_latents, gates0, abar, hp, device)
    sync(device)
    seconds["stage2_finetune"] += time.perf_counter() - mark
    return gates, losses


def reference_run(pipe, names, hp: A.Hparams, data_dir, device) -> tuple[float, dict, list, list]:
    from cpebench.methods.common import text_list

    templates = text_list("ace", hp.templates, "templates", data_dir, blanks=False)
    seconds = dict.fromkeys(STAGES, 0.0)
    sync(device)
    t0 = time.perf_counter()
    out = [reference_concept(pipe, n, hp, templates, data_dir, device, seconds) for n in names]
    sync(device)
    return time.perf_counter() - t0, seconds, [g for g, _ in out], [x for _, ls in out for x in ls]


# =========================================================================== cpebench's runs


@contextlib.contextmanager
def recorded_losses(store: list):
    """GateTrainer.step wrapped to keep every stage-2 loss (the artifact keeps means per 50 steps)."""
    original = A.GateTrainer.step

    def step(self):
        out = original(self)
        store.append(out)
        return out

    A.GateTrainer.step = step
    try:
        yield
    finally:
        A.GateTrainer.step = original


def cpebench_run(pipe, groups: list[list[str]], hparams: dict, data_dir, device) -> tuple[float, dict, list, list]:
    """ACE().erase once per group of concepts: (seconds, summed stage seconds, per concept gates, losses)."""
    from cpebench.methods import Concept, EraseContext

    seconds = dict.fromkeys(STAGES, 0.0)
    gates, losses = [], []
    with recorded_losses(losses):
        sync(device)
        t0 = time.perf_counter()
        for names in groups:
            art = A.ACE().erase(pipe, [Concept(n) for n in names], hparams,
                                EraseContext(device=str(device), data_dir=data_dir, progress=False))
            for k, v in art.metadata["stage_seconds"].items():
                seconds[k] = seconds.get(k, 0.0) + v
            layers = [k.removeprefix("gate.") for k in art.tensors if k.startswith("gate.")]
            gates += [{n: art.tensors[f"gate.{n}"][c].clone() for n in layers} for c in range(len(names))]
        sync(device)
        total = time.perf_counter() - t0
    return total, seconds, gates, losses


def gate_rel(run: dict, ref: dict) -> float:
    num = sum(float(((run[n].double() - g.double()) ** 2).sum()) for n, g in ref.items())
    den = sum(float((g.double() ** 2).sum()) for g in ref.values())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


# =========================================================================== main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | random-sd14 (SD-1.4 shapes, random weights) | hub id | dir")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--task", default="celebrity")
    ap.add_argument("--concepts", type=int, default=2, help="the task's first K concepts")
    ap.add_argument("--steps", type=int, default=20, help="stage-2 steps per concept (spec: 200)")
    ap.add_argument("--images", type=int, default=None, help="n_images (default: the preset's / task's)")
    ap.add_argument("--data-steps", type=int, default=None, help="data_steps (default: the preset's / task's)")
    ap.add_argument("--stats-timesteps", type=int, default=None, help="stats_timesteps (default: the preset's / task's)")
    ap.add_argument("--resolution", type=int, default=None, help="image size (default: the preset's / the model's)")
    ap.add_argument("--preset", default=None, help="hparams of this preset (default: smoke for --model tiny, else none)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more hparams, e.g. adv_prob=1")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    ap.add_argument("--data-dir", default=None, help="data files (default: $CPEBENCH_DATA, then the cache)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed stage-2 steps of a one-concept erase first (0: none)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    apply_threads(args)
    runs = chosen_runs(ap, args.runs, RUNS)

    from cpebench import config, runner
    from cpebench.models import load_pipeline

    preset = args.preset if args.preset is not None else ("smoke" if args.model == "tiny" else None)
    explicit = {"steps": args.steps, "n_images": args.images, "data_steps": args.data_steps,
                "stats_timesteps": args.stats_timesteps, "resolution": args.resolution}
    overrides = [f"hparams.{k}={v}" for k, v in explicit.items() if v is not None] + [f"hparams.{kv}" for kv in args.set]
    cfg = config.resolve_run("ace", args.task, preset=preset or None, overrides=overrides)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, prompts="full", data_dir=args.data_dir))
    names = runner.task_concepts(cfg)[: args.concepts]
    hparams = dict(cfg.hparams)
    hp = A.Hparams.from_dict(hparams)
    if hp.train_mask:
        ap.error("the reference trains the gates only: run with train_mask=false (the default)")
    device = torch.device(args.device)
    pipe = load_pipeline(args.model, device=args.device).pipe
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    shape = A.latent_shape(pipe, hp)
    print(f"ACE (cpebench reconstruction, spec v1) model={args.model} device={where} torch={torch.__version__} "
          f"task={args.task} concepts={names} steps={hp.steps}/concept images={hp.n_images}+{hp.n_images} "
          f"({shape[1] * 2 ** (len(pipe.vae.config.block_out_channels) - 1)}², {hp.data_scheduler} {hp.data_steps} steps) "
          f"stats_timesteps={hp.stats_timesteps} batch={hp.erase_batch}+{hp.retain_batch}"
          + (f" preset={preset}" if preset else ""), flush=True)

    if args.warmup:   # kernels, allocator, tokenizer caches: a short erase of one concept of each kind, untimed
        short = A.Hparams.from_dict({**hparams, "steps": args.warmup})
        if "reference" in runs:
            reference_run(pipe, names[:1], short, args.data_dir, device)
        if any(r.startswith("cpebench") for r in runs):
            cpebench_run(pipe, [names[:1]], {**hparams, "steps": args.warmup}, args.data_dir, device)

    results = {}
    for run in runs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if run == "reference":
            out = reference_run(pipe, names, hp, args.data_dir, device)
        else:
            groups = [[n] for n in names] if run == "cpebench-single" else [names]
            out = cpebench_run(pipe, groups, hparams, args.data_dir, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        print(f"  {run:<16} {out[0]:8.2f} s", file=sys.stderr, flush=True)
        results[run] = (*out, peak)

    ref = results.get("reference")
    rows = []
    for run, (seconds, stages, gates, losses, peak) in results.items():
        rows.append({"run": run, "setting": SETTINGS[run], "seconds": seconds, "s_per_concept": seconds / len(names),
                     "stage_seconds_per_concept": {k: v / len(names) for k, v in stages.items()},
                     "s_per_step": stages["stage2_finetune"] / (hp.steps * len(names)),
                     "speedup": ref[0] / seconds if ref else None,
                     "stage2_speedup": ref[1]["stage2_finetune"] / stages["stage2_finetune"] if ref else None,
                     "mean_loss": sum(losses) / len(losses) if losses else None,
                     "gate_rel_diff": max(gate_rel(g, r) for g, r in zip(gates, ref[2])) if ref and run != "reference" else None,
                     "peak_gib": peak})
    if device.type == "cpu":
        print(f"load average at the end {os.getloadavg()[0]:.1f} (other jobs on the machine slow every run)")
    print("\n| run | s/concept | prompts+mask / images / stage 1 / stage 2 s per concept | stage 2 s/step | speed-up "
          "(all / stage 2) | mean loss | gate rel. diff | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = " / ".join(f"{r['stage_seconds_per_concept'].get(k, 0.0):.2f}" for k in STAGES)
        speed = "–" if r["speedup"] is None else f"{r['speedup']:.2f}× / {r['stage2_speedup']:.2f}×"
        print(f"| {r['run']} | {r['s_per_concept']:.2f} | {st} | {r['s_per_step']:.4f} | {speed} | "
              f"{'–' if r['mean_loss'] is None else format(r['mean_loss'], '.4g')} | "
              f"{'–' if r['gate_rel_diff'] is None else format(r['gate_rel_diff'], '.1e')} | "
              f"{'–' if r['peak_gib'] is None else format(r['peak_gib'], '.1f')} |")
    print("(gate rel. diff: ‖g − g_ref‖/‖g_ref‖, worst concept; 'cpebench' trains all concepts jointly on a shared "
          "retain set: its diff is the scale of another result)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": where, "concepts": names,
                                               "hparams": dataclasses.asdict(hp), "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
