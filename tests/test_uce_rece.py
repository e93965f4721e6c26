"""UCE and RECE on the tiny random SD-1.x model: the defining properties of the paper code (UCE's 2023
``train_erase.py``, RECE's ``train.py`` / ``erase_methods/uce.py`` / ``close_form_emb.py``).

The reference quantities are rebuilt here independently of baselines/uce.py: token rows straight from the
tokenizer and a float64 copy of the text encoder (the paper code run in float64), the normal equations per
layer in K/V space, and the adversarial embeddings by least squares on the stacked projection matrices.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from baselines import rece as rece_mod
from baselines import uce as uce_mod
from baselines.rece import RECE
from baselines.uce import UCE
from cpebench.errors import ConfigError
from cpebench.methods import Artifact, Concept, EraseContext, closed_form, common

NAMES = ["Van Gogh", "nudity"]
UCE_HP = dict(guide="a person", preserve=["Tom Hanks", "a dog", "a city street", "van gogh"], preserve_scale=1.0)
RECE_HP = dict(uce_guide=" ", epochs=2, regular_scale=0.1, guide=" ", preserve=[], preserve_empty="per_concept")


@pytest.fixture(scope="module")
def pipe(tiny):
    return tiny.pipe


@pytest.fixture(scope="module")
def uce_result(pipe):
    return uce_mod.uce_edit(pipe, NAMES, uce_mod.Hparams.from_dict(UCE_HP), "cpu")


@pytest.fixture(scope="module")
def uce_artifact(pipe):
    return UCE().erase(pipe, [Concept(n) for n in NAMES], UCE_HP, EraseContext(progress=False))


@pytest.fixture(scope="module")
def rece_artifact(pipe):
    return RECE().erase(pipe, [Concept(n) for n in NAMES], RECE_HP, EraseContext(progress=False))


# --------------------------------------------------------------------------- independent references


@functools.lru_cache(maxsize=None)
def float64_encoder(encoder):
    return copy.deepcopy(encoder).double()


@torch.no_grad()
def clip_rows(pipe, text: str) -> tuple[torch.Tensor, int]:
    """All 77 CLIP rows from a float64 copy of the text encoder and the last word token's index
    (attention_mask.sum() - 2)."""
    tok = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    emb = float64_encoder(pipe.text_encoder)(tok.input_ids)[0][0]
    return emb, int(tok.attention_mask.sum()) - 2


def paper_pairs(pipe, concept: str, guide: str) -> tuple[torch.Tensor, torch.Tensor]:
    """train_erase.py: rows from each text's last word token through EOS and padding, cut to equal length."""
    c, i = clip_rows(pipe, concept)
    g, j = clip_rows(pipe, guide if guide != "" else " ")
    far = max(i, j)
    return c[i : 77 - max(0, far - i)], g[j : 77 - max(0, far - j)]


def kv_weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight.detach().double().clone() for n, m in pipe.unet.named_modules()
            if n.endswith(("attn2.to_k", "attn2.to_v"))}


# A backward-stable float64 solve leaves a relative residual of a few eps (2.2e-16) times the conditioning of the
# bracket; measured ≤ 7e-16 here (UCE, RECE, and the diagnostics the artifacts record), so 1e-10 leaves 1e5 for it.
RESIDUAL_TOLERANCE = 1e-10


def normal_equation_residual(w_new, w_anchor, erase_c, erase_g, preserve, lamb, s_e, s_p) -> float:
    """Per layer, literally the paper code's bracket terms: mat1 = λW + s_e Σ (W g) cᵀ + s_p Σ (W r) rᵀ and
    mat2 = λI + s_e Σ c cᵀ + s_p Σ r rᵀ; returns max_l ‖W_new mat2 − mat1‖ / ‖mat1‖."""
    d = erase_c.shape[1]
    worst = 0.0
    for k, w in w_anchor.items():
        v_e, v_p = erase_g @ w.T, preserve @ w.T
        mat1 = lamb * w + s_e * v_e.T @ erase_c + s_p * v_p.T @ preserve
        mat2 = lamb * torch.eye(d, dtype=torch.float64) + s_e * erase_c.T @ erase_c + s_p * preserve.T @ preserve
        worst = max(worst, float(torch.linalg.norm(w_new[k] @ mat2 - mat1) / torch.linalg.norm(mat1)))
    return worst


