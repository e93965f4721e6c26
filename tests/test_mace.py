"""MACE on the tiny random SD-1.x model: the defining properties of the official code (docs/methods/mace.md).

Reference quantities (token rows, normal equations, objectives) are rebuilt here from the tokenizer and
text encoder, independently of the sums baselines/mace.py accumulates."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines import mace as M
from baselines.mace import MACE
from cpebench.errors import ConfigError, CpebenchError, DataError
from cpebench.methods import Artifact, Concept, EraseContext

NAMES = ["van gogh", "melania trump"]
CAPTIONS = ["a dog running on the beach", "two people at a table with food", "a red bus on a city street",
            "a cat sleeping on a sofa", "a bowl of fruit", "a man riding a horse", "a kitchen with a stove",
            "a plane in the sky", "children playing football", "a bird on a branch"]
FAST = {"max_train_steps": 3, "n_images": 2, "resolution": 64, "data_steps": 2, "data_batch_size": 2, "prior_prompts": CAPTIONS,
            "prior_cache_scale": 1.0, "mapping": "a person"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny):
    return tiny.pipe


@pytest.fixture(scope="module")
def w0(pipe):
    return M.layer_weights(pipe.unet, "cpu")


@torch.no_grad()
def rows(pipe, text):
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0][0].double()


def pair_rows(pipe, hp, names, maps):
    """(c, c') for every aligned pair, stacked."""
    cs, ms = [], []
    for n, m in zip(names, maps):
        for te, tm in zip(M.prompts_for(hp, n), M.prompts_for(hp, m)):
            ie, im = M.match_indices(M.unpadded_ids(pipe.tokenizer, te), M.unpadded_ids(pipe.tokenizer, tm))
            cs.append(rows(pipe, te)[ie])
            ms.append(rows(pipe, tm)[im])
    return torch.cat(cs), torch.cat(ms)


def all_rows(pipe, texts):
    return torch.cat([rows(pipe, t) for t in texts])


# --------------------------------------------------------------------------- token matching


def test_match_indices_spec_example():
    B, E = 49406, 49407
    ie, im = M.match_indices([B, 1, 9, 2, E], [B, 1, 7, 8, 2, E])
    assert len(ie) == len(im) == 75 == 77 - max(1, 2)
    assert ie[:4] == [0, 1, 3, 4] and im[:4] == [0, 1, 4, 5]          # BOS, prefix, suffix, EOS
    assert 2 not in ie and 2 not in im and 3 not in im                 # the differing span is dropped
    assert ie[4] == 5 and im[4] == 6                                   # first padding rows aligned from EOS
    assert ie[-1] == 75 and im[-1] == 76                               # the longer prompt runs through 76
    same = [B, 1, 2, 3, E]
    assert M.match_indices(same, same) == (list(range(77)), list(range(77)))


@pytest.mark.parametrize("hp_kw", [{"concept_type": "object"}, {"concept_type": "style"}])
def test_matching_excludes_exactly_the_concept_tokens(pipe, hp_kw):
    hp = M.Hparams.from_dict(hp_kw)
    tok = pipe.tokenizer
    for name, mapping in [("van gogh", "art"), ("melania trump", "a woman")]:
        for te, tm in zip(M.prompts_for(hp, name), M.prompts_for(hp, mapping)):
            e = M.unpadded_ids(tok, te)
            ie, _ = M.match_indices(e, M.unpadded_ids(tok, tm))
            dropped = set(range(77)) - set(ie)
            span = set(M.concept_positions(tok, te, name, use_pooler=False))
            # the concept's tokens are dropped; the shorter side also loses its last padding rows
            assert dropped & set(range(len(e))) == span, te
            assert len(ie) == 77 - max(len(span), len(M.unpadded_ids(tok, tm)) - len(e) + len(span))


def test_concept_positions_are_span_plus_eos_padding(pipe):
    tok = pipe.tokenizer
    prompt = "An oil portrait of melania trump"
    ids = tok(prompt, padding="max_length", max_length=77).input_ids
    n = len(tok(prompt).input_ids)
    pos = M.concept_positions(tok, prompt, "melania trump")
    span = tok("melania trump", add_special_tokens=False).input_ids
    assert pos == list(range(n - 1 - len(span), n - 1)) + list(range(n - 1, 77))
    assert all(ids[i] == 49407 for i in pos[len(span):])
    with pytest.raises(DataError, match="does not occur"):
        M.concept_positions(tok, "a photo of a dog", "melania trump")


# --------------------------------------------------------------------------- stage 1


@pytest.mark.parametrize("mode", ["squared", "linear"])
def test_stage1_normal_equations_and_objective(pipe, w0, mode):
    hp = M.Hparams.from_dict(dict(FAST, train_preserve_scale=0.3, stage1_preserve=mode, lamb=0.5))
    maps = ["a person", "a woman"]
    pres, _rec = M.preservation(pipe, hp, NAMES, "cpu", cache_root=None)
    terms = M.stage1_terms(pipe, NAMES, maps, hp, "cpu")
    sigma = 0.09 if mode == "squared" else 0.3
    assert hp.preserve_sigma1() == pytest.approx(sigma)
    w1, _, _ = M.stage1(w0, terms, pres, hp.lamb, sigma)
    c, cm = pair_rows(pipe, hp, NAMES, maps)
    p = all_rows(pipe, CAPTIONS)
    assert terms.pairs == c.shape[0]
    # float64 sums of the same fp32 rows (MACE encodes the captions in batches, this test one at a time; the tiny
    # encoder's rows come out bit-identical, measured on AVX2/AVX-512, forced and not): float64 rounding only
    assert torch.allclose(pres, p.T @ p, rtol=1e-10, atol=1e-8)
    eye = torch.eye(c.shape[1], dtype=torch.float64)
    for k, w in w0.items():
        lhs = w1[k] @ (hp.lamb * eye + c.T @ c + sigma * p.T @ p)
        rhs = hp.lamb * w + (w @ cm.T) @ c + sigma * (w @ p.T) @ p
        # float64 solve: measured 1.3e-15; 1e-6 would also hold if the fp32 rows were rounded differently here
        # than in MACE's batches (~1e-7 relative each)
        assert float(torch.linalg.norm(lhs - rhs) / torch.linalg.norm(rhs)) < 1e-6, k

        def j1(x, w=w):
            return (hp.lamb * ((x - w) ** 2).sum() + ((c @ x.T - cm @ w.T) ** 2).sum()
                    + sigma * ((p @ x.T - p @ w.T) ** 2).sum())

        assert j1(w1[k]) < j1(w)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            assert j1(w1[k]) < j1(w1[k] + 1e-3 * torch.randn(w.shape, generator=g, dtype=torch.float64))


def test_stage1_identity_when_mapping_equals_concept(pipe, w0):
    hp = M.Hparams.from_dict(dict(FAST, lamb=0.1))
    terms = M.stage1_terms(pipe, NAMES, NAMES, hp, "cpu")
    pres, _ = M.preservation(pipe, hp, NAMES, "cpu", cache_root=None)
    w1, _, _ = M.stage1(w0, terms, pres, hp.lamb, hp.preserve_sigma1())
    for k in w0:   # float64: exact but for rounding (measured 1.6e-12, weights ~0.2)
        assert torch.allclose(w1[k], w0[k], atol=1e-8)


def test_prior_cache_on_disk_and_sharded(pipe, tmp_path):
    g, info = M.cached_gram(pipe, CAPTIONS, "cpu", "prior", tmp_path)
    assert info["file"] and (tmp_path / "mace").is_dir() and info["fingerprint"] in info["file"]
    g2, info2 = M.cached_gram(pipe, CAPTIONS, "cpu", "prior", tmp_path)
    assert torch.equal(g, g2) and info2["file"] == info["file"]
    a, _ = M.prompt_gram(pipe, CAPTIONS[:4], "cpu")
    b, _ = M.prompt_gram(pipe, CAPTIONS[4:], "cpu")
    assert torch.allclose(a + b, g, rtol=1e-10, atol=1e-8)   # float64 sums in another order (measured 1.8e-12)
    # positive semi-definite: eigvalsh is accurate to ~eps·λ_max ≈ 5e-12 (λ_max ≈ 2e4)
    assert torch.allclose(g, g.T) and float(torch.linalg.eigvalsh(g)[0]) > -1e-8
    _, other = M.cached_gram(pipe, CAPTIONS[:5], "cpu", "prior", tmp_path)
    assert other["fingerprint"] != info["fingerprint"]


# --------------------------------------------------------------------------- stage 2


def fixed_batch(pipe, hp, name, images, mask=None):
    tr = M.LoRATrainer(pipe, name, M.prompts_for(hp, name), images, hp, "cpu", masks=mask)
    return tr, tr.draw()


def test_stage2_lora_rank1_only_lora_changes_and_attention_falls(pipe):
    hp = M.Hparams.from_dict(dict(FAST, lr=1e-3))
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    with M.frozen_unet(pipe.unet):
        tr, b = fixed_batch(pipe, hp, "van gogh", images)
        n_attn2 = len([k for k in pipe.unet.attn_processors if k.endswith("attn2.processor")])
        assert len(list(tr.lora.parameters())) == 4 * n_attn2
        assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in tr.lora.names)
        with torch.no_grad():
            l0 = float(M.batch_loss(pipe.unet, tr.lora, b))
            # at step 0 (up = 0) the output equals the base model's, up to fp32 rounding (the probe computes the
            # attention itself): within 4x the base output's distance from float64 (measured 0.7-0.9x on AVX2/AVX-512)
            base = pipe.unet(b.latents, b.t, encoder_hidden_states=b.context).sample
            with M.probed(pipe.unet, tr.lora):
                out_probe = pipe.unet(b.latents, b.t, encoder_hidden_states=b.context).sample
            exact = copy.deepcopy(pipe.unet).double()(b.latents.double(), b.t, encoder_hidden_states=b.context.double())
            assert (out_probe - base).abs().max() <= 4 * (base - exact.sample).abs().max()
        for _ in range(20):
            tr.update(b)
        with torch.no_grad():
            l1 = float(M.batch_loss(pipe.unet, tr.lora, b))
    assert l1 < l0
    for i in range(len(tr.lora.names)):
        assert tr.lora.down[i].shape[0] == 1 and tr.lora.up[i].shape[1] == 1
    deltas = tr.lora.deltas()
    assert all(int(torch.linalg.matrix_rank(d)) <= 1 for d in deltas.values())
    assert any(float(d.abs().max()) > 0 for d in deltas.values())
    # the last attn2 to_v LoRA gets no gradient (no later query depends on it)
    last_v = [n for n in tr.lora.names if n.startswith("up_blocks") and n.endswith("to_v")][-1]
    assert float(tr.lora.up[tr.lora.index[last_v]].detach().abs().max()) == 0.0
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags


def test_stage2_loss_matches_recomputation_and_masks(pipe):
    hp = M.Hparams.from_dict(FAST)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    tr, b = fixed_batch(pipe, hp, "van gogh", images)
    with torch.no_grad(), M.probed(pipe.unet, tr.lora) as store:
        pipe.unet(b.latents, b.t, encoder_hidden_states=b.context)
        loss = M.attention_loss(store, b.positions, None)
        ref = sum(torch.sqrt((a[:, :, b.positions] ** 2).sum()) for a in store)
        ones = M.attention_loss(store, b.positions, torch.ones(64, 64))
        half = torch.zeros(64, 64)
        half[:32] = 1
        masked = M.attention_loss(store, b.positions, half)
    assert len(store) == len([k for k in pipe.unet.attn_processors if k.endswith("attn2.processor")])
    assert torch.allclose(loss, ref) and torch.allclose(ones, loss)
    assert float(masked) < float(loss)


GROUP = ["van gogh", "melania trump", "tom hanks"]


def group_jobs(n_masked: int = 1) -> list:
    """Three concepts' inputs (random images, the second one with a half mask): seeds 100, 101, 102."""
    g = torch.Generator().manual_seed(7)
    jobs = [M.LoRAJob(n, torch.rand(2, 3, 64, 64, generator=g), None, 100 + i) for i, n in enumerate(GROUP)]
    half = torch.zeros(64, 64)
    half[:, :32] = 1
    jobs[n_masked].masks = [half, torch.ones(64, 64)]
    return jobs


