"""Build the micro world's text-to-image model: a tiny SD-1.x pipeline trained on the world's renders.

Two stages, both on the world's train split (a fixed pool of ``Recipe.n_train`` renders):

1. **Autoencoder** (``AutoencoderKL``, 32×32×3 → 4×8×8). Colour lives in the latent channel means; a
   nearly unregularised VAE leaves them off zero, and a UNet trained to start from zero-mean noise
   then draws shifted colours. So besides a weak KL term, a penalty keeps each latent channel's batch
   mean near 0. The scaling factor is 1 / the std of the pool's latents (SD's convention) and is stored
   in the VAE config, where the pipeline reads it.
2. **UNet** (``UNet2DConditionModel`` with cross-attention on the text of a frozen, random 2-layer
   ``CLIPTextModel`` and the real 49,408-token CLIP tokenizer). Epsilon prediction, as SD-1.x: every
   cpebench method and the engine's guidance were written for an epsilon model. A share of captions
   is dropped to "" so classifier-free guidance has an unconditional model to push away from.

The UNet has four levels, three with cross-attention, two layers each (16 ``attn2`` layers, as
SD-1.x): cpebench's methods and ``load_pipeline`` address exactly those 16 layers.

The saved scheduler is a ``DDIMScheduler`` with ``clip_sample=False``: a DDIM built from a DDPM config
inherits ``clip_sample=True``, which clips the scaled latents and destroys the colours.

Deterministic and resumable: every step's batch, noise and timesteps come from a generator seeded by
(seed, stage, step), so a step depends only on the weights and optimiser state it starts from; those
are saved atomically every ``checkpoint_every`` steps, and a build that was killed resumes from the
last checkpoint to the same bytes as an uninterrupted one on the same number of threads.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CpebenchError
from ..models import torch_dtype_of
from . import judges, world

log = logging.getLogger(__name__)

RECIPE_FILE = "microworld_build.json"
JUDGE_FILE = "judge/micro-judge.safetensors"      # the world's judge, trained with this model's autoencoder
_STATE = "state.pt"
_FORMAT = "cpebench-micro-build/1"


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    n_train: int = 20_000                  # train-split renders in the pool both stages draw from
    checkpoint_every: int = 50             # steps between saved states
    # stage 1: autoencoder
    vae_channels: tuple = (32, 64, 64)     # three levels: 32×32 → 8×8 (16×16 latents left the UNet too
    vae_steps: int = 1500                  # much to learn at this budget: colour 0.73, shape 0.42)
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4                # on the per-element KL, next to the per-element MSE
    centre_weight: float = 1e-1            # on the squared batch mean of each latent channel
    # stage 2: text encoder and UNet
    text_width: int = 64
    unet_channels: tuple = (64, 64, 64, 64)
    unet_steps: int = 2800
    unet_batch: int = 64
    unet_lr: float = 1e-3
    weight_decay: float = 1e-2
    p_empty: float = 0.1                   # share of empty captions (classifier-free guidance)
    min_snr_gamma: float = 5.0             # Min-SNR-γ loss weights min(SNR, γ)/SNR (Hang et al. 2023); 0: off
    ema_decay: float = 0.999               # 0: no EMA, save the trained weights
    judge_steps: int = 2_000               # the judge (judges.Recipe, trained also on this autoencoder's output)
    judge_n_train: int = 20_000
    save_dtype: str = "fp16"               # the saved weights' precision (fp16 keeps the shipped model small)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))   # tuples as lists, as they come back from a file


# --------------------------------------------------------------------------- components


def make_vae(recipe: Recipe):
    from diffusers import AutoencoderKL

    n = len(recipe.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=tuple(recipe.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=world.SIZE,
    )


def make_text_encoder(recipe: Recipe):
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models import CLIP_VOCAB_SIZE

    w = recipe.text_width
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=w, intermediate_size=2 * w, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=w,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )).requires_grad_(False).eval()


def make_unet(recipe: Recipe):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.SIZE // 2 ** (len(recipe.vae_channels) - 1), in_channels=4, out_channels=4,
        block_out_channels=tuple(recipe.unet_channels), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=recipe.text_width, attention_head_dim=8, norm_num_groups=32,
    )


def make_scheduler():
    """SD-1.x's noise schedule as a DDIM scheduler that never clips latents."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, prediction_type="epsilon")