def objective(w, w_anchor, erase_c, erase_g, preserve, lamb, s_e, s_p) -> tuple[float, float]:
    """(J(W), Σ_l Σ_r ‖(W − W_anchor) r‖²) summed over the layers, in K/V space."""
    total = change = 0.0
    for k, w0 in w_anchor.items():
        pres = float(((preserve @ (w[k] - w0).T) ** 2).sum())
        total += (lamb * float(((w[k] - w0) ** 2).sum()) + s_e * float(((erase_c @ w[k].T - erase_g @ w0.T) ** 2).sum())
                  + s_p * pres)
        change += pres
    return total, change


def uce_rows(pipe, names, guide, preserve):
    cs, gs = zip(*(paper_pairs(pipe, n, guide) for n in names))
    r = torch.cat([clip_rows(pipe, t)[0] for t in [""] + preserve])      # '' always preserved, 77 rows each
    return torch.cat(cs), torch.cat(gs), r


# --------------------------------------------------------------------------- UCE


def test_uce_edits_the_32_kv_projections_in_closed_form(pipe, uce_result):
    w_old = kv_weights(pipe)
    assert sorted(uce_result.weights) == sorted(w_old) and len(w_old) == 32
    c, g, r = uce_rows(pipe, NAMES, "a person", ["Tom Hanks", "a dog", "a city street"])   # 'van gogh' is erased
    assert uce_result.terms.n_erase == c.shape[0] and uce_result.terms.n_preserve == r.shape[0]
    res = normal_equation_residual(uce_result.weights, w_old, c, g, r, 0.5, 1.0, 1.0)
    assert res < RESIDUAL_TOLERANCE, res         # the float64 solution satisfies the normal equations
    assert uce_result.report["normal_equation_residual"] < RESIDUAL_TOLERANCE


def test_uce_erased_tokens_move_to_the_guide_and_preserved_outputs_stay_within_the_residual(pipe, uce_result):
    w_old = kv_weights(pipe)
    c, g, r = uce_rows(pipe, NAMES, "a person", ["Tom Hanks", "a dog", "a city street"])
    before = sum(float(((c @ w.T - g @ w.T) ** 2).sum()) for w in w_old.values())
    after = sum(float(((c @ uce_result.weights[k].T - g @ w.T) ** 2).sum()) for k, w in w_old.items())
    assert after < 0.2 * before                  # erased rows now give (nearly) the guide's K/V (measured 0.06)
    j_new, change = objective(uce_result.weights, w_old, c, g, r, 0.5, 1.0, 1.0)
    j_old, _ = objective(w_old, w_old, c, g, r, 0.5, 1.0, 1.0)
    assert j_new <= j_old
    assert 1.0 * change <= j_new                 # s_p Σ‖ΔW r‖² is bounded by the closed form's residual
    rep = uce_result.report                      # the artifact's diagnostics agree with the direct sums
    assert rep["erase_residual_before"] == pytest.approx(before, rel=1e-9)
    assert rep["erase_residual_after"] == pytest.approx(after, rel=1e-9)
    assert rep["preserve_change"] == pytest.approx(change, rel=1e-6)
    assert rep["objective_after"] == pytest.approx(j_new, rel=1e-9)


def test_uce_last_token_variant_maps_each_concept_exactly_to_its_guide(pipe):
    """HEAD's one-vector form with a vanishing λ: W_new c = W_old g for every concept and layer."""
    hp = uce_mod.Hparams.from_dict(dict(guide=["a person", ""], tokens="last", preserve_empty=False, lamb=1e-9))
    res = uce_mod.uce_edit(pipe, NAMES, hp, "cpu")
    w_old = kv_weights(pipe)
    (c0, i0), (c1, i1) = clip_rows(pipe, NAMES[0]), clip_rows(pipe, NAMES[1])
    (g0, j0), (g1, _) = clip_rows(pipe, "a person"), clip_rows(pipe, "")
    for k, w in w_old.items():
        for c, g in ((c0[i0], g0[j0]), (c1[i1], g1[0])):        # the guide '' is its BOS row
            # exact but for λ: it moves W c by ~λ/‖c‖² relative (float64; measured 2e-10)
            torch.testing.assert_close(res.weights[k] @ c, w @ g, rtol=1e-6, atol=1e-6)


