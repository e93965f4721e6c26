"""ESD training speed: the paper code's loop vs cpebench's trainer, same seed, same run.

    python benchmarks/perf/esd_train.py                                        # CPU smoke: tiny model, 6 steps
    python benchmarks/perf/esd_train.py --model random-sd14 --device cuda --steps 1000 --autocast fp16
    python benchmarks/perf/esd_train.py --model /path/to/stable-diffusion-v1-4 --device cuda --runs paper,fast

* ``paper`` — a plain restatement of train-esd.py (rohitgandikota/erasing@a2189e9; docs/methods/esd.md) in
  diffusers: two UNets (the trained copy and the frozen original), fp32, batch 1, CompVis' unfused
  attention (``--paper-attention classic``; ``sdpa`` gives it torch's fused kernel), the text encoder run
  for "", c and c again every iteration (plus "" once more for the sampler), x_t sampled with the trained
  UNet by diffusers' DDIMScheduler over timesteps[1:] (981 skipped) with the paper's early break, then
  e_0 and e_p as two batch-1 forwards of the frozen UNet, e_n, MSE, Adam.
* ``fp32`` — cpebench's ESD (``baselines.esd.train``) with the paper's settings.
* ``fast`` — the same with ``autocast`` (``--autocast``, fp16 by default on CUDA).
* ``seed`` — ``fast`` with another seed: the scale of a genuinely different result.

Every run draws (concept, t_enc, t, x_T) in the same order from one CPU generator, so with the same seed
they do the same work and should reach the same weights. Reported: steps/s, seconds for the 1,000-step
schedule, the speed-up over ``paper``, and the result difference from ``paper`` as
``||ε_run − ε_paper|| / ||ε_paper − ε_base||`` (the erased models' noise predictions on fixed probes: the
concept prompt at t = 100, 400, 700, 950) and the same ratio on the trained weights.
Absolute figures mean something only on a GPU with SD-1.4's shapes.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from baselines import esd
from cpebench.methods import EraseContext
from cpebench.models import load_pipeline, text_embeddings


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def paper_loop(pipe, words, hp: esd.Hparams, attention: str = "classic") -> tuple[dict, list, float]:
    """train-esd.py, restated: returns (trained subset tensors, losses, seconds)."""
    from diffusers import DDIMScheduler
    from diffusers.models.attention_processor import AttnProcessor

    device = pipe.unet.device
    model_orig = copy.deepcopy(pipe.unet)                    # frozen (model_orig)
    model = copy.deepcopy(pipe.unet)                         # trained (model)
    if attention == "classic":     # CompVis ldm attention: einsum, softmax, einsum (no fused kernel)
        for m in (model_orig, model):
            m.set_attn_processor(AttnProcessor())
    names = esd.subset_names([n for n, _ in model.named_parameters()], hp.train_method)
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    parameters = [params[n].requires_grad_(True) for n in names]
    opt = torch.optim.Adam(parameters, lr=hp.lr)
    criteria = torch.nn.MSELoss()
    sched = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    S = hp.ddim_steps
    sched.set_timesteps(S)
    timesteps = sched.timesteps[1:]                          # t_start=-1: the sampler skips 981
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = (hp.image_size or pipe.unet.config.sample_size * vae_factor) // vae_factor
    g = torch.Generator().manual_seed(hp.seed)
    losses = []
    sync(device)
    start = time.perf_counter()
    for _ in range(hp.iterations):
        word = words[int(torch.randint(len(words), (1,), generator=g))]
        with torch.no_grad():
            emb_0, emb_p, emb_n = (text_embeddings(pipe, [w]) for w in ("", word, word))
        opt.zero_grad()
        t_enc = int(torch.randint(S, (1,), generator=g))
        og_num, og_num_lim = round(t_enc / S * 1000), round((t_enc + 1) / S * 1000)
        t_ddpm = torch.randint(og_num, og_num_lim, (1,), generator=g).to(device)
        z = torch.randn((1, 4, size, size), generator=g).to(device)
        with torch.no_grad():
            uc = text_embeddings(pipe, [""])                 # sample_model's unconditional embedding
            context = torch.cat([uc, emb_p])
            for i, t in enumerate(timesteps):
                index = len(timesteps) - i - 1
                e_u, e_c = model(torch.cat([z, z]), t, encoder_hidden_states=context).sample.chunk(2)
                z = sched.step(e_u + hp.start_guidance * (e_c - e_u), t, z, eta=0.0).prev_sample
                if index == t_enc - 1:                       # the modified sampler's till_T break
                    break
            e_0 = model_orig(z, t_ddpm, encoder_hidden_states=emb_0).sample
            e_p = model_orig(z, t_ddpm, encoder_hidden_states=emb_p).sample
        e_n = model(z, t_ddpm, encoder_hidden_states=emb_n).sample
        loss = criteria(e_n, e_0 - hp.negative_guidance * (e_p - e_0))
        loss.backward()
        losses.append(loss.item())
        opt.step()
    sync(device)
    seconds = time.perf_counter() - start
    trained = {n: params[n].detach().cpu().clone() for n in names}
    del model, model_orig, opt
    return trained, losses, seconds


def cpebench_run(pipe, words, hp: esd.Hparams, method: str) -> tuple[dict, list, float]:
    sync(pipe.unet.device)
    start = time.perf_counter()
    tensors, meta = esd.train(pipe, words, hp, EraseContext(progress=False), method)
    sync(pipe.unet.device)
    return tensors, meta, time.perf_counter() - start


@torch.no_grad()
def probe(pipe, word, tensors=None) -> torch.Tensor:
    from contextlib import nullcontext

    from cpebench.attention import swapped_weights

    unet = pipe.unet
    g = torch.Generator().manual_seed(1234)
    n = unet.config.sample_size
    x = torch.randn(4, unet.config.in_channels, n, n, generator=g).to(unet.device)
    context = text_embeddings(pipe, [word] * 4)
    with (swapped_weights(unet, tensors) if tensors else nullcontext()):
        return unet(x, torch.tensor([100, 400, 700, 950], device=unet.device), encoder_hidden_states=context).sample.float()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | random-sd14 (SD-1.4 shapes, random weights) | hub id | dir")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--method", default="esd-x", choices=["esd-x", "esd-u"])
    ap.add_argument("--concept", default="Van Gogh")
    ap.add_argument("--steps", type=int, default=None, help="iterations per run (default 1000 on CUDA, 6 on CPU)")
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--autocast", default=None, choices=["bf16", "fp16"], help="the fast run's autocast (default fp16 on CUDA, bf16 on CPU)")
    ap.add_argument("--runs", default="paper,fp32,fast,seed", help="comma-separated subset of paper,fp32,fast,seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paper-attention", default="classic", choices=["classic", "sdpa"],
                    help="the paper loop's attention: classic = CompVis' einsum/softmax (as the paper code), "
                         "sdpa = torch's fused kernel (as cpebench)")
    ap.add_argument("--tolerance", type=float, default=0.1, help="max ε-change difference from the paper loop")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    cuda = args.device.startswith("cuda")
    steps = args.steps or (1000 if cuda else 6)
    fast = args.autocast or ("fp16" if cuda else "bf16")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    pipe = load_pipeline(args.model, device=args.device).pipe
    cls = esd.ESDx if args.method == "esd-x" else esd.ESDu
    hp = esd.Hparams(train_method=cls.default_train_method, iterations=steps, ddim_steps=args.ddim_steps, seed=args.seed)
    words = [args.concept]
    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"ESD ({args.method}, train_method {hp.train_method}) model={args.model} device={device_name} "
          f"torch={torch.__version__} steps={steps} ddim_steps={hp.ddim_steps} concept={args.concept!r} "
          f"paper-loop attention={args.paper_attention} tf32(matmul/cudnn)={torch.backends.cuda.matmul.allow_tf32}/"
          f"{torch.backends.cudnn.allow_tf32}")

    # warm-up (kernels, allocator, autotuning): a couple of steps of each kind, not timed
    esd.train(pipe, words, esd.Hparams(**{**hp.__dict__, "iterations": 2}), EraseContext(progress=False), args.method)
    paper_loop(pipe, words, esd.Hparams(**{**hp.__dict__, "iterations": 2}), args.paper_attention)

    base_eps = probe(pipe, args.concept)
    base_w = {n: p.detach().cpu() for n, p in pipe.unet.named_parameters()}
    results, trained = {}, {}
    for run in runs:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if run == "paper":
            tensors, losses, seconds = paper_loop(pipe, words, hp, args.paper_attention)
        else:
            settings = {"fp32": {}, "fast": {"autocast": fast}, "seed": {"autocast": fast, "seed": hp.seed + 1}}[run]
            tensors, meta, seconds = cpebench_run(pipe, words, esd.Hparams(**{**hp.__dict__, **settings}), args.method)
            losses = meta["train"]["loss_mean_per_50"]
        trained[run] = tensors
        results[run] = {"seconds": seconds, "steps_per_s": steps / seconds, "s_per_1000": 1000 * seconds / steps,
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                        "loss_last": losses[-1] if losses else None,
                        "setting": {"paper": f"paper loop, fp32, {args.paper_attention} attn", "fp32": "cpebench, fp32",
                                    "fast": f"cpebench, autocast {fast}", "seed": f"cpebench, autocast {fast}, seed+1"}[run]}

    ref = "paper" if "paper" in trained else runs[0]
    eps_ref = probe(pipe, args.concept, trained[ref])
    w_ref = trained[ref]
    for run in runs:
        eps = probe(pipe, args.concept, trained[run])
        results[run]["eps_diff"] = float((eps - eps_ref).norm() / (eps_ref - base_eps).norm())
        names = sorted(set(w_ref) | set(trained[run]))
        num = sum(float(((trained[run].get(n, base_w[n]) - w_ref.get(n, base_w[n])) ** 2).sum()) for n in names)
        den = sum(float(((w_ref.get(n, base_w[n]) - base_w[n]) ** 2).sum()) for n in names)
        results[run]["weight_diff"] = (num / den) ** 0.5 if den else float("nan")
        results[run]["speedup"] = results[ref]["seconds"] / results[run]["seconds"]

    print(f"{'run':<32} {'steps/s':>8} {'s/1000 steps':>13} {'speed-up':>9} {'ε diff':>8} {'W diff':>8} {'peak GiB':>9}")
    for run in runs:
        r = results[run]
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{r['setting']:<32} {r['steps_per_s']:>8.3f} {r['s_per_1000']:>13.1f} {r['speedup']:>8.2f}x "
              f"{r['eps_diff']:>8.4f} {r['weight_diff']:>8.4f} {peak:>9}")
    print(f"(ε diff / W diff: ||run − {ref}|| / ||{ref} − base|| on the probes' noise predictions / on the weights)")
    if "fast" in results and ref == "paper":
        r = results["fast"]
        ok = r["eps_diff"] <= args.tolerance
        print(f"fast vs paper loop: {r['speedup']:.2f}x faster; ε diff {r['eps_diff']:.4f} "
              f"{'<=' if ok else '>'} tolerance {args.tolerance}"
              + (f" (another seed: {results['seed']['eps_diff']:.4f})" if "seed" in results else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device_name, "steps": steps, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
