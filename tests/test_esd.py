"""ESD-x / ESD-u on the tiny random SD-1.x model: the defining properties of the paper code (docs/methods/esd.md)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from baselines import esd
from baselines.esd import ESDu, ESDx, Hparams, Trainer
from cpebench.errors import ConfigError
from cpebench.methods import Artifact, Concept, EraseContext

FAST = {"iterations": 3, "ddim_steps": 6}     # a short schedule: t_enc in 0..5, at most 5 DDIM steps


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from cpebench.models import load_pipeline

    return load_pipeline(str(tiny_dir)).pipe


def snapshot(unet) -> dict:
    return {n: (p, p.detach().clone()) for n, p in unet.named_parameters()}


def assert_unchanged(unet, snap) -> None:
    """Same parameter objects holding the same bits, no gradients requested or kept."""
    now = dict(unet.named_parameters())
    assert set(now) == set(snap)
    for n, (obj, value) in snap.items():
        assert now[n] is obj and torch.equal(obj, value), n
        assert not obj.requires_grad and obj.grad is None, n


def erase(method, pipe, hparams=None, concepts=("a cat",), ctx=None):
    return method.erase(pipe, [Concept(c) for c in concepts], {**FAST, **(hparams or {})},
                        ctx or EraseContext(progress=False))


@pytest.fixture(scope="module")
def trained(pipe):
    return {m.name: erase(m, pipe) for m in (ESDx(), ESDu())}


def probe(pipe, artifact=None, method=None):
    """ε of the (erased) model on fixed inputs: the concept prompt at four noise levels."""
    from contextlib import nullcontext

    from cpebench.models import text_embeddings

    g = torch.Generator().manual_seed(123)
    x = torch.randn(4, 4, 8, 8, generator=g)
    with torch.no_grad():
        context = text_embeddings(pipe, ["a cat"] * 4)
        with (method.apply(pipe, artifact) if artifact is not None else nullcontext()):
            return pipe.unet(x, torch.tensor([100, 400, 700, 950]), encoder_hidden_states=context).sample


# --------------------------------------------------------------------------- parameter subsets


def test_subsets_are_the_paper_rules_on_compvis_names(pipe):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    names = [n for n, _ in pipe.unet.named_parameters()]
    cv = esd.compvis_names(names)
    # our diffusers -> CompVis map is exactly the inverse of diffusers' own CompVis converter
    state = dict(pipe.unet.state_dict())
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + cv[n]: state[n] for n in names}, {"layers_per_block": 2})
    assert set(back) == set(names) and all(back[n] is state[n] for n in names)

    x = esd.subset_names(names, "xattn")
    assert x == [n for n in names if ".attn2." in n] and len(x) == 16 * 5
    assert {n.split("attn2.")[1] for n in x} == {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}
    u = set(esd.subset_names(names, "noxattn"))
    excluded = {n for n in names if ".attn2." in n or n.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))}
    assert u == set(names) - excluded
    assert {"conv_in.weight", "down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.resnets.0.time_emb_proj.weight",
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight", "up_blocks.1.attentions.0.proj_out.weight",
            "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight",
            "up_blocks.3.attentions.2.transformer_blocks.0.norm2.weight"} <= u
    assert {n.split(".transformer")[0] for n in esd.subset_names(names, "xlayer")} == \
        {"up_blocks.2.attentions.0", "up_blocks.2.attentions.2"}          # CompVis output_blocks.6 / .8
    assert {n.split(".transformer")[0] for n in esd.subset_names(names, "selflayer")} == \
        {"down_blocks.1.attentions.0", "down_blocks.2.attentions.0"}      # CompVis input_blocks.4 / .7


@pytest.mark.parametrize("method", [ESDx(), ESDu()], ids=lambda m: m.name)
def test_only_the_chosen_variant_parameters_change(pipe, trained, method):
    snap = snapshot(pipe.unet)
    art = trained[method.name]
    names = [n for n, _ in pipe.unet.named_parameters()]
    subset = esd.subset_names(names, method.default_train_method)
    # Every trained tensor that moved is stored, nothing else. (The tiny UNet's mid block works on a 1x1
    # latent: self-attention over one token gives attn1.to_q/to_k a zero gradient, so they do not move.)
    unmoved = {f"mid_block.attentions.0.transformer_blocks.0.attn1.to_{p}.weight" for p in "qk"}
    assert set(art.tensors) == set(subset) - (unmoved if method.name == "esd-u" else set())
    assert all(not torch.equal(art.tensors[n], snap[n][1]) for n in art.tensors)
    if method.name == "esd-x":
        assert all(".attn2." in n for n in art.tensors)
    else:
        assert not any(".attn2." in n or n.startswith(("time_embedding", "conv_out", "conv_norm_out")) for n in art.tensors)
    with method.apply(pipe, art):                     # in the erased model, exactly those differ from the base
        changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, snap[n][1])}
    assert changed == set(art.tensors)
    assert_unchanged(pipe.unet, snap)
    assert art.metadata["train_method"] == method.default_train_method
    assert art.metadata["train"]["iterations"] == 3 and len(art.metadata["train"]["loss_mean_per_50"]) == 1


# --------------------------------------------------------------------------- the objective and the sampler


def test_one_step_moves_the_prediction_toward_the_spec_target(pipe):
    snap = snapshot(pipe.unet)
    frozen = copy.deepcopy(pipe.unet)
    exact = copy.deepcopy(pipe.unet).double()
    eta = 1.5
    hp = Hparams(train_method="xattn", ddim_steps=6, negative_guidance=eta, seed=3)     # the paper's lr 1e-5
    from cpebench.models import text_embeddings

    with torch.no_grad():
        emb, uncond = text_embeddings(pipe, ["a cat", "a dog"]), text_embeddings(pipe, [""])
    trainer = Trainer(pipe.unet, emb, uncond, hp, esd.ldm_alphas_cumprod(pipe.scheduler.config), 8)
    try:
        d = trainer.draw()
        z = trainer.sample_xt(d)
        target = trainer.target(z, d)
        with torch.no_grad():                   # the paper code's target, from an independent copy of the base model
            t = torch.tensor([d.t])
            e_0, e_p = (frozen(z, t, encoder_hidden_states=c).sample for c in (uncond, emb[d.word : d.word + 1]))
            x_0, x_p = (exact(z.double(), t, encoder_hidden_states=c.double()).sample
                        for c in (uncond, emb[d.word : d.word + 1]))
            before = trainer.prediction(z, d)
        # Up to fp32 rounding (the trainer batches its UNet calls); the floors: the reference's distance from
        # the same computation in float64. Measured on AVX2/AVX-512, forced and not: the target differs by
        # 1.1-1.3x its floor, the untrained prediction is bit-identical to the base's; margin 4x.
        reference = e_0 - eta * (e_p - e_0)
        assert (target - reference).abs().max() <= 4 * (reference - (x_0 - eta * (x_p - x_0))).abs().max()
        assert (before - e_p).abs().max() <= 4 * (e_p - x_p).abs().max()   # not trained yet: edited model = base
        loss = trainer.update(z, d, target)
        with torch.no_grad():
            after = trainer.prediction(z, d)
        # the trainer's F.mse_loss vs this mean: two fp32 sums of N squares differ by ≤ N·u relative (measured: equal)
        assert loss == pytest.approx(float(((before - target) ** 2).mean()), rel=before.numel() * 2.0**-24)
        assert (after - target).norm() < (before - target).norm()
        assert float(((after - before) * (target - before)).sum()) > 0     # it moved toward the target
    finally:
        trainer.close()
    assert_unchanged(pipe.unet, snap)


def test_paper_schedule_keeps_the_official_sampler_offset():
    abar = esd.ldm_alphas_cumprod({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                   "num_train_timesteps": 1000})
    assert esd.ddim_timesteps(50)[:3] == [1, 21, 41] and esd.ddim_timesteps(50)[-1] == 981
    level = {a: t for t, a in enumerate(abar)}
    for k in range(50):
        plan = esd.paper_plan(k, 50, abar)
        assert plan[0][0] == 961                                   # 981 is skipped (t_start=-1)
        assert [s[0] for s in plan] == list(range(961, 961 - 20 * len(plan), -20))
        assert all(plan[i][2] == plan[i + 1][1] for i in range(len(plan) - 1))
        final = level[plan[-1][2]]
        assert final == (20 * (k - 2) + 1 if k >= 2 else 0)          # x_t is 2-3 DDIM steps less noisy than t
        assert len(plan) == min(49, 50 - k)
    for t in (0, 7, 500, 979, 981, 999):                              # aligned: x_t lands exactly on t's level
        plan = esd.aligned_plan(t, 50, abar)
        assert (level[plan[-1][2]] == t and plan[0][0] == 981) if t < 981 else plan == []


def test_ddim_step_is_diffusers_ddim_with_eta_0():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    abar = s.alphas_cumprod.tolist()
    for t, prev in ((961, abar[941]), (1, abar[0])):   # up to fp32 rounding: 4x ours' distance from float64
        ours = esd.ddim_step(x, e, abar[t], prev)      # (measured: bit-identical on AVX2/AVX-512, forced and not)
        floor = (ours - esd.ddim_step(x.double(), e.double(), abar[t], prev)).abs().max()
        assert (ours - s.step(e, t, x, eta=0.0).prev_sample).abs().max() <= 4 * floor
    # Ours: float64, rounded once to fp32. diffusers' ᾱ is fp32 throughout: linspace, square, 1 − β and a
    # cumulative product of T factors, each rounding by ≤ u = 2⁻²⁴ relative, so |ᾱ_diffusers − ᾱ| ≤ (T + 4) u
    # (ᾱ ≤ 1; measured 4.8e-7, 0.008 of it). An off-by-one t moves the early ᾱ by ~β_0 = 8.5e-4.
    ours = esd.ldm_alphas_cumprod(s.config)
    assert max(abs(a - b) for a, b in zip(ours, abar)) <= (len(abar) + 4) * 2.0**-24


# --------------------------------------------------------------------------- resume, precision


def test_killed_training_resumes_with_identical_weights(pipe, tmp_path, kill_at):
    hp = {"iterations": 5, "save_every": 2}
    reference = erase(ESDx(), pipe, hp)
    calls = kill_at(esd, "train_step", 4)
    ctx = EraseContext(progress=False, workdir=tmp_path / "state")
    snap = snapshot(pipe.unet)
    with pytest.raises(KeyboardInterrupt):
        erase(ESDx(), pipe, hp, ctx=ctx)
    assert_unchanged(pipe.unet, snap)                  # restored even when killed
    assert (tmp_path / "state" / esd.STATE_FILE).exists()
    calls.update(n=0, at=None)                            # count the resumed run's steps, no kill
    resumed = erase(ESDx(), pipe, hp, ctx=ctx)
    assert calls["n"] == 3                              # steps 3, 4, 5: resumed after the state of step 2
    assert set(resumed.tensors) == set(reference.tensors)
    for k, v in reference.tensors.items():
        assert torch.equal(v, resumed.tensors[k]), k
    assert resumed.metadata["train"]["loss_mean_per_50"] == reference.metadata["train"]["loss_mean_per_50"]
    # a state of another training (other hparams) is not reused
    erase(ESDx(), pipe, {**hp, "iterations": 4, "save_every": 4}, ctx=ctx)
    assert calls["n"] == 7


@pytest.mark.parametrize("method", [ESDx(), ESDu()], ids=lambda m: m.name)
def test_checkpointing_and_autocast_stay_within_tolerance_of_fp32(pipe, method):
    hp = {"iterations": 4}
    ref = erase(method, pipe, hp)
    ckpt = erase(method, pipe, {**hp, "gradient_checkpointing": True})
    for k, v in ref.tensors.items():
        torch.testing.assert_close(ckpt.tensors[k], v, rtol=0, atol=1e-7)
    assert not pipe.unet.is_gradient_checkpointing
    base, e_ref = probe(pipe), probe(pipe, ref, method)

    def rel(a):   # difference of the erased models' ε, relative to what the erasure changed
        return float((probe(pipe, a, method) - e_ref).norm() / (e_ref - base).norm())

    # The noise floor: how far another training seed moves the erased model (mean of three seeds; measured
    # 0.28-0.33 on AVX2 and AVX-512 CPUs). fp16 autocast (10-bit mantissa, loss-scaled) stays far inside it
    # (measured 0.01-0.04: margin 4x); bf16 (7-bit mantissa) moves Adam's few normalised steps about as much
    # as a seed does (measured 0.05-0.27, machine-dependent): it must stay within the seed-to-seed
    # spread (margin 1.5x over the mean) — a broken autocast path (overflow, wrong dtype) is far beyond it.
    floor = sum(rel(erase(method, pipe, {**hp, "seed": s})) for s in (1, 2, 3)) / 3
    assert rel(erase(method, pipe, {**hp, "autocast": "fp16"})) < floor / 4
    assert rel(erase(method, pipe, {**hp, "autocast": "bf16"})) < 1.5 * floor
    assert "autocast" not in method.operational_hparams      # it changes bits: part of the cache key
    assert {"gradient_checkpointing", "save_every"} <= set(method.operational_hparams)


# --------------------------------------------------------------------------- apply / artifacts


def test_apply_and_remove_are_bit_exact(pipe, trained):
    snap = snapshot(pipe.unet)
    base = probe(pipe)
    for method in (ESDx(), ESDu()):
        art = trained[method.name]
        with method.apply(pipe, art):
            for n, p in pipe.unet.named_parameters():
                assert torch.equal(p, art.tensors[n] if n in art.tensors else snap[n][1]), n
            erased = probe(pipe)
        assert not torch.equal(erased, base)
        assert_unchanged(pipe.unet, snap)
        assert torch.equal(probe(pipe), base)


def test_artifact_round_trip_stores_only_the_changed_tensors(pipe, trained, tmp_path):
    art = trained["esd-x"]
    art.save(tmp_path / "a")
    stored = load_file(str(tmp_path / "a" / "weights.safetensors"))
    assert set(stored) == set(art.tensors) and len(stored) == 80
    loaded = ESDx().load_artifact(tmp_path / "a")
    assert loaded.sha256 == art.sha256
    for k, v in art.tensors.items():
        assert loaded.tensors[k].dtype == v.dtype and torch.equal(loaded.tensors[k], v)
    assert torch.equal(probe(pipe, loaded, ESDx()), probe(pipe, art, ESDx()))
    with pytest.raises(Exception, match="'esd-x' artifact, not 'esd-u'"):
        ESDu().load_artifact(tmp_path / "a")


def test_official_checkpoints_load(pipe, trained, tmp_path):
    """The paper code's full diffusers UNet .pt, its CompVis checkpoint and HEAD's safetensors of the trained
    parameters only: each becomes an artifact with only the variant's tensors, applied like ours."""
    x, u = trained["esd-x"], trained["esd-u"]
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    full = {**state, **x.tensors}
    name = "diffusers-word_VanGogh-method_xattn-sg_3-ng_1-iter_1000-lr_1e-05.pt"
    torch.save(full, tmp_path / name)
    cv = esd.compvis_names(list(state))
    torch.save({"state_dict": {"model.diffusion_model." + cv[k]: v for k, v in full.items()}, "global_step": 1000},
               tmp_path / name.replace("diffusers-", "compvis-"))
    expected = probe(pipe, x, ESDx())
    for f in (name, name.replace("diffusers-", "compvis-")):
        art = ESDx().load_artifact(tmp_path / f)
        assert set(art.tensors) == set(x.tensors) and art.metadata["concepts"] == ["VanGogh"]
        assert art.metadata["train_method"] == "xattn" and art.metadata["dropped_tensors"] == len(state) - 80
        assert torch.equal(probe(pipe, art, ESDx()), expected)
    with pytest.raises(ConfigError, match="--method esd-x"):
        ESDu().load_artifact(tmp_path / name)

    head = tmp_path / "esd-nudity-from-nudity-esd-u.safetensors"
    save_file({k: v.contiguous() for k, v in u.tensors.items()}, str(head))
    art = ESDu().load_artifact(head)
    assert set(art.tensors) == set(u.tensors) and art.metadata["concepts"] == ["nudity"]
    assert torch.equal(probe(pipe, art, ESDu()), probe(pipe, u, ESDu()))
    with pytest.raises(ConfigError, match="not an ESD-x checkpoint; use --method esd-u"):
        ESDx().load_artifact(head)


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error(pipe, trained):
    with pytest.raises(ConfigError, match="esd-x: no concepts to erase"):
        ESDx().erase(pipe, [], FAST)
    with pytest.raises(ConfigError, match="non-empty and distinct"):
        ESDx().erase(pipe, [Concept("a cat"), Concept("A cat")], FAST)
    with pytest.raises(ConfigError, match=r"unknown parameter subset train_method='noxattn'.*--method esd-u"):
        ESDx().erase(pipe, [Concept("a cat")], {**FAST, "train_method": "noxattn"})
    with pytest.raises(ConfigError, match=r"unknown parameter subset train_method='attn3'; esd-u trains one of noxattn"):
        ESDu().erase(pipe, [Concept("a cat")], {**FAST, "train_method": "attn3"})
    with pytest.raises(ConfigError, match=r"unknown hyperparameter\(s\) negative_guidence.*Did you mean 'negative_guidance'"):
        ESDx().erase(pipe, [Concept("a cat")], {"negative_guidence": 1.0})
    with pytest.raises(ConfigError, match="hparams.autocast must be one of none, bf16, fp16"):
        ESDx().erase(pipe, [Concept("a cat")], {"autocast": "fp8"})
    with pytest.raises(ConfigError, match="hparams.iterations must be int"):
        ESDx().erase(pipe, [Concept("a cat")], {"iterations": "many"})
    bad = Artifact(method="esd-x", tensors={"down_blocks.0.attn9.weight": torch.zeros(1)}, metadata={})
    with pytest.raises(ConfigError, match="tensors this UNet does not have"):
        ESDx().apply(pipe, bad)
    art = trained["esd-x"]
    other_base = Artifact(method="esd-x", tensors=art.tensors,
                          metadata={**art.metadata, "base_checksum": [1.0, 1.0], "base_model": "other"})
    with pytest.raises(ConfigError, match="trained on base model 'other'"):
        ESDx().apply(pipe, other_base)