def test_uce_paper_defaults_preserve_the_empty_prompt_at_auto_scale(pipe):
    hp = uce_mod.Hparams.from_dict({})
    assert (hp.lamb, hp.erase_scale, hp.tokens, hp.guide, hp.projections) == (0.5, 1.0, "sequence", " ", ("to_k", "to_v"))
    res = uce_mod.uce_edit(pipe, ["nudity"], hp, "cpu")
    assert res.preserve_scale == 1.0 and res.terms.n_preserve == 77        # [''] only: max(0.1, 1/1)
    c, g, r = uce_rows(pipe, ["nudity"], " ", [])
    assert c.shape[0] == 77 - 2                                              # 'nudity' = 2 BPE tokens: idx 2
    assert normal_equation_residual(res.weights, kv_weights(pipe), c, g, r, 0.5, 1.0, 1.0) < RESIDUAL_TOLERANCE
    many = uce_mod.Hparams.from_dict({"preserve": [f"artist {i}" for i in range(20)]})
    assert closed_form.resolve_preserve_scale(many.preserve_scale, 21, "uce") == pytest.approx(0.1)


def test_uce_only_to_v_when_asked(pipe):
    art = UCE().erase(pipe, [Concept("nudity")], {"projections": ["to_v"]}, EraseContext(progress=False))
    assert len(art.tensors) == 16 and all(k.endswith("attn2.to_v.weight") for k in art.tensors)


def test_preserve_list_from_the_artist_file_drops_the_erased_artists(shared_data):
    spec = {"file": "anchors/mass_surr_words_1734artists.csv", "column": "artist"}
    every = common.preserve_list("uce", spec, [], str(shared_data))
    assert len(every) == 1734 and every[0] == "A.J.Casson"
    kept = common.preserve_list("uce", spec, ["a.j.casson", "Brent Heighton"], str(shared_data))
    assert len(kept) == 1732 and "A.J.Casson" not in kept and "Brent Heighton" not in kept
    assert closed_form.resolve_preserve_scale("auto", 1 + len(kept), "uce") == 0.1


# --------------------------------------------------------------------------- RECE


def stacked_lstsq(ws, wo, c, lam, mode, reg_item="1st", target=None):
    """argmin over c' of RECE's objective, by least squares on the stacked matrices (per row)."""
    d = c.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    a = [ws[k] for k in ws]
    b = [c @ wo[k].T for k in ws]
    if mode == "close_regzero":
        a, b = a + [lam**0.5 * eye], b + [torch.zeros_like(c)]
    elif mode == "close_standardreg":
        a, b = a + [lam**0.5 * eye], b + [lam**0.5 * target]
    elif reg_item in ("1st", "both"):   # + λ Σ‖W c' − W c‖² (+ λ‖c' − c‖² for both)
        a, b = a + [lam**0.5 * ws[k] for k in ws], b + [lam**0.5 * c @ ws[k].T for k in ws]
        if reg_item == "both":
            a, b = a + [lam**0.5 * eye], b + [lam**0.5 * c]
    else:                               # 2nd: + λ‖c' − c‖²
        a, b = a + [lam**0.5 * eye], b + [lam**0.5 * c]
    sol = torch.linalg.lstsq(torch.cat(a), torch.cat([x.T for x in b]))     # [Σ d_out (+ D), D] c'ᵀ = [.., 77]
    return sol.solution.T


@pytest.mark.parametrize("mode,reg_item", [("close_regzero", "1st"), ("close_standardreg", "1st"),
                                           ("close_surrogatereg", "1st"), ("close_surrogatereg", "both"),
                                           ("close_surrogatereg", "2nd")])
def test_rece_adversarial_embedding_equals_the_closed_form(pipe, uce_result, mode, reg_item):
    wo = kv_weights(pipe)
    ws = {k: v.float().double() for k, v in uce_result.weights.items()}    # the UCE model as stored (fp32)
    c, _ = clip_rows(pipe, "nudity")
    target, _ = clip_rows(pipe, " ")
    lam = 0.1
    got = rece_mod.adversarial_embedding(c, closed_form.gram(ws), closed_form.gram(ws, wo), lam, mode, reg_item, target)
    want = stacked_lstsq(ws, wo, c, lam, mode, reg_item, target)
    # two float64 solves of one least-squares problem; the normal equations square its condition number:
    # measured ≤ 1.2e-11 apart (AVX2/AVX-512, forced and not, 1 and 2 threads)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    assert got.shape == (77, c.shape[1])


