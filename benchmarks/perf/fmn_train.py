"""FMN training speed: the official two-stage loop (batch 1, fp32) vs cpebench's trainer, in the same run.

    python benchmarks/perf/fmn_train.py                        # CPU smoke: tiny, 1 concept, TI 50 + 35 steps (~1 min)
    python benchmarks/perf/fmn_train.py --model random-sd14 --device cuda \
        --ti-steps 50 --steps 35 --n-images 4 --data-steps 10           # GPU: SD-1.4 shapes, random weights
    python benchmarks/perf/fmn_train.py --model random-sd14 --device cuda --concepts 4 --runs official,cpebench,batched

Both stages of the official recipe (SHI-Labs/Forget-Me-Not@a4a81e8 configs/ti.yaml + attn.yaml; docs/methods/fmn.md)
on the same training images (made once by ``baselines.fmn.concept_images`` before the runs: the official code
reads photos from disk, so their making is not part of its time):

* ``official`` — src/train_ti.py and src/train_attn.py restated in diffusers, independent of baselines/fmn.py.
  Stage A per concept: the tokenizer gets <s1>..<s4> and the embedding table 4 rows (name words, then
  N(0, 1)); every step tokenises the prompt and "" (unused), VAE-encodes the image (flipped w.p. 0.5), runs the text
  encoder and the UNet, and AdamW steps over the **whole** token table (its dense gradient, its weight
  decay), after which the placeholder rows get the norm decay and all other rows are copied back from a
  saved table. Stage B: a fresh tokenizer and text encoder with the TI rows; every step tokenises four
  times (the prompt twice, the snippet, <|endoftext|>) to find S, VAE-encodes the image, runs the text
  encoder and the UNet (ε computed and thrown away), takes ``torch.cat(selected).norm()`` of the
  attn2 probabilities at S (``masked_select`` with the head-major mask), and AdamW-steps the whole UNet
  (``params unet``; ``attn2``: the official only_optimize_ca, which still computes every UNet gradient);
  the clip list is the consumed parameter generator, so nothing is clipped; ``zero_grad(set_to_none=False)``
  (``set_grads_to_none: false``). attn1 (and every attention in stage A) is diffusers' classic
  processor, as in the README's torch 1.13 (``--official-attention sdpa``: torch 2's fused kernel).
* ``cpebench`` — ``FMN().erase`` (``baselines.fmn.train``), the same settings, ``ti_concepts_per_step`` 1.
* ``batched`` — the same with ``ti_concepts_per_step`` = ``--concepts`` (stage A of all concepts in one
  batched forward; only different from ``cpebench`` with several concepts).

No autocast: ``baselines.fmn`` has no mixed-precision knob (the official code trains in fp32).

Every run draws the same things in the same order from CPU generators (stage A per concept: seed
``ti_seed``, the random initial rows, then per step image order, flip, t, VAE noise, ε; stage B: seed
``seed``, image order, t, VAE noise, ε); the official code uses the global RNGs (TI seeded 42, stage B
unseeded). So the runs do the same work and should reach the same rows and weights, up to float
rounding: ``ti_rows_diff`` = ‖rows − rows_official‖ / ‖rows_official − rows_init‖, ``result_diff`` =
‖W − W_official‖ / ‖W_official − W_base‖ over the UNet. The official TI runs ceil(500 / #images) epochs
(504 steps for 8 images, 500 for its 10 photos); both runs here take exactly ``--ti-steps``. Not timed:
model loading, the checkpoints either code writes, and cpebench's making of the training images (its
``stage_seconds.images``, reported separately). Each run is preceded by an untimed 2-step warm-up. Absolute
figures mean something only on a GPU with SD-1.4's shapes (``random-sd14``: random weights).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from perf_args import chosen_runs

from baselines import fmn
from cpebench.methods import Concept, EraseContext
from cpebench.models import load_pipeline

# the official configs' concept first; the others only for --concepts > 1
CONCEPTS = ("elon musk", "taylor swift", "tom hanks", "emma watson", "brad pitt", "oprah winfrey",
            "barack obama", "scarlett johansson")
RUNS = ("official", "cpebench", "batched")
OFFICIAL_TI_STEPS, OFFICIAL_STEPS = 500, 35       # the official schedule, for the estimates


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# =========================================================================== the official loops, restated


def plain_processor(attention: str):
    """The attention diffusers gives a module the official code does not touch: classic under torch 1.13
    (the README's environment), the fused kernel under torch 2."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return AttnProcessor() if attention == "classic" else AttnProcessor2_0()


@contextlib.contextmanager
def processors(unet, choose):
    """``choose(key)`` for every attention processor of ``unet``; the originals come back on exit."""
    original = unet.attn_processors
    unet.set_attn_processor({k: choose(k) for k in original})
    try:
        yield
    finally:
        unet.set_attn_processor(original)


class Controller:
    """train_attn.py's AttnController: keeps each attn2 call's probabilities at S, loss = one global norm."""

    def __init__(self):
        self.selected: list[torch.Tensor] = []
        self.positions: torch.Tensor | None = None     # [B, 77] bool

    def __call__(self, probs: torch.Tensor) -> None:
        b = self.positions.shape[0]
        heads = probs.shape[0] // b
        # the mask tiled head-major (right for batch 1 only) and broadcast over the pixels, as official
        picked = probs.masked_select(self.positions[:, None, :].repeat(heads, 1, 1))
        self.selected.append(picked.reshape(-1, int(self.positions[0].sum())))

    def loss(self) -> torch.Tensor:
        return torch.cat(self.selected).norm()


class CaptureProcessor:
    """train_attn.py's MyCrossAttnProcessor: classic attention, the probabilities handed to the controller."""

    def __init__(self, controller: Controller):
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        b, n, _ = hidden_states.shape
        mask = attn.prepare_attention_mask(attention_mask, n, b)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key, value = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, key, mask)
        self.controller(probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def noisy_latent(vae, image, ddpm, g, device):
    """One training input as both official loops make it, the VAE run on every step; the draws (t, then
    ``latent_dist.sample()``'s noise, then ε) come from ``g`` in cpebench's order."""
    t = torch.tensor([int(torch.randint(ddpm.config.num_train_timesteps, (1,), generator=g))], device=device)
    dist = vae.encode(image[None].to(device)).latent_dist
    z0 = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device)) * 0.18215
    eps = torch.randn(z0.shape, generator=g).to(device)
    return ddpm.add_noise(z0, eps, t), t, eps, z0


