"""AdvUnlearn training speed: the official loop (batch 1, fp32) vs cpebench's trainer, in the same run.

    python benchmarks/perf/advunlearn_train.py                          # CPU smoke: tiny model, 6 iterations
    python benchmarks/perf/advunlearn_train.py --model /path/to/stable-diffusion-v1-4 --device cuda \
        --iterations 4 --warmup 1 --attack-step 30 --autocast bf16

* ``official`` — AdvUnlearn.py (OPTML-Group/AdvUnlearn@9d23124; docs/methods/advunlearn.md) restated in
  diffusers: two UNets (``model`` samples, ``model_orig`` gives the targets; the UNet keeps requires_grad, so
  its gradients are computed and never used), fp32, batch 1; every attack step samples its own x_t (DDIM,
  981 skipped, the early break), calls the frozen UNet twice (ε₀ and ε_p), runs the encoder on the
  adversarial embedding (one-hot product with the token table) and a UNet forward/backward; every iteration
  encodes "", the word and the retain prompts with the original encoder, samples z (batch 1) and z_r
  (batch ``retain_batch``), and takes one Adam step on L_u + γ L_r.
* ``cpebench`` — ``baselines.advunlearn.train`` with the same settings (the batched bank).
* ``cpebench-amp`` — the same with ``autocast`` (``--autocast``; only on CUDA).

The draws differ between the two (the official code is unseeded), so only the time is compared; both
report their mean loss. Absolute figures mean something only on a GPU with SD-1.4's shapes.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from baselines import advunlearn
from cpebench.methods import EraseContext
from cpebench.models import load_pipeline, text_embeddings


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def official_loop(pipe, word: str, hp: advunlearn.Hparams, retain: list[str]) -> tuple[list, float]:
    from diffusers import DDIMScheduler

    device = pipe.unet.device
    model_orig, model = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.unet)     # requires_grad left on, as official
    encoder = copy.deepcopy(pipe.text_encoder)
    names = advunlearn.trained_names(encoder, hp)
    params = dict(encoder.named_parameters())
    encoder.requires_grad_(False)
    opt = torch.optim.Adam([params[n] for n in names], lr=hp.lr)
    table = encoder.get_input_embeddings().weight
    tok = pipe.tokenizer
    sched = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    S = hp.ddim_steps
    sched.set_timesteps(S)
    timesteps = sched.timesteps[1:]
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = (hp.image_size or pipe.unet.config.sample_size * vae_factor) // vae_factor

    def ids_of(texts):
        return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(device)

    def one_hot_embeds(ids):                                   # id2embedding: one-hot @ token table
        return F.one_hot(ids.view(-1), table.shape[0]).float() @ table

    def custom_encoder(ids, embeds):
        return advunlearn.encode_embeds(encoder, ids, embeds.view(ids.shape[0], ids.shape[1], -1))

    def sample(c, n, t_enc):
        z = torch.randn((n, 4, size, size)).to(device)
        uc = text_embeddings(pipe, [""] * n)
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                e_u, e_c = model(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
                z = sched.step(e_u + hp.start_guidance * (e_c - e_u), t, z, eta=0.0).prev_sample
                if len(timesteps) - i - 1 == t_enc - 1:
                    break
        return z

    def draw_t():
        t_enc = int(torch.randint(S, (1,)))
        return t_enc, torch.randint(round(t_enc / S * 1000), round((t_enc + 1) / S * 1000), (1,)).to(device)

    word_ids = ids_of([word])
    n, k = len(word.split()), hp.adv_prompt_num
    losses, pool = [], list(range(len(retain)))
    sync(device)
    start = time.perf_counter()
    for i in range(hp.iterations):
        if len(pool) < hp.retain_batch:
            pool = list(range(len(retain)))
        with torch.no_grad():
            emb_0, emb_p = text_embeddings(pipe, [""]), text_embeddings(pipe, [word])
        word_embeds = one_hot_embeds(word_ids).view(1, 77, -1)
        adv_prompt = None
        if i >= hp.warmup_iter:
            adv = one_hot_embeds(torch.randint(0, table.shape[0], (1, k)).to(device)).view(1, k, -1).detach().requires_grad_(True)
            attack_opt = torch.optim.Adam([adv], lr=hp.attack_lr)
            for _ in range(hp.attack_step):
                t_enc, t = draw_t()
                z = sample(emb_p, 1, t_enc)
                with torch.no_grad():
                    model_orig(z, t, encoder_hidden_states=emb_0).sample        # e_0: computed, unused
                    e_p = model_orig(z, t, encoder_hidden_states=emb_p).sample
                adv_prompt = torch.cat([word_embeds[:, :1], adv, word_embeds[:, 1 : 1 + n], word_embeds[:, 1 + n + k :]], 1)
                loss = F.mse_loss(model(z, t, encoder_hidden_states=custom_encoder(word_ids, adv_prompt)).sample, e_p)
                loss.backward()                                                 # no zero_grad, as official
                attack_opt.step()
        for p in (params[n_] for n_ in names):
            p.requires_grad_(True)
        opt.zero_grad()
        rows = [pool.pop(int(torch.randint(len(pool), (1,)))) for _ in range(hp.retain_batch)]
        r_ids = ids_of([retain[r] for r in rows])
        with torch.no_grad():
            r_emb_p = text_embeddings(pipe, [retain[r] for r in rows])
        r_emb_n = custom_encoder(r_ids, one_hot_embeds(r_ids))
        t_enc, t = draw_t()
        z = sample(emb_p, 1, t_enc)
        z_r = sample(r_emb_p, hp.retain_batch, t_enc)
        with torch.no_grad():
            e_0 = model_orig(z, t, encoder_hidden_states=emb_0).sample
            e_p = model_orig(z, t, encoder_hidden_states=emb_p).sample
            r_e_p = model_orig(z_r, t, encoder_hidden_states=r_emb_p).sample
        prompt = adv_prompt.detach() if adv_prompt is not None else word_embeds
        e_n = model(z, t, encoder_hidden_states=custom_encoder(word_ids, prompt)).sample
        loss = F.mse_loss(e_n, e_0 - hp.negative_guidance * (e_p - e_0))
        loss = loss + hp.retain_loss_w * F.mse_loss(model(z_r, t, encoder_hidden_states=r_emb_n).sample, r_e_p)
        loss.backward()
        opt.step()
        for p in (params[n_] for n_ in names):
            p.requires_grad_(False)
        losses.append(loss.item())
    sync(device)
    return losses, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--word", default="nudity")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attack-step", type=int, default=30)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--autocast", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--sample-batch", type=int, default=128)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    pipe = load_pipeline(args.model, device=args.device).pipe
    retain = list(advunlearn.RETAIN_SETS["coco_object"])
    hp = advunlearn.Hparams.from_dict({"iterations": args.iterations, "warmup_iter": args.warmup,
                                       "attack_step": args.attack_step, "ddim_steps": args.ddim_steps,
                                       "sample_batch": args.sample_batch})
    rows = {}
    losses, seconds = official_loop(pipe, args.word, hp, retain)
    rows["official"] = {"seconds": seconds, "mean_loss": sum(losses) / len(losses)}
    runs = [("cpebench", hp)]
    if args.autocast != "none":
        runs.append(("cpebench-amp", advunlearn.Hparams.from_dict({**advunlearn.asdict(hp), "autocast": args.autocast})))
    for name, h in runs:
        sync(args.device)
        start = time.perf_counter()
        _, meta = advunlearn.train(pipe, [args.word], h, EraseContext(device=args.device, progress=False))
        sync(args.device)
        rows[name] = {"seconds": time.perf_counter() - start, "bank_seconds": meta["train"]["bank_seconds"],
                      "mean_loss": sum(meta["train"]["loss_mean_per_50"]) / len(meta["train"]["loss_mean_per_50"])}
    base = rows["official"]["seconds"]
    table = [{"run": name, **r, "s_per_iteration": r["seconds"] / args.iterations, "speedup": base / r["seconds"]}
             for name, r in rows.items()]
    figures = {"model": args.model, "device": args.device, "iterations": args.iterations, "warmup": args.warmup,
               "attack_step": args.attack_step, "ddim_steps": args.ddim_steps, "rows": table}
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