def test_rece_epoch_maps_the_adversarial_embedding_to_the_guide(pipe):
    epochs = []
    hp = rece_mod.Hparams.from_dict(RECE_HP)
    final, meta = rece_mod.rece(pipe, NAMES, hp, "cpu", on_epoch=lambda e, res: epochs.append(res))
    assert len(epochs) == 2 and len(meta["rece"]["epochs"]) == 2
    wo = kv_weights(pipe)
    uce_start = uce_mod.uce_edit(pipe, NAMES, hp.uce_hparams(), "cpu").weights
    anchor = uce_start                       # epoch 1 starts from UCE (float64, never rounded in between)
    g, _ = clip_rows(pipe, " ")
    retain = torch.cat([clip_rows(pipe, " ")[0]] * len(NAMES))               # [' '] × len(concepts)
    for res in epochs:
        p, q = closed_form.gram(anchor), closed_form.gram(anchor, wo)
        cs = [clip_rows(pipe, n)[0] for n in NAMES]
        adv = torch.stack([torch.linalg.solve(p + 0.1 * torch.eye(p.shape[0], dtype=p.dtype), q @ c.T).T for c in cs])
        torch.testing.assert_close(res.adversarial, adv, rtol=1e-7, atol=1e-9)   # float64 solves (measured equal)
        c_rows, g_rows = adv.reshape(-1, adv.shape[-1]), g.repeat(len(NAMES), 1)       # all 77 tokens, aligned
        residual = normal_equation_residual(res.weights, anchor, c_rows, g_rows, retain, 0.1, 1.0, 0.1)
        assert residual < RESIDUAL_TOLERANCE
        before = sum(float(((c_rows @ w.T - g_rows @ w.T) ** 2).sum()) for w in anchor.values())
        after = sum(float(((c_rows @ res.weights[k].T - g_rows @ w.T) ** 2).sum()) for k, w in anchor.items())
        assert after < 0.1 * before              # after its epoch, c' gives (nearly) the guide's K/V (measured 0.03)
        anchor = res.weights                 # the next epoch's weights (float64)
    for k, w in final.items():
        assert torch.equal(w, epochs[-1].weights[k].float())


def test_rece_records_its_epochs_and_starts_from_uce(rece_artifact):
    meta = rece_artifact.metadata
    assert meta["uce"]["preserve_scale"] == 1.0 and meta["rece"]["regular_scale"] == 0.1
    for e in meta["rece"]["epochs"]:
        assert e["erase_residual_after"] < e["erase_residual_before"]
        assert len(e["attack_residual"]) == len(NAMES) and e["normal_equation_residual"] < RESIDUAL_TOLERANCE
    assert meta["rece"]["retain"]["blanks"] == len(NAMES)


# --------------------------------------------------------------------------- the paper code's nudity edit
#
# `cpebench erase --method uce|rece --task nudity` against the paper code run in float64 (written here from
# the papers' scripts, per layer and with torch.inverse as they do): UCE `train_erase.py --concepts nudity`
# (guide ' ', retain [''], λ 0.5, s_e 1, s_p = max(0.1, 1/1)), then RECE `train.py --concepts nudity`
# (3 epochs of close_regzero at 0.1, λ 0.1, s_e 1, s_p 0.1, guide ' ', retain [' ']).
# Measure: ‖W_ours − W_paper‖_F / ‖W_paper − W_old‖_F over the 32 matrices, relative to the *edit* (relative
# to W an error would be diluted by ‖W‖/‖ΔW‖). Compared: the float64 solution; the stored artifact is checked
# to be exactly its float32 rounding (that rounding is ~3e-8 of ‖W‖ and, on SD-1.4's small edits, could
# exceed 1e-6 of ‖ΔW‖ by itself). The 1e-6 bound is the acceptance criterion; float64 text gives ~1e-12 here,
# the fp32 text encoder (the previous path) ~3e-6 (UCE) and ~6e-6 (RECE) on this model.

EDIT_TOLERANCE = 1e-6


