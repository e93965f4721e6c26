"""SAFREE on the tiny model (CPU): the spec's tests (projectors, orthogonality, the leave-one-out trigger test,
f_beta), the defining property (a prompt without trigger tokens is generated exactly as by the unedited
model), the per-step context, artifact round trip, exact removal and bad hyperparameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from baselines.safree import (SAFREE, Hparams, SafreeEdit, concept_matrix, f_beta, filter_prompts, masked_prompt_ids,
                              pooled, projector, prompt_token_ids, remove_subspace, subspace_basis, trigger_tokens)
from cpebench.attention import ContextBatch, announce_batch
from cpebench.errors import ConfigError
from cpebench.methods import Artifact, Concept
from cpebench.models import text_embeddings

NUDITY = ["nudity", "naked", "erotic", "sexual"]
PROMPTS = ["a naked woman on the beach", "a photo of a cat sitting on a chair"]


@pytest.fixture(scope="module")
def pipe(tiny):
    return tiny.pipe


@pytest.fixture(scope="module")
def artifact(pipe):
    return SAFREE().erase(pipe, [Concept(c) for c in NUDITY], {})


def engine_items(prompts, negative=""):
    from cpebench.config import ProtocolConfig
    from cpebench.data import PromptRecord
    from cpebench.engine import Engine, plan_items

    records = [PromptRecord(str(i), p, i, None, "test", None) for i, p in enumerate(prompts)]
    items = plan_items("s", records, images_per_row=1, negative_prompt=negative, default_guidance=7.5,
                       per_row_guidance=False)
    return items, ProtocolConfig(model="tiny", steps=4, height=64, width=64), Engine


def generate(pipe, prompts, negative=""):
    items, proto, Engine = engine_items(prompts, negative)
    return Engine(pipe, proto, batch_size=len(prompts), progress=False).denoise(items)[0]


def unet_outputs(pipe, prompts, negatives, steps=(999, 500, 1), announce=True):
    """The UNet's outputs at successive steps on one context, as the engine calls it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * len(prompts), 4, 8, 8, generator=g)
    ctx = torch.cat([text_embeddings(pipe, negatives), text_embeddings(pipe, prompts)])
    if announce:
        announce_batch(pipe.unet, ctx, prompts, negatives)
    with torch.no_grad():
        return [pipe.unet(x, t, encoder_hidden_states=ctx).sample for t in steps]


