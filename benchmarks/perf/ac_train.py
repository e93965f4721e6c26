"""AC speed, anchors and training: the paper code (CompVis) vs cpebench's AC, in the same run.

    python benchmarks/perf/ac_train.py                 # CPU smoke: tiny, 40 anchors x 20 DDIM steps, 4 steps x 8 (~30 s)
    python benchmarks/perf/ac_train.py --model random-sd14 --device cuda \
        --anchors 20 --anchor-steps 50 --steps 10          # GPU: SD-1.4 shapes, anchors under fp16 autocast

The artist recipe of benchmarks/methods/ac.yaml (the paper's style recipe: painting.txt captions, DDIM η 1,
CFG 6, the 32 attn2 K/V weights, model-based loss, lr 1.6e-5, batch 8, no augmentation, no clipping) for
one artist, with fewer anchors, sampler steps and training steps than the paper's 1,000 x 200 and 100
(the first ``--anchors`` captions, one image each; at 1,000 all 200 captions x 5 as the paper). Anchors
and training are timed apart; the estimates scale each to the paper's schedule.

* ``official`` — nupurkmr9/concept-ablation@c11fb1b ``compvis/`` restated in diffusers, independent of
  baselines/ac.py (docs/methods/ac.md). Attention everywhere is CompVis' einsum/softmax, and every
  cross-attention applies Custom Diffusion's modifier (k = m·k + (1 − m)·k.detach(), the same for v), also
  while sampling (``--official-attention sdpa``: torch's fused kernel instead).
  Anchors (src/utils.py ``sample``): all n images (not only those the training draws), in batches of 10
  (``--official-anchor-batch``); "" and the captions are text-encoded per batch; DDIM with one UNet call
  on [uc; c] per step; all under ``autocast("cuda")``, i.e. fp16 on a GPU and nothing on a CPU
  (``--autocast``); VAE decode; conversion to uint8 by truncation. The PNG files are not written.
  Training (src/model.py, train.py): the paper's 2 GPUs x 4 run one after the other on one device (two
  micro-batches of 4, each loss halved: DDP's gradient mean; ``--official-micro-batch``). Per
  micro-batch: VAE encode, both prompts text-encoded, ε_θ(z_t, p), then the target ε_θ(z_t, a) with
  autograd on (``p_losses`` detaches it only after the forward), the masked loss and the vlb term of
  weight 0 (its weights taken as 1); then AdamW (torch defaults) on the 32 K/V weights. The step-100
  checkpoint is not written.
* ``cpebench`` — ``AC().erase`` (anchors: only the images the training draws, batches of
  ``anchor_batch_size``, the pipeline's attention; training: one batch of 8, the target under no_grad,
  the BOS cut as a K/V edit). The anchor cache is off, so every run makes its anchors.

Both runs give image i the same per-image CPU generator (``baselines.ac.image_seed``: initial and η
noise; the official code uses the global RNG) and draw the training samples in cpebench's order (the
draw plan from ``seed``, then per sample flip and template from ``seed + 1``, then VAE noise, ε, t), so
they do the same work. Their anchors still differ by rounding (attention kernel, truncation vs
rounding to uint8: ``anchor_px_diff``, mean |Δ| in 0-255 over the common images), and so do the trained
K/V: ``result_diff`` = ‖W − W_official‖ / ‖W_official − W_base‖; ``result_diff_same_anchors`` is the same
ratio against the official training loop run again (untimed) on cpebench's anchors, which isolates the
training loops from the anchors (``--no-same-anchors-check`` skips it). Each run is preceded by an untimed
warm-up (2 anchors x 2 steps, 1 training step). Absolute figures mean something only on a GPU with
SD-1.4's shapes (``random-sd14``: random weights).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from perf_args import chosen_runs

from baselines import ac
from cpebench.config import load_method_config
from cpebench.methods import Concept, EraseContext
from cpebench.models import load_pipeline, text_embeddings

PAPER_ANCHORS, PAPER_ANCHOR_STEPS, PAPER_STEPS, PAPER_BATCH = 1000, 200, 100, 8


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autocast(kind: str, device):
    if kind == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.float16 if kind == "fp16" else torch.bfloat16)


# =========================================================================== the paper code, restated


class CompVisAttention:
    """CompVis' CrossAttention.forward as AC replaces it (src/model.py ``new_forward``)."""

    def __init__(self, attention: str):
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        q, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if cross:     # token 0's K/V pass no gradient: a full mask multiply, sampling included
            m = torch.ones_like(key)
            m[:, :1, :] = m[:, :1, :] * 0.0
            key = m * key + (1 - m) * key.detach()
            value = m * value + (1 - m) * value.detach()
        if self.attention == "classic":
            q, key, value = (attn.head_to_batch_dim(x) for x in (q, key, value))
            probs = (torch.einsum("bid,bjd->bij", q, key) * attn.scale).softmax(dim=-1)
            out = attn.batch_to_head_dim(torch.einsum("bij,bjd->bid", probs, value))
        else:
            b, h = q.shape[0], attn.heads
            q, key, value = (x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2) for x in (q, key, value))
            out = F.scaled_dot_product_attention(q, key, value).transpose(1, 2).reshape(b, -1, h * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def compvis_attention(unet, attention: str):
    original = unet.attn_processors
    unet.set_attn_processor(CompVisAttention(attention))
    try:
        yield
    finally:
        unet.set_attn_processor(original)


@torch.no_grad()
def official_anchors(pipe, unet, captions, hp: ac.Hparams, size: int, kind: str, batch: int, attention: str) -> dict:
    """src/utils.py ``sample``: every anchor image, uint8 [H, W, 3] by index."""
    from diffusers import DDIMScheduler

    device = unet.device
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (unet.config.in_channels, size // f, size // f)
    sched = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    images = {}
    with autocast(kind, device), compvis_attention(unet, attention):
        for start in range(0, len(captions), batch):
            index = list(range(start, min(len(captions), start + batch)))
            gens = [torch.Generator().manual_seed(ac.image_seed(hp.anchor_seed, i)) for i in index]
            noise = lambda: torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)  # noqa: E731
            uc = text_embeddings(pipe, [""] * len(index))            # per batch, as sample() does
            c = text_embeddings(pipe, [captions[i] for i in index])
            context = torch.cat([uc, c])
            sched.set_timesteps(hp.anchor_steps)
            x = noise()
            for t in sched.timesteps:
                e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.float().chunk(2)
                eps = e_u + hp.anchor_guidance * (e_c - e_u)
                x = sched.step(eps, t, x, eta=hp.anchor_eta, variance_noise=noise()).prev_sample
            pixels = pipe.vae.decode(x / 0.18215).sample.float()
            pixels = ((pixels + 1.0) / 2.0).clamp(0, 1).cpu()
            for i, img in zip(index, (255.0 * pixels).permute(0, 2, 3, 1).to(torch.uint8)):   # astype(uint8)
                images[i] = img
    return images


def draw_order(n: int, draws: int, seed: int) -> tuple[list[int], list[int]]:
    """The images a shuffling loader hands out (cpebench's plan, restated): a fixed image shuffle, then
    epochs of random permutations of the dataset indices."""
    g = torch.Generator().manual_seed(seed)
    shuffle = torch.randperm(n, generator=g).tolist()
    plan: list[int] = []
    while len(plan) < draws:
        plan += torch.randperm(n, generator=g).tolist()
    return plan[:draws], shuffle


def styled_prompt(a: str, name: str, g: torch.Generator) -> str:
    """src/finetune_data.py ``get_styled_prompt``: one of three templates, the name doubled w.p. 1/2."""
    r = int(torch.randint(3, (1,), generator=g))
    if int(torch.randint(2, (1,), generator=g)) == 0:
        name = f"{name} {name}"
    return (f"{a}, in the style of {name}", f"{name} inspired painting, {a}", f"in {name}'s style, {a}")[r]


def official_train(pipe, unet, anchors: dict, captions, name: str, hp: ac.Hparams, micro: int, attention: str
                   ) -> list[float]:
    """src/model.py training_step / p_losses on the CompVis style data (no augmentation): trains the 32 K/V
    weights of ``unet`` in place, returns the losses."""
    from diffusers import DDPMScheduler

    device = unet.device
    trained = [p for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]
    unet.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=hp.lr)                  # torch defaults: wd 0.01, no clipping
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    b = hp.batch_size
    plan, shuffle = draw_order(len(captions), hp.max_steps * b, hp.seed)
    g = torch.Generator().manual_seed(hp.seed + 1)
    ranks = max(1, b // micro)
    losses = []
    with compvis_attention(unet, attention):
        for step in range(hp.max_steps):
            pixels, prompts, anchor_captions = [], [], []
            for i in (shuffle[d] for d in plan[step * b : (step + 1) * b]):
                img = anchors[i].permute(2, 0, 1).float()
                if hp.hflip and float(torch.rand((), generator=g)) < 0.5:
                    img = img.flip(-1)
                a = captions[i].strip()
                pixels.append(img / 127.5 - 1.0), anchor_captions.append(a), prompts.append(styled_prompt(a, name, g))
            lat = (b, unet.config.in_channels, pixels[0].shape[1] // f, pixels[0].shape[2] // f)
            latent_noise, noise = torch.randn(lat, generator=g), torch.randn(lat, generator=g)
            t = torch.randint(ddpm.config.num_train_timesteps, (b,), generator=g)
            mask = torch.ones(b, 1, lat[2], lat[3], device=device)   # no augmentation: the whole image
            opt.zero_grad(set_to_none=False)
            total = 0.0
            for r in range(ranks):                              # one DDP rank after the other
                sl = slice(r * b // ranks, (r + 1) * b // ranks)
                with torch.no_grad():
                    dist = pipe.vae.encode(torch.stack(pixels[sl]).to(device)).latent_dist
                    z0 = (dist.mean + dist.std * latent_noise[sl].to(device)) * 0.18215
                    c_p = text_embeddings(pipe, prompts[sl])
                    c_a = text_embeddings(pipe, anchor_captions[sl])
                tt = t[sl].to(device)
                zt = ddpm.add_noise(z0, noise[sl].to(device), tt)
                pred = unet(zt, tt, encoder_hidden_states=c_p).sample
                target = unet(zt, tt, encoder_hidden_states=c_a).sample.detach()   # built with autograd on
                m = mask[sl]
                simple = (F.mse_loss(pred, target, reduction="none") * m).sum([1, 2, 3]) / m.sum([1, 2, 3])
                vlb = (F.mse_loss(pred, target, reduction="none") * m).sum([1, 2, 3]) / m.sum([1, 2, 3])
                loss = simple.mean() + 0.0 * vlb.mean()          # l_simple_weight 1, logvar 0, elbo weight 0
                (loss / ranks).backward()                       # DDP: the ranks' gradients averaged
                total += loss.item() / ranks
            opt.step()
            losses.append(total)
    unet.requires_grad_(False)
    return losses


def official_run(pipe, captions, name: str, hp: ac.Hparams, size: int, kind: str, batch: int, micro: int,
                 attention: str) -> dict:
    device = pipe.unet.device
    unet = copy.deepcopy(pipe.unet).float()                     # the paper code loads its own model
    sync(device)
    start = time.perf_counter()
    anchors = official_anchors(pipe, unet, captions, hp, size, kind, batch, attention)
    sync(device)
    anchor_seconds = time.perf_counter() - start
    start = time.perf_counter()
    losses = official_train(pipe, unet, anchors, captions, name, hp, micro, attention)
    sync(device)
    train_seconds = time.perf_counter() - start
    weights = {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n}
    return {"anchors": anchors, "generated": len(anchors), "anchor_seconds": anchor_seconds, "train_seconds": train_seconds,
            "losses": losses, "weights": weights}


# =========================================================================== cpebench


@contextlib.contextmanager
def keep_anchors(store: dict):
    """``ac.anchor_images`` still runs as the erase calls it; the images it returns are kept here."""
    original = ac.anchor_images

    def anchor_images(*args, **kwargs):
        images, record = original(*args, **kwargs)
        store.update(images)
        return images, record

    ac.anchor_images = anchor_images
    try:
        yield
    finally:
        ac.anchor_images = original


def cpebench_run(pipe, name: str, hparams: dict) -> dict:
    device = pipe.unet.device
    store: dict = {}
    sync(device)
    start = time.perf_counter()
    with keep_anchors(store):
        artifact = ac.AC().erase(pipe, [Concept(name)], hparams, EraseContext(device=str(device), progress=False))
    sync(device)
    wall = time.perf_counter() - start
    meta = artifact.metadata["ac"]
    train = meta["train"]
    curve, steps = train["loss_mean_per_10"], train["steps"]
    sizes = [min(10, steps - 10 * i) for i in range(len(curve))]   # the last chunk may be short
    return {"anchors": store, "generated": meta["anchors"]["generated"], "anchor_seconds": meta["anchors"]["seconds"],
            "train_seconds": train["seconds"], "wall_seconds": wall,
            "mean_loss": sum(m * s for m, s in zip(curve, sizes)) / sum(sizes), "weights": artifact.tensors}


# =========================================================================== main


def captions_for(all_captions: list[str], n: int) -> list[str]:
    """One image per caption below 200 images; above, each of the 200 repeated n/200 times (the paper's
    assert on divisibility)."""
    if n < len(all_captions):
        return list(all_captions[:n])
    if n % len(all_captions):
        raise SystemExit(f"--anchors: below {len(all_captions)} or a multiple of it (the paper's rule), got {n}")
    return [c for c in all_captions for _ in range(n // len(all_captions))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | random-sd14 (SD-1.4 shapes, random weights) | hub id | dir")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concept", default="Van Gogh")
    ap.add_argument("--anchors", type=int, default=40, help="anchor images (paper 1,000)")
    ap.add_argument("--anchor-steps", type=int, default=20, help="DDIM steps per anchor (paper 200)")
    ap.add_argument("--steps", type=int, default=4, help="training steps (paper 100)")
    ap.add_argument("--batch-size", type=int, default=PAPER_BATCH, help="samples per step (paper 2 GPUs x 4)")
    ap.add_argument("--official-micro-batch", type=int, default=4, help="the paper's per-GPU batch")
    ap.add_argument("--official-anchor-batch", type=int, default=10, help="the paper's sampling batch (n_samples)")
    ap.add_argument("--anchor-batch", type=int, default=None, help="cpebench's anchor_batch_size (default 32)")
    ap.add_argument("--autocast", default=None, choices=["none", "fp16", "bf16"],
                    help="anchor sampling precision of both runs (default: fp16 on CUDA, as autocast('cuda'); none on a CPU)")
    ap.add_argument("--resolution", type=int, default=None, help="default: the UNet's sample size x the VAE factor")
    ap.add_argument("--official-attention", default="classic", choices=["classic", "sdpa"],
                    help="the paper loop's attention: classic = CompVis' einsum/softmax (as the paper code)")
    ap.add_argument("--no-same-anchors-check", dest="same_anchors_check", action="store_false",
                    help="skip the untimed official training on cpebench's anchors (result_diff_same_anchors)")
    ap.add_argument("--runs", default="official,cpebench", help="comma-separated subset of official,cpebench")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    runs = chosen_runs(ap, args.runs, ("official", "cpebench"))
    cuda = torch.device(args.device).type == "cuda"
    kind = args.autocast or ("fp16" if cuda else "none")
    pipe = load_pipeline(args.model, device=args.device).pipe
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = args.resolution or pipe.unet.config.sample_size * factor
    method = load_method_config("ac")
    recipe = {**method.hparams, **method.tasks["artist"]}        # the paper's CompVis style recipe
    captions = captions_for(list(recipe["anchor_captions"]), args.anchors)

    def settings(n: int, anchor_steps: int, steps: int) -> dict:
        caps = captions[:n]
        extra = {"anchor_batch_size": args.anchor_batch} if args.anchor_batch else {}
        return {**recipe, "anchor_captions": caps, "n_anchor_images": len(caps), "caption_order": "repeat",
                "anchor_steps": anchor_steps, "max_steps": steps, "batch_size": args.batch_size,
                "anchor_autocast": kind, "anchor_cache": False, "resolution": size, **extra}

    full = settings(len(captions), args.anchor_steps, args.steps)
    hp = ac.Hparams.from_dict(full)
    if hp.concept_type != "style" or hp.augment or hp.regularization != "none" or hp.parameter_group != "cross-attn":
        raise SystemExit("the official restatement covers the paper's style recipe only (benchmarks/methods/ac.yaml artist)")
    where = torch.cuda.get_device_name(args.device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"AC model={args.model} device={where} torch={torch.__version__} concept={args.concept!r} "
          f"anchors={len(captions)}x{hp.anchor_steps} DDIM steps at {size}² (autocast {kind}) train={hp.max_steps} steps "
          f"x batch {hp.batch_size} (official: micro-batches of {args.official_micro_batch}, anchor batch "
          f"{args.official_anchor_batch}, {args.official_attention} attention) "
          f"tf32(matmul/cudnn)={torch.backends.cuda.matmul.allow_tf32}/{torch.backends.cudnn.allow_tf32}")

    def official(h: ac.Hparams, caps) -> dict:
        return official_run(pipe, caps, args.concept, h, size, kind, args.official_anchor_batch,
                            args.official_micro_batch, args.official_attention)

    # warm-up (kernels, allocator): 2 anchors x 2 steps, 1 training step of each kind, untimed
    if "official" in runs:
        official(ac.Hparams.from_dict(settings(2, 2, 1)), captions[:2])
    if "cpebench" in runs:
        cpebench_run(pipe, args.concept, settings(2, 2, 1))

    base = {n: p.detach().cpu().clone() for n, p in pipe.unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n}
    results = {}
    for run in runs:
        if cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
        if run == "official":
            r = official(hp, captions)
            r["mean_loss"] = sum(r["losses"]) / len(r["losses"])
            r["setting"] = (f"paper code: all anchors, batch {args.official_anchor_batch}, {args.official_attention} "
                            f"attention; training {hp.batch_size // args.official_micro_batch}x{args.official_micro_batch}, fp32")
        else:
            r = cpebench_run(pipe, args.concept, full)
            r["setting"] = f"cpebench AC.erase: needed anchors, batch {hp.anchor_batch_size}; one batch of {hp.batch_size}, fp32"
        r["peak_gib"] = torch.cuda.max_memory_allocated(args.device) / 2**30 if cuda else None
        results[run] = r

    ref = results.get("official") or results[runs[0]]
    same = None
    if args.same_anchors_check and {"official", "cpebench"} <= set(results):
        # the official training loop again, untimed, on cpebench's anchors: what is left is the loops' rounding
        unet = copy.deepcopy(pipe.unet).float()
        official_train(pipe, unet, results["cpebench"]["anchors"], captions, args.concept, hp,
                       args.official_micro_batch, args.official_attention)
        w = {n: p.detach().cpu() for n, p in unet.named_parameters() if n in ref["weights"]}
        del unet
        num = sum(float(((results["cpebench"]["weights"].get(n, base[n]) - x) ** 2).sum()) for n, x in w.items())
        den = sum(float(((x - base[n]) ** 2).sum()) for n, x in w.items())
        same = math.sqrt(num / den) if den else float("nan")
    # at the paper's schedule cpebench needs the first 100 x 8 = 800 of the 1,000 anchors; the paper all 1,000
    needed_at_paper = {"official": PAPER_ANCHORS, "cpebench": min(PAPER_ANCHORS, PAPER_STEPS * PAPER_BATCH)}
    rows = []
    for run, r in results.items():
        common = sorted(set(r["anchors"]) & set(ref["anchors"]))
        px = (sum(float((r["anchors"][i].float() - ref["anchors"][i].float()).abs().mean()) for i in common) / len(common)
              if common else None)
        num = sum(float(((r["weights"].get(n, base[n]) - w) ** 2).sum()) for n, w in ref["weights"].items())
        den = sum(float(((w - base[n]) ** 2).sum()) for n, w in ref["weights"].items())
        s_image_step = r["anchor_seconds"] / (r["generated"] * hp.anchor_steps) if r["generated"] else None
        s_step = r["train_seconds"] / hp.max_steps
        anchor_est = (s_image_step or 0.0) * needed_at_paper[run] * PAPER_ANCHOR_STEPS
        rows.append({
            "run": run, "setting": r["setting"], "anchors_generated": r["generated"],
            "anchor_seconds": r["anchor_seconds"], "train_seconds": r["train_seconds"],
            "seconds": r["anchor_seconds"] + r["train_seconds"], "s_per_anchor": r["anchor_seconds"] / max(1, r["generated"]),
            "s_per_anchor_step": s_image_step, "s_per_step": s_step,
            "anchor_speedup": ref["anchor_seconds"] / r["anchor_seconds"] if r["anchor_seconds"] else None,
            "train_speedup": ref["train_seconds"] / r["train_seconds"],
            "speedup": (ref["anchor_seconds"] + ref["train_seconds"]) / (r["anchor_seconds"] + r["train_seconds"]),
            "paper_anchor_seconds_est": anchor_est, "paper_train_seconds_est": s_step * PAPER_STEPS,
            "paper_concept_seconds_est": anchor_est + s_step * PAPER_STEPS,
            "mean_loss": r["mean_loss"], "anchor_px_diff": px,
            "result_diff": math.sqrt(num / den) if den else float("nan"),
            "result_diff_same_anchors": same if run == "cpebench" else None, "peak_gib": r["peak_gib"]})

    print(f"{'run':<9} {'anchors':>7} {'anchor s':>9} {'s/anchor':>9} {'train s':>8} {'s/step':>8} {'anchor ×':>9} "
          f"{'train ×':>8} {'total ×':>8} {'loss':>9} {'Δpx':>6} {'W diff':>9} {'paper est s (anchors + train)':>30}")
    for x in rows:
        px = "-" if x["anchor_px_diff"] is None else f"{x['anchor_px_diff']:.2f}"
        print(f"{x['run']:<9} {x['anchors_generated']:>7} {x['anchor_seconds']:>9.2f} {x['s_per_anchor']:>9.4f} "
              f"{x['train_seconds']:>8.2f} {x['s_per_step']:>8.4f} {x['anchor_speedup'] or 0:>8.2f}x {x['train_speedup']:>7.2f}x "
              f"{x['speedup']:>7.2f}x {x['mean_loss']:>9.4g} {px:>6} {x['result_diff']:>9.2e} "
              f"{x['paper_concept_seconds_est']:>12.0f} ({x['paper_anchor_seconds_est']:.0f} + {x['paper_train_seconds_est']:.0f})")
    print(f"(×: speed-up against {'official' if 'official' in results else runs[0]}; Δpx: mean |Δ| of the common anchors, "
          f"0-255; W diff: ‖W − W_official‖ / ‖W_official − W_base‖; paper est: {PAPER_ANCHORS} anchors (cpebench: the "
          f"{needed_at_paper['cpebench']} drawn) x {PAPER_ANCHOR_STEPS} steps + {PAPER_STEPS} training steps, one concept, "
          "no anchor reuse)")
    if same is not None:
        print(f"W diff of cpebench against the official training loop on cpebench's own anchors: {same:.2e} "
              "(the rest of W diff comes from the anchors)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "device": where, "model": args.model, "concept": args.concept, "anchors": len(captions),
            "anchor_steps": hp.anchor_steps, "steps": hp.max_steps, "batch_size": hp.batch_size, "resolution": size,
            "autocast": kind, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