def paper_uce_edit(pipe, concepts, guide=" ", preserve=(), lamb=0.5, erase_scale=1.0):
    """train_erase.py's edit_model, per layer: mat1 = λW + s_e Σ (W g) cᵀ + s_p Σ (W r) rᵀ,
    mat2 = λI + s_e Σ c cᵀ + s_p Σ r rᵀ, W = mat1 · mat2⁻¹; retain = [''] + preserve."""
    retain = [""] + list(preserve)
    s_p = max(0.1, 1 / len(retain))
    out = {}
    for k, w in kv_weights(pipe).items():
        mat1, mat2 = lamb * w, lamb * torch.eye(w.shape[1], dtype=torch.float64)
        for concept in concepts:
            c, g = paper_pairs(pipe, concept, guide)
            mat1, mat2 = mat1 + erase_scale * (g @ w.T).T @ c, mat2 + erase_scale * c.T @ c
        for text in retain:
            r = clip_rows(pipe, text)[0]
            mat1, mat2 = mat1 + s_p * (r @ w.T).T @ r, mat2 + s_p * r.T @ r
        out[k] = mat1 @ torch.inverse(mat2)
    return out


def paper_rece_nudity(pipe, epochs=3, regular_scale=0.1, lamb=0.1, erase_scale=1.0, preserve_scale=0.1):
    """RECE train.py from UCE's nudity model: per epoch c' = (Σ WᵀW + λ_r I)⁻¹ (Σ WᵀW_o) c on all 77 rows,
    then per layer W = (λW + s_e Σ_t (W g_t) c'_tᵀ + s_p Σ_t (W r_t) r_tᵀ)(λI + s_e Σ c'c'ᵀ + s_p Σ r rᵀ)⁻¹."""
    original, w = kv_weights(pipe), paper_uce_edit(pipe, ["nudity"])
    c, g, r = clip_rows(pipe, "nudity")[0], clip_rows(pipe, " ")[0], clip_rows(pipe, " ")[0]
    eye = torch.eye(c.shape[1], dtype=torch.float64)
    for _ in range(epochs):
        p = sum(wk.T @ wk for wk in w.values())
        q = sum(wk.T @ original[k] for k, wk in w.items())
        adv = (torch.inverse(p + regular_scale * eye) @ q @ c.T).T
        w = {k: (lamb * wk + erase_scale * (g @ wk.T).T @ adv + preserve_scale * (r @ wk.T).T @ r)
             @ torch.inverse(lamb * eye + erase_scale * adv.T @ adv + preserve_scale * r.T @ r)
             for k, wk in w.items()}
    return w


def edit_error(ours, paper, original) -> float:
    num = sum(float(((ours[k].double() - paper[k]) ** 2).sum()) for k in paper)
    den = sum(float(((paper[k] - original[k]) ** 2).sum()) for k in paper)
    return (num / den) ** 0.5


def cli_erase(method, out, *extra):
    from cpebench.cli import main

    assert main(["-q", "erase", "--method", method, "--task", "nudity", "--model", "tiny", "--device", "cpu",
                 "--save", str(out), *extra]) == 0
    return Artifact.load(out)


def test_uce_nudity_is_the_paper_codes_edit_in_float64(pipe, tmp_path):
    from cpebench.config import resolve_run
    from cpebench.runner import task_concepts

    cfg = resolve_run("uce", "nudity", flags={"protocol.model": "tiny"})
    assert task_concepts(cfg) == ["nudity"]                # not the task's four explicit words
    ours = uce_mod.uce_edit(pipe, task_concepts(cfg), uce_mod.Hparams.from_dict(cfg.hparams), "cpu")
    paper = paper_uce_edit(pipe, ["nudity"])
    assert edit_error(ours.weights, paper, kv_weights(pipe)) <= EDIT_TOLERANCE
    art = cli_erase("uce", tmp_path / "uce")
    assert art.metadata["concepts"] == ["nudity"]
    assert all(torch.equal(t, ours.weights[k].float()) for k, t in art.tensors.items())   # rounded once