def tokenizer():
    from ..models import CLIP_VOCAB_SIZE, clip_tokenizer

    tok = clip_tokenizer()
    if len(tok) != CLIP_VOCAB_SIZE:
        raise CpebenchError(f"micro world: the CLIP tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok


# --------------------------------------------------------------------------- the build


def _generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The random stream of one training step: a pure function of (seed, stage, step)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stage, step]).generate_state(1)[0]))


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return judges.to_tensor(images) * 2 - 1


def _set_lr(opt, lr: float, step: int, steps: int) -> None:
    for group in opt.param_groups:        # linear decay to 0, a pure function of the step
        group["lr"] = lr * (1 - step / steps)


def _save_state(state_dir: Path, state: dict) -> None:
    tmp = state_dir / f".{_STATE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, state_dir / _STATE)


def _load_state(state_dir: Path, recipe: Recipe) -> dict | None:
    path = state_dir / _STATE
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu")
    if state.get("format") != _FORMAT or state.get("recipe") != recipe.to_json():
        raise CpebenchError(f"{path}: saved by a build with another recipe ({state.get('recipe')}); delete "
                            f"{state_dir} to start anew, or pass the same options as the interrupted build")
    if state["threads"] != torch.get_num_threads():
        log.warning("%s was saved on %d threads, resuming on %d: the weights may differ in the last bits from "
                    "an uninterrupted build", path, state["threads"], torch.get_num_threads())
    return state