def official_ti(pipe, unet, name: str, images: torch.Tensor, hp: fmn.Hparams, attention: str):
    """src/train_ti.py for one concept: returns (learnt rows [k, D], initial rows, losses)."""
    from diffusers import DDPMScheduler

    device = unet.device
    tok, enc = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder).float()
    g = torch.Generator().manual_seed(hp.ti_seed)               # torch.manual_seed(42), once per concept
    tokens = [f"<s{i + 1}>" for i in range(hp.ti_tokens)]
    tok.add_tokens(tokens)
    enc.resize_token_embeddings(len(tok), mean_resizing=False)
    table = enc.get_input_embeddings().weight
    ids = tok.convert_tokens_to_ids(tokens)
    words = tok(name, add_special_tokens=False).input_ids      # initializer_tokens "elon|musk|<rand-1>|<rand-1>"
    with torch.no_grad():
        for j, i in enumerate(ids):
            table[i] = table[words[j]] if j < len(words) else torch.randn(table.shape[1], generator=g).to(device)
    init = table[ids].detach().cpu().clone()
    enc.requires_grad_(False)
    table.requires_grad_(True)                                  # only the token table is left trainable
    keep = torch.ones(len(tok), dtype=torch.bool, device=device)
    keep[ids] = False                                           # index_no_updates
    saved = table.data.clone()                                  # orig_embeds_params
    opt = torch.optim.AdamW(enc.get_input_embeddings().parameters(), lr=hp.ti_lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=hp.ti_weight_decay)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    prompt = fmn.TEMPLATES[hp.concept_type].format("".join(tokens))
    order, losses = [], []
    unet.eval()
    enc.train()
    with processors(unet, lambda k: plain_processor(attention)):
        for _ in range(hp.ti_steps):
            if not order:                                       # DataLoader(shuffle=True): a new epoch
                order = torch.randperm(len(images), generator=g).tolist()
            image = images[order.pop(0)]
            if hp.ti_hflip and float(torch.rand((), generator=g)) < 0.5:
                image = image.flip(-1)
            # the dataset tokenises the prompt and "" (never used) unpadded, the collate pads both to 77
            unpadded = [tok(x, padding="do_not_pad", truncation=True, max_length=tok.model_max_length).input_ids
                        for x in (prompt, "")]
            input_ids, _ = (tok.pad({"input_ids": [x]}, padding="max_length", max_length=tok.model_max_length,
                                    return_tensors="pt").input_ids for x in unpadded)
            xt, t, eps, z0 = noisy_latent(pipe.vae, image, ddpm, g, device)
            pred = unet(xt, t, enc(input_ids.to(device))[0]).sample
            target = ddpm.get_velocity(z0, eps, t) if ddpm.config.prediction_type == "v_prediction" else eps
            loss = F.mse_loss(pred.float(), target.float())
            loss.backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                if hp.ti_norm_decay:                            # clip_ti_decay
                    rows = table[~keep]
                    norm = rows.norm(dim=-1, keepdim=True)
                    lam = min(1.0, 100 * hp.ti_lr)
                    table[~keep] = F.normalize(rows, dim=-1) * (norm + lam * (hp.ti_norm_target - norm))
                table[keep] = saved[keep]                       # every other row copied back
            losses.append(loss.item())
    return table[ids].detach().cpu().clone(), init, losses