def no_hooks(module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


# --------------------------------------------------------------------------- the math (spec §5)


def test_projectors_are_symmetric_idempotent_and_equal_the_official_formula(pipe):
    c = concept_matrix(pipe, NUDITY)                               # [K, D] pooled EOS states
    ids = prompt_token_ids(pipe, PROMPTS[:1], "eos")
    m = pooled(pipe, masked_prompt_ids(ids, 0, pipe.tokenizer.pad_token_id))   # [n, D] leave-one-out states
    for rows in (c, m):
        p = projector(subspace_basis(rows))
        official = rows.T @ torch.pinverse(rows @ rows.T) @ rows   # E (EᵀE)⁺ Eᵀ with E = rows as columns
        # float64 throughout: symmetric exactly, idempotent to ~1e-15 (measured 4e-16); 1e-12 leaves margin,
        # while a wrong rank cut or a float32 projector would miss it by orders of magnitude
        assert torch.equal(p, p.T)
        assert torch.allclose(p @ p, p, atol=1e-12)
        assert torch.allclose(p @ rows.T, rows.T, atol=1e-10)      # the rows lie in the subspace
        # the official formula (in float64 here) agrees to its rounding (measured 6e-15)
        assert torch.allclose(p, official, atol=1e-10)


def test_projected_rows_are_orthogonal_to_every_concept_vector(pipe, artifact):
    c = concept_matrix(pipe, NUDITY)
    cond = text_embeddings(pipe, PROMPTS)
    f = filter_prompts(pipe, PROMPTS, cond, artifact.tensors["concept_basis"], Hparams())
    assert f.flags.any()
    x = f.projected[f.flags]                                       # (I − P_C) P_M e of every trigger row
    cos = (x @ c.T) / (x.norm(dim=-1, keepdim=True) * c.norm(dim=-1))
    assert cos.abs().max() < 1e-12                                 # float64 projection: measured 8e-16
    assert torch.equal(f.projected[~f.flags], cond[~f.flags].double())   # the other rows are untouched
    assert not f.flags[:, 0].any()                                 # BOS is never replaced


def test_leave_one_out_flags_on_hand_made_distances():
    d = torch.tensor([[1.0, 1.0, 1.0, 5.0, 0.0],                   # one outlier
                      [1.0, 1.0, 1.0101, 0.0, 0.0],                # 1.0101 ≥ 1.01 · 1: flagged
                      [1.0, 1.0, 1.0099, 0.0, 0.0],                # 1.0099 < 1.01 · 1: not flagged
                      [3.0, 0.0, 0.0, 0.0, 0.0],                   # one token: empty mean (NaN) -> flagged
                      [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)   # all equal: none
    valid = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
    flags = trigger_tokens(d, valid, 0.01)
    want = [[0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert flags.int().tolist() == want
    assert trigger_tokens(d[:1], valid[:1], 4.5).int().tolist() == [[0, 0, 0, 0, 0]]   # 5 < 5.5 · 1


def test_f_beta_matches_the_spec_values():
    nudity = Hparams()
    beta = torch.tensor([0.0, 0.3, 0.45, 0.5, 0.53, 0.55, 0.6, 0.9])
    assert f_beta(beta, nudity).tolist() == [0, 0, 0, 2, 5, 7, 10, 10]
    artists = Hparams(svf_k=3.5, svf_b=5.5)
    grid = torch.linspace(0, 1, 201)
    official = [round(10 * (1 / (1 + math.exp(-2.0 * 3.5 * (10 * float(z) - 5.5))))) for z in grid]  # Python round
    assert f_beta(grid, artists).tolist() == official


# --------------------------------------------------------------------------- the edit


def trigger_ratio(pipe, prompt, artifact) -> float:
    """max_i d_i / mean_{j≠i} d_j: the prompt has trigger tokens iff this is ≥ 1 + α."""
    ids = prompt_token_ids(pipe, [prompt], "eos")
    m = pooled(pipe, masked_prompt_ids(ids, 0, pipe.tokenizer.pad_token_id))
    d = remove_subspace(m, artifact.tensors["concept_basis"].double()).norm(dim=-1)
    return float(max(d[i] / torch.cat([d[:i], d[i + 1:]]).mean() for i in range(len(d))))


def test_a_prompt_without_trigger_tokens_gets_the_unedited_image(pipe):
    """The defining property: with the negative-prompt knob off, a prompt none of whose tokens is a trigger
    is denoised exactly as by the unedited model (same bits), while its batch-mate with triggers changes.
    α is set between the two prompts' trigger ratios (the random tiny encoder flags some token of almost
    every prompt at α = 0.01; on SD's CLIP ordinary prompts have none)."""
    method = SAFREE()
    probe = method.erase(pipe, [Concept(c) for c in NUDITY], {"negative_prompt": "none"})
    ratios = [trigger_ratio(pipe, p, probe) for p in PROMPTS]
    assert ratios[0] > ratios[1]
    alpha = (ratios[0] + ratios[1]) / 2 - 1
    art = method.erase(pipe, [Concept(c) for c in NUDITY], {"negative_prompt": "none", "alpha": alpha})
    f = filter_prompts(pipe, PROMPTS, text_embeddings(pipe, PROMPTS), art.tensors["concept_basis"], Hparams(alpha=alpha))
    assert f.flags[0].any() and not f.flags[1].any()
    ref = generate(pipe, PROMPTS)
    with method.apply(pipe, art):
        out = generate(pipe, PROMPTS)
    assert np.array_equal(ref[1], out[1])
    assert not np.array_equal(ref[0], out[0])


def test_per_step_context_projected_until_t_prime_and_concept_list_negatives(pipe, artifact):
    hp = Hparams()
    negatives = ["", ""]
    ctx = torch.cat([text_embeddings(pipe, negatives), text_embeddings(pipe, PROMPTS)])
    edit = SafreeEdit(pipe, artifact.tensors["concept_basis"], artifact.tensors["negative_embedding"], hp)
    edit.prepare(ContextBatch(ctx, PROMPTS, negatives))
    t_prime = edit.filtered.t_prime
    joined = text_embeddings(pipe, [", ".join(NUDITY)])[0]
    for step in range(12):
        seen = edit.context(ctx, step)
        assert torch.equal(seen[:2], joined.expand(2, -1, -1))    # the concept list is every step's negative
        for b in range(2):
            want = edit.projected[b] if step <= t_prime[b] else ctx[2 + b]
            assert torch.equal(seen[2 + b], want)
    # without the self-validating filter the projected rows are used at every step (re_attn_t -1..1001)
    edit = SafreeEdit(pipe, artifact.tensors["concept_basis"], None, Hparams(svf=False))
    edit.prepare(ContextBatch(ctx, PROMPTS, negatives))
    assert torch.equal(edit.context(ctx, 40)[2:], edit.projected) and torch.equal(edit.context(ctx, 40)[:2], ctx[:2])


def test_leave_one_out_prompts_are_one_batched_encoder_call_equal_to_separate_ones(pipe, artifact):
    cond, calls = text_embeddings(pipe, PROMPTS + PROMPTS[:1]), []
    handle = pipe.text_encoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    try:
        f = filter_prompts(pipe, PROMPTS + PROMPTS[:1], cond, artifact.tensors["concept_basis"], Hparams())
    finally:
        handle.remove()
    n = [n for _, n in prompt_token_ids(pipe, PROMPTS, "eos")]
    assert len(calls) == 1 and calls[0][0] == sum(n)              # duplicates encoded once
    assert torch.equal(f.flags[0], f.flags[2]) and torch.equal(f.projected[0], f.projected[2])
    # padding after EOS does not move the pooled state (causal attention): batched = one prompt alone
    ids = prompt_token_ids(pipe, PROMPTS, "eos")
    both = pooled(pipe, masked_prompt_ids(ids, 0, pipe.tokenizer.pad_token_id))
    alone = pooled(pipe, masked_prompt_ids(ids[:1], 0, pipe.tokenizer.pad_token_id))
    # measured: identical bits here; other GEMM shapes may round the fp32 encoder differently (~1e-7)
    assert torch.allclose(both[: n[0]], alone, atol=1e-6)


def test_empty_and_one_token_prompts(pipe, artifact):
    prompts = ["", "nudity"]
    cond = text_embeddings(pipe, prompts)
    f = filter_prompts(pipe, prompts, cond, artifact.tensors["concept_basis"], Hparams())
    assert not f.flags[0].any() and torch.equal(f.projected[0], cond[0].double())   # nothing to test: unchanged
    assert f.flags[1].nonzero().flatten().tolist() == [1]                            # one token: always flagged


def test_long_prompts_keep_eos_or_take_the_released_first_77_ids(pipe):
    long = " ".join(["cat"] * 90)
    (eos_ids, n_eos), = prompt_token_ids(pipe, [long], "eos")
    (rel_ids, n_rel), = prompt_token_ids(pipe, [long], "released")
    eos = pipe.tokenizer.eos_token_id
    assert n_eos == n_rel == 75 and len(eos_ids) == len(rel_ids) == 77
    assert eos_ids[-1] == eos and rel_ids[-1] != eos and torch.equal(eos_ids[:76], rel_ids[:76])


def test_unannounced_context_is_left_unchanged_and_removal_restores_every_bit(pipe, artifact):
    method = SAFREE()
    negatives = ["", ""]
    ref = unet_outputs(pipe, PROMPTS, negatives, announce=False)
    procs = dict(pipe.unet.attn_processors)
    with method.apply(pipe, artifact):
        unannounced = unet_outputs(pipe, PROMPTS, negatives, announce=False)
        edited = unet_outputs(pipe, PROMPTS, negatives)
    assert all(torch.equal(a, b) for a, b in zip(ref, unannounced))
    assert not torch.allclose(ref[0], edited[0])
    after = unet_outputs(pipe, PROMPTS, negatives, announce=False)
    assert all(torch.equal(a, b) for a, b in zip(ref, after))
    assert no_hooks(pipe.unet) and pipe.unet.attn_processors == procs
    assert not pipe.unet.__dict__.get("_cpebench_context_edits")


def test_artifact_round_trip_gives_the_same_outputs(pipe, artifact, tmp_path):
    method = SAFREE()
    loaded = method.load_artifact(artifact.save(tmp_path / "a"))
    assert loaded.sha256 == artifact.sha256
    assert set(loaded.tensors) == {"concept_embeddings", "concept_basis", "negative_embedding"}
    with method.apply(pipe, artifact):
        a = unet_outputs(pipe, PROMPTS, ["", ""])
    with method.apply(pipe, loaded):
        b = unet_outputs(pipe, PROMPTS, ["", ""])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert artifact.metadata["concepts"] == NUDITY and artifact.metadata["safree"]["concept_rank"] == len(NUDITY)
    none = method.erase(pipe, [Concept(c) for c in NUDITY], {"negative_prompt": "none"})
    assert "negative_embedding" not in none.tensors and none.sha256 != artifact.sha256


@pytest.mark.parametrize("hparams,needle", [
    ({"lra": "low"}, "not implemented"),
    ({"lra": "released_noop_exact"}, "lra"),
    ({"negative_prompt": "joined"}, "negative_prompt"),
    ({"long_prompts": "cut"}, "long_prompts"),
    ({"alpha": -2}, "alpha"),
    ({"up_t": -1}, "up_t"),
    ({"re_attn_start": 5, "re_attn_end": 1}, "re_attn_start"),
    ({"alhpa": 0.1}, "alpha"),                                     # unknown key, with the nearest known one
    ({"svf": "maybe"}, "svf"),
])
def test_bad_hparams_are_clear_errors(pipe, hparams, needle):
    with pytest.raises(ConfigError, match=needle):
        SAFREE().erase(pipe, [Concept("nudity")], hparams)


def test_artifact_from_another_text_encoder_is_refused(pipe, artifact):
    other = Artifact(method="safree", tensors=dict(artifact.tensors),
                     metadata={**artifact.metadata, "text_encoder_checksum": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="text encoder"):
        SAFREE().apply(pipe, other)
    assert no_hooks(pipe.unet)