# --------------------------------------------------------------------------- command line


def test_cli_runs_both_variants_and_reuses_the_cached_artifact(data_env, tiny_dir, tmp_path, monkeypatch, capsys):
    from cpebench.cli import main

    assert main(["-q", "run", "--method", "esd-x", "--task", "celebrity", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    gen = json.loads((tmp_path / "esd-x-celebrity-tiny-smoke" / "generation.json").read_text())
    assert len(gen["method"]["concepts"]) == 50
    art = Artifact.load(gen["method"]["artifact_path"])
    assert art.metadata["hparams"]["iterations"] == 3 and art.metadata["train_method"] == "xattn"
    assert all(".attn2." in k for k in art.tensors)
    assert (tmp_path / "esd-x-celebrity-tiny-smoke" / "summary.json").exists()

    assert main(["-q", "run", "--method", "esd-u", "--task", "nudity", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    gen = json.loads((tmp_path / "esd-u-nudity-tiny-smoke" / "generation.json").read_text())
    assert gen["method"]["concepts"] == ["nudity"]          # the ESD paper's nudity model erases the one word
    assert Artifact.load(gen["method"]["artifact_path"]).metadata["train_method"] == "noxattn"

    def no_training(*a, **k):
        raise AssertionError("the cached artifact should have been reused")

    real_train = esd.train
    monkeypatch.setattr(esd, "train", no_training)
    assert main(["-q", "generate", "--method", "esd-u", "--task", "nudity", "--preset", "smoke", "--out", str(tmp_path),
                 "--name", "again"]) == 0
    again = json.loads((tmp_path / "again" / "generation.json").read_text())
    assert again["method"]["artifact_sha256"] == gen["method"]["artifact_sha256"]
    monkeypatch.setattr(esd, "train", real_train)
    # the paper's single-word nudity model: a subset of the task's concepts with the task's hyperparameters
    assert main(["-q", "erase", "--method", "esd-u", "--task", "nudity", "--concepts", "nudity", "--preset", "smoke",
                 "--save", str(tmp_path / "nudity-only")]) == 0
    assert Artifact.load(tmp_path / "nudity-only").metadata["concepts"] == ["nudity"]
    assert main(["-q", "ls", "methods"]) == 0
    out = capsys.readouterr().out
    assert "esd-x" in out and "esd-u" in out and "rohitgandikota/erasing@a2189e9" in out and "lr 1e-5" in out