def official_resteer(pipe, unet, names, images, rows, hp: fmn.Hparams, attention: str) -> list[float]:
    """src/train_attn.py (use_ti: the learnt rows as tokens <s1>.., renumbered across concepts): trains
    ``unet`` in place, returns the losses."""
    from diffusers import DDPMScheduler

    device = unet.device
    tok, enc = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder).float()
    data, k = [], 1
    for name, imgs, r in zip(names, images, rows):              # apply_learned_embed_in_clip, per concept
        tokens = [f"<s{k + j}>" for j in range(len(r))]
        tok.add_tokens(tokens)
        enc.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            enc.get_input_embeddings().weight[tok.convert_tokens_to_ids(tokens)] = r.to(device)
        snippet = "".join(tokens)
        data += [(img, fmn.TEMPLATES[hp.concept_type].format(snippet), snippet) for img in imgs]
        k += len(r)
    enc.requires_grad_(False)
    controller = Controller()
    capture = CaptureProcessor(controller)
    if hp.params == "unet":
        unet.requires_grad_(True)
        params = unet.parameters()           # a generator: the optimiser consumes it, the clip gets nothing
    else:                                    # only_optimize_ca: every other parameter keeps requires_grad
        unet.requires_grad_(True)
        params = [p for n, p in unet.named_parameters() if "attn2" in n]
    opt = torch.optim.AdamW(params, lr=hp.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=hp.weight_decay)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(hp.seed)                  # the official run is unseeded
    order, losses = [], []
    unet.train()
    with processors(unet, lambda key: capture if key.endswith("attn2.processor") else plain_processor(attention)):
        for _ in range(hp.steps):
            if not order:
                order = torch.randperm(len(data), generator=g).tolist()
            image, prompt, snippet = data[order.pop(0)]
            # the dataset's __getitem__: four tokenisations to find S
            ids = tok(prompt, truncation=True, padding="max_length", max_length=tok.model_max_length,
                      return_tensors="pt").input_ids
            prompt_ids = tok(prompt, truncation=True, padding="max_length", max_length=tok.model_max_length).input_ids
            span = tok(snippet, add_special_tokens=False).input_ids
            pooler = tok("<|endoftext|>", add_special_tokens=False).input_ids[0]
            positions = [0] * tok.model_max_length
            for i, t_id in enumerate(prompt_ids):
                if t_id == span[0] and prompt_ids[i : i + len(span)] == span:
                    positions[i : i + len(span)] = [1] * len(span)
                if hp.use_pooler and t_id == pooler:
                    positions[i] = 1
            xt, t, _, _ = noisy_latent(pipe.vae, image, ddpm, g, device)
            context = enc(ids.to(device))[0]
            controller.positions = torch.tensor(positions, dtype=torch.bool, device=device)[None]
            unet(xt, t, context).sample                         # ε: computed, never used
            loss = controller.loss()
            loss.backward()
            with warnings.catch_warnings():                     # torch warns about the empty generator
                warnings.simplefilter("ignore", UserWarning)
                torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=False)                    # set_grads_to_none: false
            controller.selected = []
            losses.append(loss.item())
    unet.requires_grad_(False)
    return losses


