"""CPE training speed: cpebench's trainer vs a straightforward per-concept fp32 loop, same run.

    python benchmarks/perf/cpe_train.py --model sd14 --concepts 50 --steps 20        # GPU (SD-1.4 shapes)
    python benchmarks/perf/cpe_train.py --model tiny --concepts 8 --steps 20          # CPU smoke

* baseline — what the official code does per step (docs/methods/cpe.md): one concept at a time,
  every K/V of every input through every one of the 32 projections (``loss: direct``), and the
  official step counts (the final adversarial stage included).
* cpebench — ``loss: gram`` (the same losses in text space, no K/V materialised), all concepts in one
  batched step, the unused final adversarial stage skipped.

Both time real optimiser steps (forward, backward, AdamW) of an erase stage with adversarial
perturbations (the common case) and of an adversarial stage, on random embeddings of CLIP's shape and
norm: step time does not depend on the text, so no text encoder or data files are needed. The
seconds per concept for the celebrity schedule follow from the step times. The two losses are also
checked to agree on one batch. Absolute figures mean something only on a GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cpebench.methods import cpe


def sd14_unet():
    """SD-1.4's UNet architecture with random weights (its 16 attn2 layers are what CPE reads)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)


def synthetic_data(C: int, D: int, n_templates: int, n_anchors: int, device) -> cpe.TrainingData:
    g = torch.Generator(device=device).manual_seed(0)
    emb = lambda *shape: torch.randn(*shape, cpe.TOKENS, D, generator=g, device=device)  # noqa: E731
    return cpe.TrainingData(
        targets=emb(C, n_templates), neutral=emb(n_templates), unconditional=emb(1)[0], anchors=emb(n_anchors),
        anchor_rows=torch.arange(n_anchors, device=device).repeat(C, 1),
        anchor_counts=torch.full((C,), n_anchors, device=device), anchor_words=[[] for _ in range(C)])


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(space, hp: cpe.Hparams, C: int, steps: int, device) -> tuple[float, float]:
    """Seconds per erase step (with K perturbations) and per adversarial step, for C concepts at once."""
    data = synthetic_data(C, space.text_dim, 101, 512, device)
    gens = [cpe.concept_generator(hp.seed, f"concept {i}", device) for i in range(C)]
    net = cpe.ConceptBatch(space, hp, gens, device)
    with torch.no_grad():   # trained-looking weights
        for u in net.ups:
            u.normal_(0, 1e-3)
    delta = torch.randn(C, hp.adv_prompts, cpe.TOKENS, space.text_dim, device=device) * 1e-3
    uncond = data.unconditional.expand(C, 1, *data.unconditional.shape)
    opt = torch.optim.AdamW(net.parameters(), lr=hp.lr)

    def erase_step():
        idx = torch.randint(101, (C,), device=device)
        e_t, e_n = cpe._targets(data, idx)
        u = torch.rand(C, 2 * hp.anchor_batch, device=device)
        lam = torch.rand(C, hp.anchor_batch, device=device)
        anchors = torch.cat([uncond, cpe.sample_anchors(data, u, lam, gens, hp)], dim=1)
        t = cpe.erase_losses(space, net, e_t, e_n, delta, anchors, hp.guidance, hp.loss, with_constant=False)
        loss = t["erase"] + hp.adv_weight * t["adv"] + hp.anchor_weight * t["anchor"]
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()

    d = torch.nn.Parameter(delta.clone())
    opt_adv = torch.optim.AdamW([d], lr=hp.adv_lr)

    def adv_step():
        e_t, _ = cpe._targets(data, torch.randint(101, (C,), device=device))
        loss = cpe.adversarial_loss(space, net, e_t, d, hp.loss)
        opt_adv.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt_adv.step()

    out = []
    for step in (erase_step, adv_step):
        step()                       # warm-up
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        out.append((time.perf_counter() - t) / steps)
    return out[0], out[1]