def train_grouped(pipe, per_step: int, autocast: str = "none", steps: int = 4, seed_shift: int = 0):
    # max_grad_norm 0.15: the gradient norms here are 0.1-0.3, so some steps clip and others do not
    hp = M.Hparams.from_dict({"max_train_steps": steps, "lr": 1e-2, "max_grad_norm": 0.15,
                              "lora_concepts_per_step": per_step, "lora_autocast": autocast})
    jobs = group_jobs()
    for j in jobs:
        j.seed += seed_shift
    out = []
    for k in range(0, len(jobs), per_step):   # as MACE.stage2 groups them
        out += M.train_concepts(pipe, jobs[k : k + per_step], hp, "cpu")
    return out


def delta_w(factors) -> dict:
    return {k: u.double() @ d.double() for k, (u, d) in factors.items()}


def relative_delta_diff(a, b) -> float:
    """‖ΔW_a − ΔW_b‖ / ‖ΔW_a‖ over all layers of one concept."""
    da, db = delta_w(a), delta_w(b)
    return float(sum(((da[k] - db[k]) ** 2).sum() for k in da).sqrt() / sum((v ** 2).sum() for v in da.values()).sqrt())


def relative_loss_diff(a, b) -> float:
    """max over steps of |loss_a − loss_b| / loss_a."""
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def one_at_a_time(pipe):
    return train_grouped(pipe, per_step=1)


@pytest.fixture(scope="module")
def other_seed(pipe):
    return train_grouped(pipe, per_step=3, seed_shift=50)


class LoRAInUNetPrecision(M.LoRA):
    """The stage-2 LoRA in its UNet's dtype (MACE trains it in fp32): float64 for the rounding floor."""

    def __init__(self, layers, *args, **kwargs):
        super().__init__(layers, *args, **kwargs)
        self.to(next(iter(layers.values())).weight.dtype)