def official_run(pipe, names, images, hp: fmn.Hparams, attention: str) -> dict:
    """Both stages, timed apart; returns the rows, the trained UNet tensors (CPU) and the figures."""
    device = pipe.unet.device
    unet = copy.deepcopy(pipe.unet).float()                     # the official scripts load their own model
    rows, inits, ti_losses = [], [], []
    sync(device)
    start = time.perf_counter()
    for name, imgs in zip(names, images):                       # one TI run per concept (use_ti: true)
        r, init, losses = official_ti(pipe, unet, name, imgs, hp, attention)
        rows.append(r), inits.append(init), ti_losses.extend(losses)
    sync(device)
    ti_seconds = time.perf_counter() - start
    start = time.perf_counter()
    losses = official_resteer(pipe, unet, names, images, rows, hp, attention)
    sync(device)
    resteer_seconds = time.perf_counter() - start
    weights = {n: p.detach().cpu().clone() for n, p in unet.named_parameters()}
    del unet
    return {"rows": rows, "inits": inits, "weights": weights, "ti_seconds": ti_seconds, "resteer_seconds": resteer_seconds,
            "ti_losses": ti_losses, "losses": losses, "images_seconds": None}


# =========================================================================== cpebench's trainer


@contextlib.contextmanager
def keep_ti_rows(store: list):
    """``fmn.invert`` still runs as the erase calls it; its returned rows and losses are kept here."""
    original = fmn.invert

    def invert(*args, **kwargs):
        out = original(*args, **kwargs)
        store.append(out)
        return out

    fmn.invert = invert
    try:
        yield
    finally:
        fmn.invert = original


def cpebench_run(pipe, names, hparams: dict) -> dict:
    store: list = []
    device = pipe.unet.device
    sync(device)
    start = time.perf_counter()
    with keep_ti_rows(store):
        artifact = fmn.FMN().erase(pipe, [Concept(n) for n in names], hparams,
                                   EraseContext(device=str(device), progress=False))
    sync(device)
    wall = time.perf_counter() - start
    meta = artifact.metadata
    stages = meta["stage_seconds"]
    return {"rows": [r for rows, _ in store for r in rows], "weights": artifact.tensors,
            "ti_seconds": stages.get("textual_inversion", 0.0), "resteer_seconds": stages["resteering"],
            "images_seconds": stages["images"], "wall_seconds": wall,
            "ti_losses": [x for _, losses in store for lo in losses for x in lo], "losses": meta["losses"]}


# =========================================================================== comparison and main


