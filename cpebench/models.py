"""Loading SD-1.x pipelines (hub id | local dir | in-process tiny model) and finding their layers.

Everything goes through ``StableDiffusionPipeline.from_pretrained`` so the tiny test model exercises
the same path as CompVis/stable-diffusion-v1-4.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError

log = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Files of an SD-1.x hub repo that the pipeline needs (not the 4 GB .ckpt, not the safety checker).
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "unet/*.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/*.json",
    "vae/diffusion_pytorch_model.safetensors",
]
TINY = "tiny"
RANDOM_SD14 = "random-sd14"   # SD-1.4's architecture with random weights (GPU benchmarks without the hub)
MICRO = "micro"               # the micro world's trained tiny model, shipped with cpebench (microworld/model)


@dataclass
class LoadedModel:
    pipe: object                 # diffusers.StableDiffusionPipeline
    model_id: str                # as the user gave it
    revision: str | None         # hub commit hash, or None for a local dir
    local_path: str
    info: dict = field(default_factory=dict)   # recorded in the protocol card

    @property
    def is_tiny(self) -> bool:
        return self.model_id == TINY


# --------------------------------------------------------------------------- tokenizer


def write_clip_tokenizer_files(out_dir: str | Path) -> Path:
    """Write vocab.json/merges.txt of the real 49,408-token CLIP BPE (shipped in open_clip's wheel)
    with SD's special-token names, so ``CLIPTokenizer.from_pretrained`` works offline."""
    from open_clip.tokenizer import default_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    # The vocabulary order of CLIP's BPE: bytes, bytes+</w>, merges, then the two special tokens.
    from open_clip.tokenizer import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77,
                                                           "tokenizer_class": "CLIPTokenizer"}))
    return out


def clip_tokenizer():
    """The real CLIP tokenizer (SD's ids), built offline from the open_clip wheel."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        write_clip_tokenizer_files(d)
        tok = CLIPTokenizer.from_pretrained(d)  # the same path SD's tokenizer/ folder takes
    check_tokenizer(tok, "open_clip bpe_simple_vocab_16e6")
    return tok


def check_tokenizer(tokenizer, source: str) -> None:
    """A hub tokenizer that failed to download can come back with 2 tokens; refuse it loudly."""
    n = len(tokenizer)
    if n != CLIP_VOCAB_SIZE:
        raise ModelLoadError(
            f"tokenizer from {source} has {n} tokens, expected the {CLIP_VOCAB_SIZE}-token CLIP vocabulary "
            "(an incomplete download or a non-SD-1.x model). Re-download the model or pass a local directory "
            "whose tokenizer/ holds vocab.json and merges.txt."
        )
    ids = tokenizer("a photo").input_ids
    if ids[0] != 49406 or ids[-1] != 49407:
        raise ModelLoadError(f"tokenizer from {source} does not use SD's special tokens (got ids {ids})")


# --------------------------------------------------------------------------- tiny model


def sd14_scheduler():
    """SD-1.4's shipped scheduler config (scheduler/scheduler_config.json)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )


def tiny_components(seed: int = 0, tokenizer=None) -> dict:
    """A random-weight model with SD-1.x's structure (16 attn2 layers, CLIP tokenizer) in ~3 M params.
    Latent 4 channels, VAE factor 8, text width 32."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )
    )
    scheduler = sd14_scheduler()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer or clip_tokenizer(), scheduler=scheduler)


def sd14_random_components(seed: int = 0) -> dict:
    """Stable Diffusion v1.4's architecture (UNet 860 M, VAE, CLIP ViT-L/14 text encoder) with random
    weights: the compute of the real model, for benchmarks on machines that cannot reach the hub."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=32, sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = sd14_scheduler()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), scheduler=scheduler)