@pytest.fixture(scope="module")
def fp32_floor(pipe, one_at_a_time):
    """fp32 rounding of stage 2: how far the one-at-a-time LoRAs (ΔW) and losses lie from the same training in
    float64 (worst concept, relative). Losses are fp32 numbers: their floor is at least one ulp, 2⁻²³."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "LoRA", LoRAInUNetPrecision)
        exact = train_grouped(copy.deepcopy(pipe).to(torch.float64), per_step=1)
    pairs = list(zip(exact, one_at_a_time))
    return (max(relative_delta_diff(a, b) for (a, _), (b, _) in pairs),
            max([2 ** -23] + [relative_loss_diff(a, b) for (_, a), (_, b) in pairs]))


@pytest.mark.parametrize("per_step", [2, 3])
def test_stage2_batched_concepts_equal_one_at_a_time(pipe, one_at_a_time, fp32_floor, per_step):
    """One batched forward/backward for several concepts (own LoRA, mask, positions, t per sample; per-concept
    clipping and AdamW; own random streams) gives each concept the LoRA it gets alone, whatever the grouping:
    up to fp32 rounding (other GEMM shapes). Measured on AVX2/AVX-512 (forced and not; the module runs one
    thread): ΔW differs by 0.7-1.1x the float64 floor (~4e-6 relative), losses by 0.7-1.5x; margin 4x."""
    batched = train_grouped(pipe, per_step=per_step)
    dw_floor, loss_floor = fp32_floor
    for (fa, la), (fb, lb) in zip(one_at_a_time, batched):
        assert relative_loss_diff(la, lb) <= 4 * loss_floor
        assert relative_delta_diff(fa, fb) <= 4 * dw_floor
    # the LoRAs did move, and differently per concept
    moved = [delta_w(f) for f, _ in batched]
    assert all(any(float(d.abs().max()) > 0 for d in m.values()) for m in moved)
    k = next(iter(moved[0]))
    assert not torch.allclose(moved[0][k], moved[1][k])


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_stage2_autocast_tracks_fp32(pipe, one_at_a_time, other_seed, autocast):
    """Autocast of the stage-2 forward (LoRA weights, AdamW state and the loss sum stay fp32; fp16 with a
    per-concept GradScaler). Tolerance on the loss, a bound from the format: at every step it agrees with
    fp32 to within one bf16 rounding step of its value, 2⁻⁸ relative. The loss sums ~10⁴ rounded
    probabilities, so rounding noise averages out far below that (measured ≤ 4e-5 on AVX2/AVX-512, forced
    and not), while a systematic error (a LoRA dropped under autocast, probabilities summed in half
    precision, a skipped step) exceeds it. ΔW after 4 steps of lr 1e-2: the floor is another seed's ΔW (the
    scale of a genuinely different result, 1.4-1.5x ΔW); autocast moves ΔW by 0.2-9 % (Adam's first steps
    move by ~lr·sign(g), so small gradients that change sign under rounding show), at most 0.065 of that
    floor: it must stay within a fifth of it (margin 3x)."""
    low = train_grouped(pipe, per_step=3, autocast=autocast)
    for (f32, l32), (flo, llo), (fs, _) in zip(one_at_a_time, low, other_seed):
        assert relative_loss_diff(l32, llo) <= 2 ** -8, (l32, llo)
        assert relative_delta_diff(f32, flo) < relative_delta_diff(f32, fs) / 5
        assert all(x.dtype == torch.float32 for pair in flo.values() for x in pair)


def test_stage2_speed_hparams_are_checked():
    assert M.Hparams().lora_concepts_per_step == 1 and M.Hparams().lora_autocast == "none"   # faithful defaults
    hp = M.Hparams.from_dict({"lora_concepts_per_step": "4", "lora_autocast": "bf16"})
    assert hp.lora_concepts_per_step == 4 and hp.lora_autocast == "bf16"
    for bad, match in [({"lora_concepts_per_step": 0}, "hparams.lora_concepts_per_step must be >= 1"),
                       ({"lora_concepts_per_step": 2.5}, "hparams.lora_concepts_per_step must be int"),
                       ({"lora_concepts_per_step": True}, "hparams.lora_concepts_per_step must be int"),
                       ({"lora_autocast": "fp8"}, "hparams.lora_autocast must be one of none, bf16, fp16"),
                       ({"lora_autocast": None}, "hparams.lora_autocast must be str")]:
        with pytest.raises(ConfigError, match=match):
            M.Hparams.from_dict(bad)


def test_focal_timesteps():
    pmf = M.focal_pmf()
    assert float(pmf[200:401].sum()) == pytest.approx(0.864, abs=0.005)
    assert int(pmf.argmax()) == 300


def test_training_images_are_seeded(pipe):
    hp = M.Hparams.from_dict(dict(FAST, n_images=1))
    a, info = M.training_images(pipe, "van gogh", hp, "cpu")
    b, _ = M.training_images(pipe, "van gogh", hp, "cpu")
    assert a.shape == (1, 3, 64, 64) and torch.equal(a, b)
    assert info["seed"] == M.image_seed(hp, "van gogh") and info["prompt"] == "a photo of the van gogh"


# --------------------------------------------------------------------------- stage 3


def test_stage3_normal_equations_and_fusion(pipe, w0):
    hp = M.Hparams.from_dict(FAST)
    g = torch.Generator().manual_seed(3)
    w1 = {k: w + 0.01 * torch.randn(w.shape, generator=g, dtype=torch.float64) for k, w in w0.items()}
    deltas = [{k: 0.05 * torch.randn(w.shape[0], 1, generator=g, dtype=torch.float64)
               @ torch.randn(1, w.shape[1], generator=g, dtype=torch.float64) for k, w in w0.items()} for _ in NAMES]
    texts = [M.prompts_for(hp, n) for n in NAMES]
    grams = [M.prompt_gram(pipe, t, "cpu")[0] for t in texts]
    pres, _ = M.preservation(pipe, hp, NAMES, "cpu", cache_root=None)
    lamb, s_f = 0.2, 0.01
    w2 = M.stage3(w0, w1, deltas, grams, pres, lamb, s_f)
    cs = [all_rows(pipe, t) for t in texts]
    p = all_rows(pipe, CAPTIONS)
    eye = torch.eye(p.shape[1], dtype=torch.float64)
    for k in w0:
        lhs = w2[k] @ (lamb * eye + sum(c.T @ c for c in cs) + s_f * p.T @ p)
        rhs = lamb * w1[k] + sum((w1[k] + d[k]) @ c.T @ c for d, c in zip(deltas, cs)) + s_f * w0[k] @ p.T @ p
        assert float(torch.linalg.norm(lhs - rhs) / torch.linalg.norm(rhs)) < 1e-6, k   # as in stage 1 (1.3e-15)
    for d, c in zip(deltas, cs):   # each LoRA's outputs on its own prompts: fused weights beat the CFR ones
        err2 = sum(float(((c @ (w2[k] - w1[k] - d[k]).T) ** 2).sum()) for k in w0)
        err1 = sum(float(((c @ d[k].T) ** 2).sum()) for k in w0)
        assert err2 < 0.5 * err1   # measured 0.21 and 0.28
    # no LoRA, no preservation -> W1 back; one concept, λ = 0, s_f = 0 -> W1 + ΔW
    zero = [{k: torch.zeros_like(w) for k, w in w0.items()} for _ in NAMES]
    back = M.stage3(w0, w1, zero, grams, pres, 0.3, 0.0)
    assert all(torch.allclose(back[k], w1[k], atol=1e-8) for k in w0)
    one = M.stage3(w0, w1, deltas[:1], grams[:1], pres, 0.0, 0.0)
    c0 = cs[0]   # the tiny encoder's rows span D − 1 dimensions: compare on them
    # λ = 0: a pseudo-inverse of a system whose zero eigenvalue float64 turns into ~1e-11 (λ_max 7e4); measured
    # 1.4-1.7e-7 on outputs of ~4 (AVX2/AVX-512, forced and not)
    assert all(torch.allclose(c0 @ one[k].T, c0 @ (w1[k] + deltas[0][k]).T, atol=1e-6) for k in w0)
    # order does not matter
    rev = M.stage3(w0, w1, deltas[::-1], grams[::-1], pres, lamb, s_f)
    assert all(torch.allclose(rev[k], w2[k], atol=1e-9) for k in w0)   # float64 sums in another order (2.4e-12)


# --------------------------------------------------------------------------- the method


@pytest.fixture(scope="module")
def artifact(pipe):
    return MACE().erase(pipe, [Concept(n) for n in NAMES], FAST, EraseContext(progress=False))


def test_artifact_only_kv_and_metadata(pipe, artifact, w0):
    assert set(artifact.tensors) == set(w0)
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in artifact.tensors)
    meta = artifact.metadata["mace"]
    assert meta["masks"] == "none" and meta["stage1_preserve"] == "squared" and meta["vae_input_norm"] == "imagenet"
    assert meta["lora_concepts_per_step"] == 1 and meta["lora_autocast"] == "none"
    assert set(artifact.metadata["stage_seconds"]) == {"caches_and_stage1", "stage2_data", "stage2_loras", "stage3_fusion"}
    assert set(meta["training_images"]) == set(NAMES)
    assert all(isinstance(v["seed"], int) for v in meta["training_images"].values())
    assert meta["caches"]["prior"]["prompts"] == len(CAPTIONS)
    assert any(not torch.equal(artifact.tensors[k], w0[k].float()) for k in w0)


def test_apply_remove_and_round_trip(pipe, artifact, tmp_path):
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with MACE().apply(pipe, artifact):
        inside = pipe.unet.state_dict()
        changed = {k for k in original if not torch.equal(original[k], inside[k])}
        assert changed and changed <= set(artifact.tensors)
        assert all(torch.equal(inside[k], artifact.tensors[k]) for k in artifact.tensors)
    assert all(torch.equal(original[k], v) for k, v in pipe.unet.state_dict().items())
    loaded = MACE().load_artifact(artifact.save(tmp_path / "mace"))
    assert loaded.sha256 == artifact.sha256
    with pytest.raises(CpebenchError):
        MACE().apply(pipe, Artifact(method="uce", tensors=artifact.tensors)).__enter__()


def test_bad_input(pipe):
    images = torch.rand(2, 3, 64, 64)
    hp = M.Hparams.from_dict(FAST)
    with pytest.raises(DataError, match="mask 0 .* shape"):
        M.LoRATrainer(pipe, "van gogh", M.prompts_for(hp, "van gogh"), images, hp, "cpu",
                      masks=[torch.ones(32, 32), torch.ones(32, 32)])
    with pytest.raises(DataError, match="does not occur"):
        M.LoRATrainer(pipe, "van gogh", ["a photo of a dog"], images, hp, "cpu")
    with pytest.raises(ConfigError, match="hparams.mask_detector"):
        MACE().erase(pipe, [Concept("van gogh")], dict(FAST, masks="grounded_sam"), EraseContext(progress=False))
    with pytest.raises(ConfigError, match="unknown hyperparameter"):
        M.Hparams.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="templates"):
        MACE().erase(pipe, [Concept("van gogh")], dict(FAST, templates=["no slot"]), EraseContext(progress=False))


def test_yaml_configs_parse():
    from cpebench.config import load_method_config

    cfg = load_method_config("mace")
    for task in ("celebrity", "artist", "nudity"):
        hp = M.Hparams.from_dict({**cfg.hparams, **(cfg.tasks.get(task) or {})})
        assert hp.masks == "none"
        assert hp.lora_concepts_per_step == 1 and hp.lora_autocast == "none"   # the official loop's settings
    assert M.Hparams.from_dict({**cfg.hparams, **cfg.tasks["nudity"]}).timesteps == "uniform"
    assert M.Hparams.from_dict({**cfg.hparams, **cfg.tasks["artist"]}).concept_type == "style"


# The official augmentation lists (src/cfr_utils.py prompt_augmentation @057e7a6) have 31 templates each;
# only indices 0-29 are ever drawn. The digests are of "\n".join(templates 0-29), computed once from the
# official lists: they pin the lists exactly (a wrong, missing or reordered template changes them).
TEMPLATE_DIGESTS = {
    "object": "b0d1c9d359b3b2ce8830e158ce4c8d7bf4e30e330e93940fb179a34908028224",
    "style": "05573c004230bba7d24b340585a9ad571f1947a44652029b3e38cb0439fdd7ba",
}


@pytest.mark.parametrize("kind, templates", [("object", M.OBJECT_TEMPLATES), ("style", M.STYLE_TEMPLATES)])
def test_augmentation_templates_are_the_official_ones(kind, templates):
    import hashlib

    assert len(templates) == 30 and all(t.count("{}") == 1 for t in templates)
    assert hashlib.sha256("\n".join(templates).encode()).hexdigest() == TEMPLATE_DIGESTS[kind]
    assert M.Hparams.from_dict({"concept_type": kind}).template_list() == templates


def test_object_templates_match_the_cpe_authors_copy(shared_data):
    """CPE's explicit training templates are MACE's 31 object templates with the word 'explicit' (an
    independent copy of the official list): the first 30 are ours, the 31st is the one never drawn."""
    import csv

    with open(shared_data / "train" / "explicit_prompt_templates.csv", newline="", encoding="utf-8") as fh:
        cpe = [row["prompt"].strip().replace("explicit", "{}") for row in csv.DictReader(fh)]
    assert tuple(cpe[:30]) == M.OBJECT_TEMPLATES and cpe[30:] == ["{} in a sketch painting"]


def test_cli_erase_smoke(tmp_path, shared_data):
    """``cpebench erase --method mace --task artist --preset smoke`` through the entry point, with the real
    caption and artist files in place of the preset's stand-in lists, so its caps apply. (It used to
    monkeypatch the registry, whose teardown then deleted ``mace`` for every later test.)"""
    from cpebench.cli import main

    out = tmp_path / "a"
    assert main(["-q", "erase", "--method", "mace", "--task", "artist", "--preset", "smoke",
                 "--data-dir", str(shared_data), "--save", str(out),
                 "hparams.prior_prompts={file: prompts/coco_30k.csv, column: prompt}",
                 "hparams.domain_names={file: anchors/mass_surr_words_1734artists.csv, column: artist}",
                 "hparams.domain_exclude={file: prompts/art_100_remained.csv, column: artist}"]) == 0
    art = Artifact.load(out)
    meta = art.metadata["mace"]
    assert art.method == "mace" and art.metadata["concepts"] == ["Brent Heighton"]
    assert meta["concept_type"] == "style" and meta["masks"] == "none" and meta["mappings"] == ["art"]
    assert meta["caches"]["prior"]["prompts"] == 100 and meta["caches"]["domain"]["names"] == 10
    assert meta["caches"]["prior"]["scale"] == pytest.approx(616_767 / 100)


def test_resume_from_workdir(pipe, tmp_path, monkeypatch):
    hp = dict(FAST, max_train_steps=2, n_images=1)
    ctx = EraseContext(progress=False, workdir=tmp_path)
    first = MACE().erase(pipe, [Concept("van gogh")], hp, ctx)
    assert (tmp_path / "mace-lora-0000.safetensors").exists()

    def boom(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(M, "train_concepts", boom)
    second = MACE().erase(pipe, [Concept("van gogh")], hp, ctx)
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    with pytest.raises(AssertionError, match="trained again"):   # other settings: not reused
        MACE().erase(pipe, [Concept("van gogh")], dict(hp, lr=1e-3), ctx)


def test_resume_grouped_training_after_a_kill(pipe, tmp_path, monkeypatch):
    """lora_concepts_per_step=2 over 3 concepts: a kill during the second group keeps the first group's
    LoRAs; the rerun (with another grouping: it does not change a LoRA) trains only the third concept and
    gives the uninterrupted artifact. Autocast does change the LoRAs: it trains again."""
    hp = dict(FAST, max_train_steps=2, n_images=1, lora_concepts_per_step=2)
    concepts = [Concept(n) for n in GROUP]
    whole = MACE().erase(pipe, concepts, hp, EraseContext(progress=False, workdir=tmp_path / "whole"))
    assert whole.metadata["mace"]["lora_concepts_per_step"] == 2
    real, calls, armed = M.train_concepts, [], [True]

    def killed_on_second_group(pipe_, jobs, *a, **k):
        calls.append([j.name for j in jobs])
        if armed and len(calls) == 2:   # once
            armed.clear()
            raise KeyboardInterrupt
        return real(pipe_, jobs, *a, **k)

    work = tmp_path / "killed"
    monkeypatch.setattr(M, "train_concepts", killed_on_second_group)
    with pytest.raises(KeyboardInterrupt):
        MACE().erase(pipe, concepts, hp, EraseContext(progress=False, workdir=work))
    assert calls == [GROUP[:2], GROUP[2:]]
    assert sorted(p.name for p in work.glob("mace-lora-*.safetensors")) == ["mace-lora-0000.safetensors", "mace-lora-0001.safetensors"]
    calls.clear()
    resumed = MACE().erase(pipe, concepts, dict(hp, lora_concepts_per_step=3), EraseContext(progress=False, workdir=work))
    assert calls == [GROUP[2:]]
    # exact: the first group's LoRAs come from disk and the third concept trains alone in both runs
    assert all(torch.equal(whole.tensors[k], resumed.tensors[k]) for k in whole.tensors)
    calls.clear()
    MACE().erase(pipe, concepts, dict(hp, lora_autocast="bf16"), EraseContext(progress=False, workdir=work))
    assert calls == [GROUP[:2], GROUP[2:]]


def test_grounded_sam_missing_model_is_a_clear_error(pipe, tmp_path):
    hp = dict(FAST, masks="grounded_sam", mask_detector=str(tmp_path / "no-dino"), mask_segmenter=str(tmp_path / "no-sam"))
    with pytest.raises(ConfigError, match=r"hparams.mask_detector=.*no-dino.*masks: none"):
        MACE().erase(pipe, [Concept("van gogh")], hp, EraseContext(progress=False))


def test_grounded_sam_masks_reach_stage2(pipe, monkeypatch):
    """Detector and segmenter stubbed: boxes OR-ed into one mask, no box -> all ones, masks used by the loss."""
    calls = {"detect": 0}

    def detect(self, image, caption):
        calls["detect"] += 1
        assert caption == "van gogh."
        return [] if calls["detect"] == 1 else [[0, 0, 10, 10], [20, 20, 40, 40]]

    def segment(self, image, boxes):
        m = torch.zeros(image.size[1], image.size[0], dtype=torch.bool)
        for x0, y0, x1, y1 in boxes:
            m[y0:y1, x0:x1] = True
        return m

    monkeypatch.setattr(M.GroundedSAM, "models", lambda self: None)
    monkeypatch.setattr(M.GroundedSAM, "detect", detect)
    monkeypatch.setattr(M.GroundedSAM, "segment", segment)
    seen = []
    real = M.train_concepts

    def spy(pipe_, jobs, *a, **k):
        seen.extend(j.masks for j in jobs)
        return real(pipe_, jobs, *a, **k)

    monkeypatch.setattr(M, "train_concepts", spy)
    hp = dict(FAST, masks="grounded_sam", mask_detector="dino", mask_segmenter="sam")
    art = MACE().erase(pipe, [Concept("van gogh")], hp, EraseContext(progress=False))
    rec = art.metadata["mace"]["training_images"]["van gogh"]["masks"]
    assert rec["boxes"] == [0, 2] and rec["all_ones_fallback"] == 1
    assert torch.equal(seen[0][0], torch.ones(64, 64))
    assert float(seen[0][1].sum()) == 100 + 400


@pytest.fixture(scope="module")
def tiny_gsam(tmp_path_factory):
    """Random-weight Grounding DINO and SAM saved as local directories (model + processor)."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SamConfig,
        SamImageProcessor,
        SamModel,
        SamProcessor,
        SwinConfig,
    )

    d = tmp_path_factory.mktemp("gsam")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "van", "go", "##gh"]
    (d / "vocab.txt").write_text("\n".join(vocab))
    torch.manual_seed(0)
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=32, depths=[1] * 4, num_heads=[1] * 4, window_size=4, image_size=128,
                                   out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5, encoder_n_points=1, decoder_n_points=1,
        num_feature_levels=4, use_timm_backbone=False, max_text_len=32)
    GroundingDinoForObjectDetection(cfg).save_pretrained(d / "dino")
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 128}),
                           tokenizer=BertTokenizer(str(d / "vocab.txt"))).save_pretrained(d / "dino")
    scfg = SamConfig(
        vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "mlp_dim": 32, "image_size": 64,
                           "patch_size": 16, "output_channels": 16, "global_attn_indexes": [0], "window_size": 2, "num_pos_feats": 8},
        prompt_encoder_config={"hidden_size": 16, "image_size": 64, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "mlp_dim": 32,
                                 "iou_head_hidden_dim": 16})
    SamModel(scfg).save_pretrained(d / "sam")
    SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})).save_pretrained(d / "sam")
    return str(d / "dino"), str(d / "sam")