class _Stage:
    """One training loop: resumes from ``state``, checkpoints, shows a progress bar."""

    def __init__(self, name: str, steps: int, recipe: Recipe, state: dict, state_dir: Path, progress: bool,
                 on_step: Callable[[str, int], None] | None):
        self.name, self.steps, self.recipe = name, steps, recipe
        self.state, self.state_dir, self.progress, self.on_step = state, state_dir, progress, on_step

    def run(self, modules: dict, opt, step_fn: Callable[[int], float]) -> None:
        from tqdm.auto import tqdm

        s = self.state.setdefault(self.name, {"step": 0, "seconds": 0.0, "losses": []})
        if s["step"]:
            for key, m in modules.items():
                m.load_state_dict(s[key])
            opt.load_state_dict(s["opt"])
        bar = tqdm(total=self.steps, initial=s["step"], desc=f"microworld {self.name}", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        t0 = time.perf_counter() - s["seconds"]
        for step in range(s["step"], self.steps):
            loss = step_fn(step)
            s["losses"].append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            done = step + 1
            if done % self.recipe.checkpoint_every == 0 or done == self.steps:
                s.update(step=done, seconds=time.perf_counter() - t0, opt=opt.state_dict(),
                         **{k: m.state_dict() for k, m in modules.items()})
                _save_state(self.state_dir, self.state)
            if self.on_step:
                self.on_step(self.name, done)
        bar.close()


def build(out: str | Path, recipe: Recipe = Recipe(), *, progress: bool = True,
          on_step: Callable[[str, int], None] | None = None) -> Path:
    """Train the model by ``recipe`` and save it as a diffusers pipeline folder at ``out`` (with the
    recipe in ``microworld_build.json``). A folder that already holds a model is kept as it is. The
    training state lives in ``.<out>.build/`` next to it until the build finishes; an interrupted build
    resumes from it. ``on_step(stage, steps_done)`` is called after every step (tests interrupt there)."""
    out = Path(out)
    state_dir = out.parent / f".{out.name}.build"
    if (out / "model_index.json").exists():
        log.info("%s already holds a model; delete it to build anew", out)
        return out
    if out.exists() and any(out.iterdir()):
        raise CpebenchError(f"--out {out}: the folder exists and is not a micro-world model; choose an empty "
                            "or new folder")
    if out.exists():
        out.rmdir()
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / "pipeline"              # the folder appears whole, or not at all
    shutil.rmtree(tmp, ignore_errors=True)
    _train_and_save(tmp, recipe, state_dir, progress, on_step)
    os.replace(tmp, out)
    shutil.rmtree(state_dir)
    return out


def _train_and_save(tmp: Path, recipe: Recipe, state_dir: Path, progress: bool, on_step) -> None:
    from diffusers import StableDiffusionPipeline

    state = _load_state(state_dir, recipe) or {"format": _FORMAT, "recipe": recipe.to_json(),
                                                "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    images, captions, _ = world.batch("train", recipe.n_train)
    pool = torch.from_numpy(images)           # uint8 until a batch is drawn
    render_s = time.perf_counter() - t0

    torch.manual_seed(recipe.seed)
    vae = make_vae(recipe)
    _train_vae(vae, pool, recipe, _Stage("vae", recipe.vae_steps, recipe, state, state_dir, progress, on_step))
    vae.requires_grad_(False).eval()

    tok = tokenizer()
    torch.manual_seed(recipe.seed + 1)
    text_encoder = make_text_encoder(recipe)
    torch.manual_seed(recipe.seed + 2)
    unet = make_unet(recipe)
    latents, scaling_factor = _encode_pool(vae, pool, recipe)
    vae.register_to_config(scaling_factor=scaling_factor)
    judge_file = _train_judge(vae, recipe, state_dir)
    ema = _train_unet(unet, latents * scaling_factor, captions, tok, text_encoder, recipe,
                      _Stage("unet", recipe.unet_steps, recipe, state, state_dir, progress, on_step))

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet if ema is None else ema,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch_dtype_of(recipe.save_dtype))   # loading upcasts to the run's dtype; quality is measured so
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / JUDGE_FILE).parent.mkdir()
    shutil.copyfile(judge_file, tmp / JUDGE_FILE)
    (tmp / RECIPE_FILE).write_text(json.dumps(_record(recipe, state, scaling_factor, render_s), indent=2) + "\n")


def _train_judge(vae, recipe: Recipe, state_dir: Path) -> Path:
    """The world's judge, trained on renders and on this autoencoder's reconstructions of them (kept in
    the build state, so a resumed build does not train it again)."""
    path = state_dir / "judge.safetensors"
    if not path.exists():
        jr = judges.Recipe(seed=recipe.seed, steps=recipe.judge_steps, n_train=recipe.judge_n_train,
                           n_recon=min(judges.Recipe.n_recon, recipe.judge_n_train))

        @torch.no_grad()
        def reconstruct(images: np.ndarray, chunk: int = 256) -> np.ndarray:
            out = []
            for i in range(0, len(images), chunk):
                x = _pixels(torch.from_numpy(images[i:i + chunk]))
                y = vae.decode(vae.encode(x).latent_dist.mean).sample
                out.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
            return torch.cat(out).numpy()

        log.info("training the judge on renders and this autoencoder's reconstructions")
        judges.save(judges.train(jr, reconstruct=reconstruct), path.with_suffix(".tmp"), jr,
                    trained_on="renders and the reconstructions of this model's autoencoder")
        os.replace(path.with_suffix(".tmp"), path)
    return path