def save_tiny_pipeline(path: str | Path, seed: int = 0, kind: str = TINY) -> Path:
    """Build the tiny (or random SD-1.4) model and ``save_pretrained`` it, so it loads like a hub model."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    components = tiny_components(seed) if kind == TINY else sd14_random_components(seed)
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def tiny_model_dir(seed: int = 0, kind: str = TINY) -> Path:
    """The tiny (or random SD-1.4) model saved once in the user cache (weights are a deterministic
    function of the seed and the installed library versions)."""
    from . import data
    import diffusers
    import torch

    tag = f"{kind}-seed{seed}-torch{torch.__version__}-diffusers{diffusers.__version__}"
    return build_once(data.cache_dir() / "models" / tag, "model_index.json", lambda d: save_tiny_pipeline(d, seed, kind))


def build_once(path: Path, marker: str, build) -> Path:
    """A cached model folder: ``build(tmp_dir)`` runs only if ``path/marker`` is missing, and the folder
    appears atomically (a concurrent process that loses the race discards its copy)."""
    if not (path / marker).exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        build(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# --------------------------------------------------------------------------- loading


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_model_dir(model: str, revision: str | None = None, *, allow_patterns: list[str] | None = None,
                      option: str = "--model") -> tuple[Path, str | None]:
    """A local directory for ``model`` (hub id or path) and the hub commit it came from. ``option`` is
    how the user passes a local copy instead (named in the error)."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"model {model!r} is a file; pass a diffusers model directory (with model_index.json)")
        return p, None
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/") and model.count("/") != 1:
        raise ModelLoadError(f"model directory {model!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    hint = (
        f"Download it once on a machine with network (e.g. `huggingface-cli download {model}`) or pass a local "
        f"directory saved with `save_pretrained`: {option}{' ' if option.startswith('-') else '='}/path/to/{model.split('/')[-1]}"
    )
    try:  # cached first: never touches the network
        local = snapshot_download(model, revision=revision, allow_patterns=allow_patterns or HUB_ALLOW_PATTERNS,
                                  local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        if _offline():
            raise ModelLoadError(f"model {model!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1. {hint}") from None
        try:
            local = snapshot_download(model, revision=revision, allow_patterns=allow_patterns or HUB_ALLOW_PATTERNS)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
            raise ModelLoadError(f"cannot download model {model!r}: {type(e).__name__}: {str(e)[:300]}. {hint}") from None
    local = Path(local)
    commit = local.name if local.parent.name == "snapshots" else revision
    return local, commit


def check_sd_dir(path: Path, model: str) -> None:
    index = path / "model_index.json"
    if not index.exists():
        raise ModelLoadError(f"model {model!r}: {path} has no model_index.json; it is not a diffusers pipeline directory")
    try:
        spec = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"model {model!r}: {index} is not valid JSON: {e}") from None
    missing = [c for c in SD_COMPONENTS if c not in spec or not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(f"model {model!r}: {path} is not a Stable Diffusion 1.x pipeline (missing {', '.join(missing)})")
    unet_cfg = json.loads((path / "unet" / "config.json").read_text()) if (path / "unet" / "config.json").exists() else {}
    cad = unet_cfg.get("cross_attention_dim")
    if isinstance(cad, (list, tuple)) or cad in (1024, 2048):  # SD-2.x / SDXL text widths
        raise ModelLoadError(f"model {model!r}: unet cross_attention_dim={cad}; cpebench supports SD-1.x (768)")


def load_pipeline(model: str, *, revision: str | None = None, dtype: str = "fp32", device: str = "cpu",
                  vae_dtype: str | None = None) -> LoadedModel:
    """Load an SD-1.x pipeline with no safety checker. ``model`` = hub id, local dir, "tiny", or "micro".
    ``vae_dtype`` gives the VAE its own precision (default: ``dtype``)."""
    from diffusers import StableDiffusionPipeline

    if model in (TINY, RANDOM_SD14):
        path, commit = tiny_model_dir(kind=model), None
    elif model == MICRO:     # the shipped files' hash stands in for a hub commit: caches follow the weights
        from .microworld.shipped import fingerprint, model_dir

        path, commit = model_dir(), f"shipped-{fingerprint()[:16]}"
    else:
        path, commit = resolve_model_dir(model, revision)
    check_sd_dir(path, model)
    torch_dtype = torch_dtype_of(dtype)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, dtype=torch_dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"model {model!r}: cannot load the pipeline from {path}: {str(e)[:400]}") from None
    check_tokenizer(pipe.tokenizer, f"model {model!r} ({path / 'tokenizer'})")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if vae_dtype is not None:
        pipe.vae.to(torch_dtype_of(vae_dtype))
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    n_attn2 = len(cross_attention_names(pipe.unet))
    if n_attn2 != 16:
        raise ModelLoadError(f"model {model!r}: found {n_attn2} cross-attention (attn2) layers; SD-1.x has 16")
    info = {
        "model_id": model,
        "revision": commit,
        "local_path": str(path),
        "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
        "scheduler_class": type(pipe.scheduler).__name__,
        "cross_attention_dim": pipe.unet.config.cross_attention_dim,
    }
    return LoadedModel(pipe=pipe, model_id=model, revision=commit, local_path=str(path), info=info)


def torch_dtype_of(name: str):
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise ModelLoadError(f"dtype {name!r} unknown; choose one of {', '.join(table)}")
    return table[name]


def text_embeddings(pipe, prompts, device=None):
    """SD's conditioning: the text encoder's last hidden states of the prompts padded (and truncated)
    to the tokenizer's 77 tokens. Generation and every method's training share this."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return enc(ids.to(device if device is not None else enc.device, non_blocking=True))[0]   # no host wait on a GPU


def cross_attention_names(unet) -> list[str]:
    """Processor keys of the cross-attention layers (``...attn2.processor``): 16 in SD-1.x."""
    return [k for k in unet.attn_processors if k.endswith("attn2.processor")]