def test_grounded_sam_backend_with_tiny_models(tiny_gsam):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    gsam = M.GroundedSAM(*tiny_gsam, box_threshold=0.0, text_threshold=0.0)
    masks, counts = gsam(images, "Van Gogh")
    assert counts == [5, 5] and all(m.shape == (64, 64) for m in masks)
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in masks)
    none = M.GroundedSAM(*tiny_gsam, box_threshold=1.01, text_threshold=1.01)   # nothing detected -> all ones
    masks, counts = none(images, "van gogh")
    assert counts == [0, 0] and all(torch.equal(m, torch.ones(64, 64)) for m in masks)
    with pytest.raises(ConfigError, match="hparams.mask_segmenter"):   # a detector is not a SAM
        M.GroundedSAM(tiny_gsam[0], tiny_gsam[0]).models()


def test_official_cache_file(pipe, w0, tmp_path):
    g, _ = M.prompt_gram(pipe, CAPTIONS, "cpu")
    blob = {}
    for i, w in enumerate(w0.values()):
        blob[f"{i}_for_mat1"] = (w @ g).float()
        blob[f"{i}_for_mat2"] = g.float()
    torch.save(blob, tmp_path / "cache_coco.pt")
    hp = M.Hparams.from_dict(dict(FAST, prior_cache_file=str(tmp_path / "cache_coco.pt")))
    pres, rec = M.preservation(pipe, hp, NAMES, "cpu")
    assert torch.allclose(pres, g.float().double()) and rec["prior"]["kind"] == "official"
    torch.save({"x": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="not a MACE cache"):
        M.preservation(pipe, M.Hparams.from_dict(dict(FAST, prior_cache_file=str(tmp_path / "bad.pt"))), NAMES, "cpu")
    with pytest.raises(ConfigError, match="prior_cache_file"):
        M.preservation(pipe, M.Hparams.from_dict(dict(FAST, prior_cache_file=str(tmp_path / "none.pt"))), NAMES, "cpu")


def test_stage1_large_lambda_keeps_w0(pipe, w0):
    hp = M.Hparams.from_dict(dict(FAST, lamb=1e12))
    terms = M.stage1_terms(pipe, NAMES, ["a person"] * 2, hp, "cpu")
    w1, _, _ = M.stage1(w0, terms, torch.zeros_like(terms.cc), hp.lamb, 0.0)
    # λ = 1e12 ≫ ‖Σ c cᵀ‖ ≈ 1.3e5: W1 − W0 = O(‖W0‖ · 1.3e5 / 1e12) ≈ 2e-8 (measured 2.5e-9)
    assert all(float((w1[k] - w0[k]).abs().max()) < 1e-6 for k in w0)


def test_streamed_fusion_equals_full(pipe, w0):
    hp = M.Hparams.from_dict(FAST)
    g = torch.Generator().manual_seed(5)
    w1 = {k: w + 0.01 * torch.randn(w.shape, generator=g, dtype=torch.float64) for k, w in w0.items()}
    factors = [{k: (torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w.shape[1], generator=g))
                for k, w in w0.items()} for _ in NAMES]
    grams = [M.prompt_gram(pipe, M.prompts_for(hp, n), "cpu")[0] for n in NAMES]
    pres, _ = M.preservation(pipe, hp, NAMES, "cpu", cache_root=None)
    sums = M.FusionSums(grams[0].shape[0], "cpu")
    for c, f in zip(grams, factors):
        sums.add(c, f)
    full = [{k: u.double() @ v.double() for k, (u, v) in f.items()} for f in factors]
    a = M.stage3(w0, w1, full, grams, pres, 0.1, 0.01)
    b = M.stage3_from_sums(w0, w1, sums, pres, 0.1, 0.01)
    assert all(torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-9) for k in w0)   # float64, other order (5e-11)