def _train_vae(vae, pool: torch.Tensor, recipe: Recipe, stage: _Stage) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    vae.train()

    def step(k: int) -> float:
        g = _generator(recipe.seed, 1, k)
        x = _pixels(pool[torch.randint(len(pool), (recipe.vae_batch,), generator=g)])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        recon = F.mse_loss(vae.decode(z).sample, x)
        kl = post.kl().mean() / post.mean[0].numel()
        centre = post.mean.mean((0, 2, 3)).pow(2).sum()      # keeps colour off the channel means
        loss = recon + recipe.kl_weight * kl + recipe.centre_weight * centre
        _set_lr(opt, recipe.vae_lr, k, recipe.vae_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    stage.run({"vae": vae}, opt, step)


@torch.no_grad()
def _encode_pool(vae, pool: torch.Tensor, recipe: Recipe, chunk: int = 256) -> tuple[torch.Tensor, float]:
    """The pool's latents, sampled once from the posterior (seeded), and SD's scaling factor for them."""
    g = _generator(recipe.seed, 3, 0)
    out = []
    for i in range(0, len(pool), chunk):
        post = vae.encode(_pixels(pool[i:i + chunk])).latent_dist
        out.append(post.mean + post.std * torch.randn(post.mean.shape, generator=g))
    z = torch.cat(out)
    return z, float(1 / z.std())


@torch.no_grad()
def _embed(captions: list[str], tok, text_encoder, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The text embeddings of the distinct captions (and ""), and each caption's row in them."""
    from ..models import text_embeddings

    distinct = ["", *sorted(set(captions))]
    row = {c: i for i, c in enumerate(distinct)}
    enc = SimpleNamespace(tokenizer=tok, text_encoder=text_encoder)
    table = torch.cat([text_embeddings(enc, distinct[i:i + chunk]) for i in range(0, len(distinct), chunk)])
    return table, torch.tensor([row[c] for c in captions])


def _train_unet(unet, latents: torch.Tensor, captions: list[str], tok, text_encoder, recipe: Recipe,
                stage: _Stage):
    """Train ``unet``; returns its EMA copy (None without EMA)."""
    import copy

    table, rows = _embed(captions, tok, text_encoder)
    scheduler = make_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=recipe.weight_decay)
    ema = copy.deepcopy(unet).requires_grad_(False) if recipe.ema_decay else None
    unet.train()

    def step(k: int) -> float:
        g = _generator(recipe.seed, 2, k)
        n = recipe.unet_batch
        i = torch.randint(len(latents), (n,), generator=g)
        z0 = latents[i]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(scheduler.config.num_train_timesteps, (n,), generator=g)
        empty = torch.rand(n, generator=g) < recipe.p_empty
        context = table[torch.where(empty, 0, rows[i])]
        pred = unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=context).sample
        per_sample = (pred - noise).pow(2).mean((1, 2, 3))
        if recipe.min_snr_gamma:   # less weight on the easy, nearly noise-free steps: faster convergence
            snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
            per_sample = per_sample * snr.clamp(max=recipe.min_snr_gamma) / snr
        loss = per_sample.mean()
        _set_lr(opt, recipe.unet_lr, k, recipe.unet_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:   # warm-up decay: early averages are not dominated by the random init
            d = min(recipe.ema_decay, (1 + k) / (10 + k))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(p, 1 - d)
        return loss.item()

    stage.run({"unet": unet, **({"ema": ema} if ema is not None else {})}, opt, step)
    unet.eval()
    return ema.eval() if ema is not None else None


def _record(recipe: Recipe, state: dict, scaling_factor: float, render_s: float) -> dict:
    import diffusers
    import transformers

    from .. import __version__

    def summary(name):
        s = state[name]
        tail = s["losses"][-50:]
        return {"steps": s["step"], "seconds": round(s["seconds"], 1), "final_loss": float(np.mean(tail))}

    return {
        "format": _FORMAT, "recipe": recipe.to_json(), "scaling_factor": scaling_factor,
        "prediction_type": "epsilon", "threads": state["threads"],
        "stages": {"vae": summary("vae"), "unet": summary("unet")}, "render_seconds": round(render_s, 1),
        "versions": {"cpebench": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }


# --------------------------------------------------------------------------- evaluation


EVAL_STEPS, EVAL_GUIDANCE = 25, 5.0     # protocol micro-v1's (benchmarks/tasks/_protocol_micro.yaml)


def evaluate(model, n: int = 120, *, judge: judges.Judge | str | Path | None = None, steps: int = EVAL_STEPS,
             guidance: float = EVAL_GUIDANCE, batch_size: int = 32, progress: bool = False) -> dict[str, float]:
    """Generate the first ``n`` held-out captions with the cpebench Engine (32×32, DDIM, ``steps``
    steps, CFG ``guidance``, seed = row) and read them with a judge (a path, a Judge, or None: the
    model folder's own judge). Returns, per kind, the share of images that show what the
    prompt asked for, over the prompts that state that kind (colour and shape: all; a character's
    name states its colour and shape), and ``n``."""
    from ..config import ProtocolConfig
    from ..data import PromptRecord
    from ..engine import Engine, WorkItem
    from ..models import load_pipeline

    if judge is None:
        if not isinstance(model, (str, Path)) or not (Path(model) / JUDGE_FILE).is_file():
            raise CpebenchError(f"{model}: no {JUDGE_FILE}; pass judge= (a Judge or its file)")
        judge = judges.load(Path(model) / JUDGE_FILE)[0]
    elif not isinstance(judge, judges.Judge):
        judge = judges.load(judge)[0]
    loaded = load_pipeline(str(model)) if isinstance(model, (str, Path)) else model
    protocol = ProtocolConfig(model=loaded.model_id, scheduler="ddim", steps=steps, guidance=guidance,
                              height=world.SIZE, width=world.SIZE)
    engine = Engine(loaded.pipe, protocol, batch_size=batch_size, progress=progress)
    heldout = list(world.samples("heldout", n))
    items = [WorkItem("micro_heldout", PromptRecord(f"heldout-{i}", s.caption, i, None, "heldout", None),
                      0, 1, "", guidance) for i, s in enumerate(heldout)]
    images = np.concatenate([engine.denoise(items[i:i + batch_size])[0] for i in range(0, n, batch_size)])
    return score(judge, images, [s.caption for s in heldout], [s.labels for s in heldout])


def score(judge: judges.Judge, images: np.ndarray, captions: list[str], labels: list[dict]) -> dict[str, float]:
    """Per kind, the judge's agreement with the labels over the prompts that state that kind."""
    read = judge.predict(images)
    out: dict[str, float] = {}
    for kind in judges.CLASSES:
        stated = [_states(kind, c, lab) for c, lab in zip(captions, labels)]
        hits = [read[kind][j] == (labels[j][kind] or judges.NONE) for j in range(len(labels)) if stated[j]]
        if hits:
            out[kind] = float(np.mean(hits))
    out["n"] = len(labels)
    return out


def _states(kind: str, caption: str, labels: dict) -> bool:
    if kind in ("colour", "shape"):
        return True
    if kind == "character":
        return labels["character"] is not None
    return labels[kind] in caption.split()      # background / style: only when the caption names it


def main(args) -> int:
    """``cpebench microworld build``: build (or resume) the model, then optionally evaluate it."""
    overrides = {k: getattr(args, k) for k in ("seed", "n_train", "vae_steps", "unet_steps", "judge_steps",
                                                   "checkpoint_every")
                 if getattr(args, k, None) is not None}
    recipe = Recipe(**overrides)
    out = build(args.out, recipe, progress=not args.quiet)
    print(f"micro-world model: {out}")
    if args.eval:
        acc = evaluate(out, args.eval, judge=args.judge, progress=not args.quiet)
        print("held-out accuracy: " + "  ".join(f"{k} {v:.3f}" if k != "n" else f"n {v}" for k, v in acc.items()))
        if args.judge is None:     # the model's own judge: the figures belong in its record
            path = out / RECIPE_FILE
            record = json.loads(path.read_text())
            record["evaluation"] = {"split": "heldout", "steps": EVAL_STEPS, "guidance": EVAL_GUIDANCE,
                                    "judge": JUDGE_FILE, "accuracy": acc}
            path.write_text(json.dumps(record, indent=2) + "\n")
    return 0