def check_agreement(space, hp, device) -> float:
    """Max relative difference of the gram and direct losses on one random batch (trained-looking weights)."""
    C = 2
    gens = [cpe.concept_generator(0, str(i), device) for i in range(C)]
    net = cpe.ConceptBatch(space, hp, gens, device)
    with torch.no_grad():
        for u in net.ups:
            u.normal_(0, 1e-2)
        net.v.normal_(0, 1e-2)
    g = torch.Generator(device=device).manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    D = space.text_dim
    args = (r(C, 77, D), r(C, 77, D), 1e-2 * r(C, 4, 77, D), r(C, 5, 77, D), hp.guidance)
    with torch.no_grad():
        a = cpe.erase_losses(space, net, *args, "gram")
        b = cpe.erase_losses(space, net, *args, "direct")
    return max(float(((a[k] - b[k]).abs() / b[k].abs()).max()) for k in a)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (the test model) | sd14 (SD-1.4's UNet shapes, random)")
    ap.add_argument("--concepts", type=int, default=50, help="concepts trained together by cpebench")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    if args.model == "sd14":
        unet = sd14_unet()
    else:
        from cpebench.models import load_pipeline

        unet = load_pipeline("tiny").pipe.unet
    unet.to(args.device)
    space = cpe.KVSpace(unet, args.device)
    celeb = dict(templates=["actor"], rank=1, gate_rank=16, guidance=0.3, anchor_weight=1e5, anchor_batch=32,
                 adv_prompts=16, stages=5, iterations=450, adv_iterations=450)
    ours = cpe.Hparams.from_dict({**celeb, "loss": "gram"})
    base = cpe.Hparams.from_dict({**celeb, "loss": "direct"})
    erase_steps = sum(ours.stage_schedule(s)[0] for s in range(ours.stages))          # 3,600
    adv_official, adv_ours = ours.stages * ours.adv_iterations, (ours.stages - 1) * ours.adv_iterations

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"model={args.model} (text dim {space.text_dim}, {space.n_layers} K/V layers, widths {sorted(set(space.widths))}) "
          f"device={device_name} torch={torch.__version__}")
    print(f"celebrity schedule per concept: {erase_steps} erase steps; adversarial {adv_official} official, {adv_ours} ours")
    agreement = check_agreement(space, ours, args.device)
    print(f"gram vs direct losses: max relative difference {agreement:.2e}")

    be, ba = time_steps(space, base, 1, args.steps, args.device)
    oe, oa = time_steps(space, ours, args.concepts, args.steps, args.device)
    base_s = erase_steps * be + adv_official * ba
    ours_s = (erase_steps * oe + adv_ours * oa) / args.concepts
    print(f"{'trainer':<34} {'erase ms/step':>13} {'adv ms/step':>12} {'concepts/step':>13} {'s/concept':>10} {'ratio':>7}")
    print(f"{'baseline: per concept, direct':<34} {be * 1e3:>13.2f} {ba * 1e3:>12.2f} {1:>13d} {base_s:>10.1f} {1.0:>7.2f}")
    print(f"{'cpebench: batched, gram':<34} {oe * 1e3:>13.2f} {oa * 1e3:>12.2f} {args.concepts:>13d} {ours_s:>10.2f} "
          f"{base_s / ours_s:>7.1f}")
    print(f"{args.concepts} concepts: baseline {base_s * args.concepts / 60:.1f} min, cpebench {ours_s * args.concepts / 60:.2f} min")
    if args.json:
        rows = [{"run": "baseline: per concept, direct", "erase_ms": be * 1e3, "adv_ms": ba * 1e3, "concepts_per_step": 1,
                 "s_per_concept": base_s, "ratio": 1.0},
                {"run": "cpebench: batched, gram", "erase_ms": oe * 1e3, "adv_ms": oa * 1e3,
                 "concepts_per_step": args.concepts, "s_per_concept": ours_s, "ratio": base_s / ours_s}]
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device_name,
                                               "gram_vs_direct": agreement, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