def rel_diff(run: dict, ref: dict, base: dict) -> tuple[float | None, float | None]:
    """(TI rows, UNet weights): ‖run − ref‖ / ‖ref − start‖ (tensors a run did not change are the base's)."""
    rows = None
    if ref["rows"] and run["rows"] and "inits" in ref:
        num = sum(float(((a - b) ** 2).sum()) for a, b in zip(run["rows"], ref["rows"]))
        den = sum(float(((b - i) ** 2).sum()) for b, i in zip(ref["rows"], ref["inits"]))
        rows = math.sqrt(num / den) if den else float("nan")
    num = den = 0.0
    for n, w0 in base.items():
        w, wr = run["weights"].get(n, w0), ref["weights"].get(n, w0)
        num += float(((w.float() - wr.float()) ** 2).sum())
        den += float(((wr.float() - w0) ** 2).sum())
    return rows, (math.sqrt(num / den) if den else float("nan"))


def mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | random-sd14 (SD-1.4 shapes, random weights) | hub id | dir")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concepts", type=int, default=1, help="the first K of a fixed celebrity list (one official TI run each)")
    ap.add_argument("--ti-steps", type=int, default=50, help="stage A steps per concept (official 500)")
    ap.add_argument("--steps", type=int, default=OFFICIAL_STEPS, help="stage B steps (official 35)")
    ap.add_argument("--n-images", type=int, default=8, help="training images per concept (cpebench's default 8)")
    ap.add_argument("--data-steps", type=int, default=None, help="sampler steps of cpebench's training images (default 30)")
    ap.add_argument("--resolution", type=int, default=None, help="default: the UNet's sample size x the VAE factor")
    ap.add_argument("--params", default="unet", choices=fmn.PARAMS, help="unet (official) | attn2 (only_optimize_ca)")
    ap.add_argument("--runs", default="official,cpebench", help=f"comma-separated subset of {','.join(RUNS)}")
    ap.add_argument("--official-attention", default="classic", choices=["classic", "sdpa"],
                    help="the attention of the modules the official code leaves alone (torch 1.13: classic)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    runs = chosen_runs(ap, args.runs, RUNS)
    if not 1 <= args.concepts <= len(CONCEPTS):
        raise SystemExit(f"--concepts: 1..{len(CONCEPTS)}")
    names = list(CONCEPTS[: args.concepts])
    pipe = load_pipeline(args.model, device=args.device).pipe
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = args.resolution or pipe.unet.config.sample_size * factor
    settings = {"ti_steps": args.ti_steps, "steps": args.steps, "n_images": args.n_images, "resolution": resolution,
                "params": args.params}
    if args.data_steps:
        settings["data_steps"] = args.data_steps
    hp = fmn.Hparams.from_dict(settings)
    cuda = torch.device(args.device).type == "cuda"
    where = torch.cuda.get_device_name(args.device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"FMN model={args.model} device={where} torch={torch.__version__} concepts={names} ti_steps={hp.ti_steps} "
          f"steps={hp.steps} images={hp.n_images}x{resolution}² params={hp.params} official attention={args.official_attention} "
          f"tf32(matmul/cudnn)={torch.backends.cuda.matmul.allow_tf32}/{torch.backends.cudnn.allow_tf32}")

    # the "photos": made once, untimed (cpebench's run makes them again, timed as its images stage)
    images = [fmn.concept_images(pipe, n, hp, torch.device(args.device))[0] for n in names]
    base = {n: p.detach().cpu().clone() for n, p in pipe.unet.named_parameters()}

    def per_step(k: int) -> dict:
        return {**settings, "ti_concepts_per_step": k}

    # warm-up (kernels, allocator): 2 steps of each stage of each kind, untimed
    short = fmn.Hparams.from_dict({**settings, "ti_steps": 2, "steps": 2})
    if "official" in runs:
        official_run(pipe, names[:1], images[:1], short, args.official_attention)
    if any(r != "official" for r in runs):
        cpebench_run(pipe, names[:1], {**settings, "ti_steps": 2, "steps": 2, "n_images": 1})

    results = {}
    for run in runs:
        if cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
        if run == "official":
            r = official_run(pipe, names, images, hp, args.official_attention)
            r["setting"] = f"official loops, fp32, batch 1, {args.official_attention} attention"
        else:
            k = args.concepts if run == "batched" else 1
            r = cpebench_run(pipe, names, per_step(k))
            r["setting"] = f"cpebench FMN.erase, fp32, ti_concepts_per_step {k}"
        r["peak_gib"] = torch.cuda.max_memory_allocated(args.device) / 2**30 if cuda else None
        results[run] = r

    ref = results.get("official") or results[runs[0]]
    n_ti = hp.ti_steps * len(names)
    rows = []
    for run, r in results.items():
        train = r["ti_seconds"] + r["resteer_seconds"]
        s_ti = r["ti_seconds"] / n_ti if n_ti else None
        s_step = r["resteer_seconds"] / hp.steps if hp.steps else None
        # the official schedule per concept: 500 TI steps (+ its share of the 35 shared steps)
        estimate = (s_ti or 0) * OFFICIAL_TI_STEPS + (s_step or 0) * OFFICIAL_STEPS / len(names)
        ti_diff, w_diff = rel_diff(r, ref, base)
        rows.append({
            "run": run, "setting": r["setting"], "seconds": train, "ti_seconds": r["ti_seconds"],
            "resteer_seconds": r["resteer_seconds"], "images_seconds": r["images_seconds"],
            "s_per_ti_step": s_ti, "s_per_step": s_step, "s_per_concept_official_schedule": estimate,
            "speedup": (ref["ti_seconds"] + ref["resteer_seconds"]) / train if train else None,
            "ti_speedup": ref["ti_seconds"] / r["ti_seconds"] if r["ti_seconds"] else None,
            "resteer_speedup": ref["resteer_seconds"] / r["resteer_seconds"] if r["resteer_seconds"] else None,
            "ti_mean_loss": mean(r["ti_losses"]), "mean_loss": mean(r["losses"]),
            "ti_rows_diff": ti_diff, "result_diff": w_diff, "peak_gib": r["peak_gib"]})

    print(f"{'run':<10} {'TI s':>8} {'s/TI step':>10} {'B s':>8} {'s/B step':>9} {'speed-up':>9} {'TI ×':>6} "
          f"{'B ×':>6} {'TI loss':>9} {'B loss':>9} {'rows diff':>10} {'W diff':>9} {'images s':>9} {'est s/concept':>13}")
    for x in rows:
        f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{x['run']:<10} {x['ti_seconds']:>8.2f} {f(x['s_per_ti_step'], '.4f'):>10} {x['resteer_seconds']:>8.2f} "
              f"{f(x['s_per_step'], '.4f'):>9} {x['speedup']:>8.2f}x {f(x['ti_speedup'], '.2f'):>6} "
              f"{f(x['resteer_speedup'], '.2f'):>6} {f(x['ti_mean_loss'], '.4g'):>9} {f(x['mean_loss'], '.4g'):>9} "
              f"{f(x['ti_rows_diff'], '.2e'):>10} {f(x['result_diff'], '.2e'):>9} {f(x['images_seconds'], '.2f'):>9} "
              f"{x['s_per_concept_official_schedule']:>13.1f}")
    print("(speed-up: TI + re-steering seconds against official; diffs: ‖run − official‖ / ‖official − start‖; "
          f"est: {OFFICIAL_TI_STEPS} TI steps + {OFFICIAL_STEPS}/{len(names)} re-steering steps per concept, images excluded)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "device": where, "model": args.model, "concepts": names, "ti_steps": hp.ti_steps,
            "steps": hp.steps, "n_images": hp.n_images, "resolution": resolution, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
