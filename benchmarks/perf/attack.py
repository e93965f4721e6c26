"""UnlearnDiffAtk speed: prompts attacked per minute, the official one-prompt-at-a-time loop vs cpebench's
batched attack, on the same prompts, targets and judge, in the same run.

    python benchmarks/perf/attack.py                                          # CPU: tiny model, 8 prompts
    python benchmarks/perf/attack.py --model random-sd14 --device cuda --prompts 16 --blocks 5   # GPU: SD-1.4 shapes

Both runs attack the same N prompts (harmless stand-ins; the optimisation does not care what they say)
against the same random target latents with a judge that never succeeds, so every prompt runs every
block (the worst case, as on a robust model), for ``--blocks`` of the 50 timestep blocks:

* ``official`` — the loop of OPTML-Group/Diffusion-MU-Attack as it runs: one prompt per process, restated
  here: batch 1, a fresh detector session per evaluation, the evaluation's CFG as two batch-1 UNet calls;
  the attack math is cpebench's own at batch 1 (``attacks.unlearndiffatk.attack`` with one row).
* ``batched`` — ``attacks.unlearndiffatk.attack`` over all N prompts at once, evaluations batched.

Evaluations generate with LMS at ``--eval-steps`` (50 in the protocol). Figures: seconds per run and
prompts per minute, and the ratio batched/official. Absolute figures mean something only on the
hardware they name; on a CPU the tiny model is launch-bound and the ratio is what counts.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def evaluator(pipe, device, steps: int, batched: bool):
    """Generate each text (LMS, CFG 7.5, per-row seed) and judge it with NudeNet's ONNX session, never
    succeeding. Official: batch 1, the two CFG branches as separate calls, a new session per image."""
    import numpy as np

    from cpebench.engine import make_scheduler
    from cpebench.metrics.nudity_asr import NudityASR, candidate_anchors

    def generate(texts, seeds):
        from cpebench.models import text_embeddings

        sched = make_scheduler("lms", pipe.scheduler.config)
        sched.set_timesteps(steps)
        size = pipe.unet.config.sample_size
        lat = torch.stack([torch.randn(4, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])
        lat = lat.to(device) * sched.init_noise_sigma
        cond, uncond = text_embeddings(pipe, texts, device), text_embeddings(pipe, [""] * len(texts), device)
        for t in sched.timesteps:
            x = sched.scale_model_input(lat, t)
            if batched:
                e_u, e_c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond]),
                                     return_dict=False)[0].chunk(2)
            else:
                e_u = pipe.unet(x, t, encoder_hidden_states=uncond, return_dict=False)[0]
                e_c = pipe.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
            lat = sched.step(e_u + 7.5 * (e_c - e_u), t, lat, return_dict=False)[0]
        img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    judge = NudityASR()

    @torch.no_grad()
    def evaluate(texts, indices):
        pixels = generate(list(texts), [1000 + i for i in indices])
        if not batched:
            judge._session = None                      # the official code opens a session per evaluation
        from cpebench.metrics.nudity_asr import stretched_input

        batch = np.concatenate([stretched_input(np.ascontiguousarray(p), 320) for p in pixels])
        raw = judge._run(batch)
        [candidate_anchors(raw[j : j + 1]) for j in range(len(texts))]     # the judge's work
        return [False] * len(texts)

    return evaluate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | random-sd14 | hub id | local dir")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=2, help="timestep blocks (the attack has 50)")
    ap.add_argument("--iterations", type=int, default=40, help="Adam steps per block (40 in the protocol)")
    ap.add_argument("--eval-steps", type=int, default=50)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    from attacks import unlearndiffatk as U
    from cpebench.models import load_pipeline

    pipe = load_pipeline(args.model, device=args.device).pipe
    words = ["a photo of a river", "a portrait in a studio", "a city at night", "a statue in a park",
             "a painting of a field", "a dancer on a stage", "a beach in summer", "an old house"]
    rows = [(str(i), words[i % len(words)] + f" number {i}") for i in range(args.prompts)]
    size = pipe.unet.config.sample_size
    x0 = torch.randn(args.prompts, 4, size, size, generator=torch.Generator().manual_seed(0)).to(args.device)
    settings = U.Settings(timesteps=U.TIMESTEPS[: args.blocks], iterations=args.iterations)
    results = {}
    for name in ("official", "batched"):
        evaluate = evaluator(pipe, args.device, args.eval_steps, batched=name == "batched")
        sync(args.device)
        t0 = time.perf_counter()
        if name == "official":
            for i, row in enumerate(rows):
                U.attack(pipe, [row], x0[i : i + 1], lambda texts, idx, i=i: evaluate(texts, [i]), settings,
                         device=args.device)
        else:
            U.attack(pipe, rows, x0, evaluate, settings, device=args.device)
        sync(args.device)
        results[name] = time.perf_counter() - t0
    print(f"UnlearnDiffAtk, {args.prompts} prompts x {args.blocks} blocks x {args.iterations} steps, eval LMS-"
          f"{args.eval_steps}, model {args.model}, device {args.device} ({torch.get_num_threads()} threads)")
    for name, sec in results.items():
        print(f"  {name:9s} {sec:8.1f} s   {60 * args.prompts / sec:8.2f} prompts/min")
    print(f"  batched / official speed: {results['official'] / results['batched']:.2f}x")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": [
                {"run": name, "seconds": sec, "prompts_per_min": 60 * args.prompts / sec,
                 "speedup": results["official"] / sec} for name, sec in results.items()]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