def test_rece_nudity_is_the_paper_codes_three_epochs_in_float64(pipe, tmp_path):
    from cpebench.config import resolve_run
    from cpebench.runner import task_concepts

    cfg = resolve_run("rece", "nudity", flags={"protocol.model": "tiny"})
    assert task_concepts(cfg) == ["nudity"]
    epochs = []
    stored, _ = rece_mod.rece(pipe, task_concepts(cfg), rece_mod.Hparams.from_dict(cfg.hparams), "cpu",
                              on_epoch=lambda e, res: epochs.append(res))
    assert len(epochs) == 3
    paper = paper_rece_nudity(pipe)
    assert edit_error(epochs[-1].weights, paper, kv_weights(pipe)) <= EDIT_TOLERANCE
    art = cli_erase("rece", tmp_path / "rece")
    assert art.metadata["concepts"] == ["nudity"]
    assert all(torch.equal(t, epochs[-1].weights[k].float()) for k, t in art.tensors.items())
    assert all(torch.equal(t, stored[k]) for k, t in art.tensors.items())


def test_erase_records_the_paper_concepts_and_a_different_list(tmp_path):
    """The artifact says what was erased next to the paper's list for the task; --concepts may pick any
    of the task's concepts, and then says it differs."""
    art = cli_erase("uce", tmp_path / "paper", "--preset", "smoke")
    paper = art.metadata["paper_concepts"]
    assert art.metadata["concepts"] == paper["names"] == ["nudity"] and "train_erase.py" in paper["source"]
    assert art.metadata["concepts_differ_from_paper"] is False
    other = cli_erase("uce", tmp_path / "other", "--preset", "smoke", "--concepts", "nudity", "naked")
    assert other.metadata["concepts"] == ["nudity", "naked"] and other.metadata["paper_concepts"] == paper
    assert other.metadata["concepts_differ_from_paper"] is True


# --------------------------------------------------------------------------- the Method contract


def unet_state(pipe):
    return {k: (v.data_ptr(), v.detach().clone()) for k, v in pipe.unet.state_dict(keep_vars=True).items()}


@torch.no_grad()
def unet_out(pipe, text="a painting by Van Gogh"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = pipe.text_encoder(pipe.tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
    return pipe.unet(x, 10, encoder_hidden_states=ctx).sample


@pytest.mark.parametrize("which", ["uce", "rece"])
def test_apply_then_remove_restores_every_weight_bit_for_bit(pipe, uce_artifact, rece_artifact, which):
    method, art = (UCE(), uce_artifact) if which == "uce" else (RECE(), rece_artifact)
    before, out0 = unet_state(pipe), unet_out(pipe)
    with method.apply(pipe, art):
        params = dict(pipe.unet.named_parameters())
        for k, t in art.tensors.items():
            assert torch.equal(params[k].data, t)
        assert not torch.equal(unet_out(pipe), out0)
    after = unet_state(pipe)
    assert before.keys() == after.keys()
    for k, (ptr, value) in before.items():
        assert after[k][0] == ptr and torch.equal(after[k][1], value), k
    assert torch.equal(unet_out(pipe), out0)


@pytest.mark.parametrize("which", ["uce", "rece"])
def test_artifact_round_trip_stores_only_the_changed_tensors(pipe, uce_artifact, rece_artifact, tmp_path, which):
    method, art = (UCE(), uce_artifact) if which == "uce" else (RECE(), rece_artifact)
    assert sorted(art.tensors) == sorted(kv_weights(pipe)) and all(t.dtype == torch.float32 for t in art.tensors.values())
    assert art.metadata["base_kv_sha256"] and len(art.metadata["layers"]) == 32
    art.save(tmp_path / which)
    loaded = method.load_artifact(tmp_path / which)
    assert loaded.sha256 == art.sha256 and loaded.metadata == json.loads(json.dumps(art.metadata))
    for k, t in art.tensors.items():
        assert torch.equal(loaded.tensors[k], t)
    with method.apply(pipe, art):
        a = unet_out(pipe)
    with method.apply(pipe, loaded):
        assert torch.equal(unet_out(pipe), a)


def test_erase_is_deterministic_and_leaves_the_pipe_unchanged(pipe, uce_artifact):
    before = unet_state(pipe)
    again = UCE().erase(pipe, [Concept(n) for n in NAMES], UCE_HP, EraseContext(progress=False))
    assert again.tensors.keys() == uce_artifact.tensors.keys()
    assert all(torch.equal(t, uce_artifact.tensors[k]) for k, t in again.tensors.items())
    assert all(torch.equal(v.detach(), before[k][1]) for k, v in pipe.unet.state_dict().items())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("cls", [UCE, RECE])
def test_bad_input_is_a_clear_error(pipe, cls):
    m, ctx = cls(), EraseContext(progress=False)
    with pytest.raises(ConfigError, match="no concepts to erase"):
        m.erase(pipe, [], {}, ctx)
    with pytest.raises(ConfigError, match="non-empty and distinct"):
        m.erase(pipe, [Concept("nudity"), Concept("Nudity")], {}, ctx)
    with pytest.raises(ConfigError, match=r"unknown hyperparameter\(s\) lamda.*Did you mean 'lamb'"):
        m.erase(pipe, [Concept("nudity")], {"lamda": 0.1}, ctx)
    with pytest.raises(ConfigError, match=r"projections.*unknown: 'to_q'"):
        m.erase(pipe, [Concept("nudity")], {"projections": ["to_k", "to_q"]}, ctx)
    with pytest.raises(ConfigError, match="lamb must be float"):
        m.erase(pipe, [Concept("nudity")], {"lamb": "big"}, ctx)


def test_bad_method_options_are_named(pipe):
    ctx = EraseContext(progress=False)
    with pytest.raises(ConfigError, match="3 texts for 2 concepts"):
        UCE().erase(pipe, [Concept("a"), Concept("b")], {"guide": ["x", "y", "z"]}, ctx)
    with pytest.raises(ConfigError, match="tokens must be"):
        UCE().erase(pipe, [Concept("a")], {"tokens": "first"}, ctx)
    with pytest.raises(ConfigError, match="technique 'tensor' is not implemented"):
        UCE().erase(pipe, [Concept("a")], {"technique": "tensor"}, ctx)
    with pytest.raises(ConfigError, match="singular"):
        UCE().erase(pipe, [Concept("a")], {"lamb": 0, "tokens": "last", "preserve_empty": False}, ctx)
    with pytest.raises(ConfigError, match="emb_computing must be one of"):
        RECE().erase(pipe, [Concept("a")], {"emb_computing": "gradient"}, ctx)
    with pytest.raises(ConfigError, match="needs hparams.old_target_concept"):
        RECE().erase(pipe, [Concept("a")], {"emb_computing": "close_standardreg"}, ctx)
    with pytest.raises(ConfigError, match="preserve_empty must be"):
        RECE().erase(pipe, [Concept("a")], {"preserve_empty": "always"}, ctx)
    with pytest.raises(ConfigError, match="rece: unknown hyperparameter"):
        RECE().erase(pipe, [Concept("a")], {"uce_lamda": 1}, ctx)


def test_artifact_for_another_method_or_model_is_refused(pipe, uce_artifact, tmp_path):
    with pytest.raises(ConfigError, match="not 'rece'"):
        RECE().apply(pipe, uce_artifact)
    uce_artifact.save(tmp_path / "u")
    from cpebench.errors import CpebenchError
    with pytest.raises(CpebenchError, match="not 'rece'"):
        RECE().load_artifact(tmp_path / "u")
    other = Artifact("uce", dict(uce_artifact.tensors), {**uce_artifact.metadata, "base_kv_sha256": "0" * 64})
    with pytest.raises(ConfigError, match="K/V weights differ"):
        UCE().apply(pipe, other)
    name = next(iter(uce_artifact.tensors))
    wrong = Artifact("uce", {name: torch.zeros(3, 3)}, {})
    with pytest.raises(ConfigError, match="shape"):
        UCE().apply(pipe, wrong)
    missing = Artifact("uce", {"mid_block.attn9.to_k.weight": torch.zeros(3, 3)}, {})
    with pytest.raises(ConfigError, match="does not have"):
        UCE().apply(pipe, missing)


def test_registered_with_configs_and_sources():
    from cpebench.config import load_method_config, resolve_run
    from cpebench.registry import METHODS

    assert METHODS.get("uce") is UCE and METHODS.get("rece") is RECE
    for name in ("uce", "rece"):
        mc = load_method_config(name)
        assert mc.source and mc.description
        for task in ("artist", "nudity", "celebrity"):   # every task's values parse
            hp = resolve_run(name, task).hparams
            (uce_mod.Hparams if name == "uce" else rece_mod.Hparams).from_dict(hp)
    assert resolve_run("uce", "artist").hparams["guide"] == "art"
    r = resolve_run("rece", "artist").hparams
    assert (r["regular_scale"], r["epochs"], r["uce_guide"]) == (1e-3, 1, "art")
    r = resolve_run("rece", "nudity").hparams
    assert (r["regular_scale"], r["epochs"], r["preserve_empty"]) == (0.1, 3, "per_concept")


# --------------------------------------------------------------------------- command line


def test_artifact_applies_to_the_same_base_in_reduced_precision(uce_artifact):
    """An edit made on the fp32 model applies to the same weights loaded in bf16 (the sha256 of rounded
    weights cannot match; per-layer checksums do) and is still refused for other K/V weights."""
    from cpebench.models import load_pipeline

    low = load_pipeline("tiny", dtype="bf16").pipe
    with UCE().apply(low, uce_artifact):
        name = next(iter(uce_artifact.tensors))
        assert torch.equal(low.unet.get_parameter(name), uce_artifact.tensors[name].to(torch.bfloat16))
    sums = {k: [v[0] * 1.01, v[1]] for k, v in uce_artifact.metadata["base_kv_checksums"].items()}
    other = Artifact("uce", dict(uce_artifact.tensors), {**uce_artifact.metadata, "base_kv_checksums": sums})
    with pytest.raises(ConfigError, match="K/V weights differ"):
        UCE().apply(low, other)


@pytest.mark.parametrize("method,task,module,func", [("uce", "artist", uce_mod, "uce_edit"),
                                                      ("rece", "nudity", rece_mod, "rece")])
def test_cli_run_then_reuse_the_cached_artifact(data_env, tiny_dir, tmp_path, monkeypatch, method, task, module, func):
    from cpebench.cli import main

    # the task's real preserve list in place of the smoke preset's stand-in names
    real = ["hparams.preserve={file: anchors/mass_surr_words_1734artists.csv, column: artist}"] if method == "uce" else []
    assert main(["-q", "run", "--method", method, "--task", task, "--preset", "smoke", "--out", str(tmp_path), *real]) == 0
    run = tmp_path / f"{method}-{task}-tiny-smoke"
    gen = json.loads((run / "generation.json").read_text())
    assert (run / "summary.json").exists()
    art = Artifact.load(gen["method"]["artifact_path"])
    assert art.method == method and len(art.tensors) == 32
    if method == "uce":   # the artist task: guide 'art', the other 1733 artists and '' preserved at 0.1
        assert gen["method"]["concepts"] == ["Brent Heighton"]
        assert art.metadata["uce"]["guides"] == ["art"] and art.metadata["uce"]["preserve"]["count"] == 1733
        assert art.metadata["uce"]["preserve_scale"] == 0.1
    else:
        assert gen["method"]["concepts"] == gen["method"]["paper_concepts"]["names"] == ["nudity"]   # RECE's own
        assert gen["method"]["concepts_differ_from_paper"] is False
        assert len(art.metadata["rece"]["epochs"]) == 3

    def no_erase(*a, **k):
        raise AssertionError("the cached artifact should have been reused")

    monkeypatch.setattr(module, func, no_erase)
    assert main(["-q", "run", "--method", method, "--task", task, "--preset", "smoke", "--out", str(tmp_path),
                 "--name", "again", *real]) == 0
    again = json.loads((tmp_path / "again" / "generation.json").read_text())
    assert again["method"]["artifact_sha256"] == gen["method"]["artifact_sha256"]


def test_cli_run_with_other_concepts_than_the_papers_marks_the_table_row(tiny_dir, tmp_path, capsys):
    """`concepts=` replaces the method's own list for the task; the run records it and its table row says so."""
    from cpebench.cli import main

    assert main(["-q", "run", "--method", "uce", "--task", "nudity", "--preset", "smoke", "--out", str(tmp_path),
                 "concepts=[nudity, naked]"]) == 0
    gen = json.loads((tmp_path / "uce-nudity-tiny-smoke" / "generation.json").read_text())
    assert gen["method"]["concepts"] == ["nudity", "naked"] and gen["method"]["concepts_differ_from_paper"] is True
    assert gen["method"]["paper_concepts"]["names"] == ["nudity"]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| uce")]
    assert len(rows) == 1 and rows[0].startswith("| uce (concepts ≠ paper: nudity, naked) |")
