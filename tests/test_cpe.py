"""CPE on tiny random SD-1.x models: the defining properties of the official code (docs/methods/cpe.md)."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import save_file

from cpebench.errors import ConfigError, DataError
from cpebench.methods import Artifact, Concept, EraseContext, cpe
from cpebench.methods.common import encode_texts, kv_layers
from cpebench.methods.cpe import (
    CPE,
    ConceptBatch,
    Hparams,
    KVSpace,
    ResAG,
    adversarial_loss,
    artifact_tensors,
    concept_generator,
    erase_losses,
    layer_weights,
    load_official,
    merge_artifacts,
    official_key,
)

ETA = 0.3
# Inline training data (the real files are exercised by the CLI tests): one template + the bare name.
SMALL = dict(templates=["a photo of actor"], replace_word="actor", neutral="a person",
             anchor_words=["stars", "icons", "a dog", "a city street"],
             anchor_pool=["Brad Pitt", "Taylor Swift", "Beyonce", "Tom Cruise", "chris evans fan club"],
             anchor_nearest=2, guidance=ETA, anchor_batch=8, adv_prompts=4, gate_rank=8)


def short(**kw) -> dict:
    return {**SMALL, "stages": 2, "iterations": 6, "stage0_iterations_factor": 1, "adv_iterations": 4, **kw}


def mixed_width_unet():
    """Attention widths 16/32/48 (three layer groups, like SD's 320/640/1280) and a 24-d text space."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 48, 48), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=24, attention_head_dim=8,
        norm_num_groups=8)


def random_batch(space, hp, names, scale_up=1.0):
    """A ConceptBatch with non-zero U2 and gate vector (so every term of the losses is exercised)."""
    net = ConceptBatch(space, hp, [concept_generator(0, n, "cpu") for n in names], "cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for u in net.ups:
            u.copy_(torch.randn(u.shape, generator=g) * scale_up)
        net.v.copy_(torch.randn(net.v.shape, generator=g))
        net.q.mul_(2000.0)   # sharpen the token attention away from uniform
    return net


def as_artifact(space, nets, hp, names, unet) -> Artifact:
    return Artifact(method="cpe", tensors=artifact_tensors(space, nets, hp),
                    metadata={"concepts": list(names), "layers": space.official_order,
                              "base_kv_sha256": cpe.base_kv_sha256(unet)})


def rounded_once(x: torch.Tensor) -> torch.Tensor:
    """x with every element moved by one fp32 rounding (2⁻²⁴ relative, seeded random sign): how far a result
    moves under this is its fp32 noise floor (CPE computes in fp32 only, so there is no float64 run)."""
    sign = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return x * (1 + 2.0**-24 * sign)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from cpebench.models import load_pipeline

    return load_pipeline(str(tiny_dir)).pipe


# --------------------------------------------------------------------------- structure


def test_wraps_the_32_kv_projections_with_official_names(pipe):
    layers = kv_layers(pipe.unet)
    assert len(layers) == 32 and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n, _ in layers)
    assert official_key(layers[0][0]) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert all(cpe.layer_from_official(official_key(n)) == n for n, _ in layers)
    weights = layer_weights(pipe.unet)
    assert set(weights) == {n for n, _ in layers} and all(w > 0 for w in weights.values())


def test_at_init_the_residual_is_exactly_zero_and_images_unchanged(pipe):
    from cpebench.config import ProtocolConfig
    from cpebench.data import PromptRecord
    from cpebench.engine import Engine, WorkItem

    space = KVSpace(pipe.unet, "cpu")
    hp = Hparams.from_dict(short())
    net = ConceptBatch(space, hp, [concept_generator(0, "x", "cpu")], "cpu")
    art = as_artifact(space, [net], hp, ["x"], pipe.unet)
    edit = ResAG(art.tensors, art.metadata["layers"])
    ctx = encode_texts(pipe, ["a photo of chris evans", ""], "cpu")
    for name in art.metadata["layers"]:
        assert torch.count_nonzero(edit.residual(name, ctx)) == 0
    engine = Engine(pipe, ProtocolConfig(model="tiny", steps=3, height=64, width=64), batch_size=2, progress=False)
    items = [WorkItem(set_name="s", record=PromptRecord(str(i), p, i, None, "erased", None), index=0, images_per_row=1,
                      negative_prompt="", guidance=7.5) for i, p in enumerate(["a photo of chris evans", "a dog"])]
    before, _, _ = engine.denoise(items)
    with CPE().apply(pipe, art):
        inside, _, _ = engine.denoise(items)
    assert before.std() > 0 and (before == inside).all()


def test_gate_runs_once_per_prompt_batch_including_the_negative_branch(pipe, trained, monkeypatch):
    from cpebench.config import ProtocolConfig
    from cpebench.data import PromptRecord
    from cpebench.engine import Engine, WorkItem

    made = []
    real_init = ResAG.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(ResAG, "__init__", spy)
    engine = Engine(pipe, ProtocolConfig(model="tiny", steps=5, height=64, width=64), batch_size=2, progress=False)
    items = [WorkItem("s", PromptRecord(str(i), p, i, None, "erased", None), 0, 1, "blurry", 7.5)
             for i, p in enumerate(["a photo of chris evans", "a dog", "a cat"])]
    with CPE().apply(pipe, trained):
        engine.denoise(items[:2])
        engine.denoise(items[2:])
    assert len(made) == 1 and made[0].computed == 2        # 2 batches x 5 steps x 16 layers -> 2 gate evaluations
    h, _, _ = made[0].gate(made[0]._context)
    assert made[0]._context.shape[0] == 2                   # the last batch: [negative, prompt] rows both gated
    assert h.shape[0] == 2 and made[0].computed == 2


# --------------------------------------------------------------------------- losses


def test_gram_losses_equal_the_direct_formulas_and_their_gradients():
    unet = mixed_width_unet()
    space = KVSpace(unet, "cpu")
    assert len(space.groups) == 3 and space.text_dim == 24
    hp = Hparams.from_dict(short(rank=2, gate_rank=4))
    net = random_batch(space, hp, ["a", "b"])
    g = torch.Generator().manual_seed(2)
    e_t, e_n = torch.randn(2, 77, 24, generator=g), torch.randn(2, 77, 24, generator=g)
    delta, anchors = 0.1 * torch.randn(2, 3, 77, 24, generator=g), torch.randn(2, 5, 77, 24, generator=g)

    def run(mode):
        net.zero_grad()
        terms = erase_losses(space, net, e_t, e_n, delta, anchors, ETA, mode)
        adv = adversarial_loss(space, net, e_t, delta, mode)
        (terms["erase"] + terms["adv"] + 7 * terms["anchor"] + adv).sum().backward()
        return {**{k: v.detach() for k, v in terms.items()}, "adv_stage": adv.detach()}, \
            [p.grad.clone() for p in net.parameters()]

    gram, gram_grads = run("gram")
    direct, direct_grads = run("direct")
    # Both are fp32; the gram form's longest sum, yᵀGy over all inputs and tokens, has N = 9·77·24² terms, whose
    # typical rounding is √N·u (u = 2⁻²⁴; Higham & Mary's probabilistic bound): 3.8e-5. Measured on AVX2/AVX-512,
    # forced and not, 1 and 2 threads: losses differ by 2.7e-6 (0.07 of it), gradients far less. A wrong
    # term in the algebra is off by O(1).
    tol = (e_t.shape[1] * (1 + delta.shape[1] + anchors.shape[1]) * space.text_dim**2) ** 0.5 * 2.0**-24
    for k in direct:
        assert direct[k].abs().min() > 0
        torch.testing.assert_close(gram[k], direct[k], rtol=tol, atol=0)
    for a, b in zip(gram_grads, direct_grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


# --------------------------------------------------------------------------- training


def _kv(pipe, art, prompts):
    """{layer: (original K/V, erased K/V)} of the real attn2 modules for these prompts."""
    ctx = encode_texts(pipe, prompts, "cpu")
    modules = dict(pipe.unet.named_modules())
    edit = ResAG(art.tensors, art.metadata["layers"])
    out = {}
    with torch.no_grad():
        for name in art.metadata["layers"]:
            lin = modules[name]
            original = lin(ctx)
            out[name] = (original, original + edit.residual(name, ctx))
    return ctx, edit, out


def _weighted(pipe, pairs) -> float:
    weights = layer_weights(pipe.unet)
    return sum(weights[n] * float(((a - b) ** 2).mean()) for n, (a, b) in pairs.items())


@pytest.fixture(scope="module")
def trained(pipe):
    hp = short(stages=2, iterations=700, adv_iterations=50, lr=2e-2, stage0_lr_factor=1, rank=4, anchor_weight=10.0)
    return CPE().erase(pipe, [Concept("chris evans")], hp, EraseContext(progress=False))


def test_training_moves_the_target_kv_to_the_spec_target(pipe, trained):
    # K/V of the target through the erased layers vs P(e_n) + eta (P(e_n) - P(e_t)), for both training prompts
    targets, neutrals = ["a photo of chris evans", "chris evans"], ["a photo of a person", "a person"]
    _, _, tk = _kv(pipe, trained, targets)
    _, _, nk = _kv(pipe, trained, neutrals)
    goal = {n: nk[n][0] + ETA * (nk[n][0] - tk[n][0]) for n in tk}
    before = _weighted(pipe, {n: (tk[n][0], goal[n]) for n in tk})   # ResAG off
    after = _weighted(pipe, {n: (tk[n][1], goal[n]) for n in tk})
    assert after < before / 10, (before, after)


def test_anchors_move_far_less_than_the_target_and_gate_is_higher_on_target(pipe, trained):
    prompts = ["a photo of chris evans", "a photo of stars", "a photo of a dog", "a photo of icons"]
    ctx, edit, kv = _kv(pipe, trained, prompts)
    change = [sum(float(((e[i] - o[i]) ** 2).sum()) for o, e in kv.values()) /
              sum(float((o[i] ** 2).sum()) for o, _ in kv.values()) for i in range(len(prompts))]
    assert max(change[1:]) < change[0] / 10, change
    _, _, s = edit.gate(ctx)                         # s [B, T]: the gate of the chosen concept
    name_tokens = slice(4, 6)                        # <sot> a photo of | chris evans | <eot> ...
    assert float(s[0, name_tokens].mean()) > max(float(s[i, 4]) for i in range(1, len(prompts)))


def relative_distance(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over all tensors of b."""
    return (sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b) /
            sum(float(b[k].double().pow(2).sum()) for k in b)) ** 0.5


def test_concepts_trained_together_equal_concepts_trained_alone(pipe, monkeypatch):
    """Together, alone or one group per concept: the same artifacts up to fp32 rounding. The floor: how far
    the concept trained alone moves when every text embedding it trains on is rounded once more. Measured on
    AVX2/AVX-512, forced and not, 1 and 2 threads: 7e-9 to 9e-9 relative (about one ulp of the weights);
    the together and split artifacts lie 0.5-0.9x that floor from the alone ones; margin 4x."""
    hp = short()
    both = CPE().erase(pipe, [Concept("chris evans"), Concept("elon musk")], hp, EraseContext(progress=False))
    alone = CPE().erase(pipe, [Concept("elon musk")], hp, EraseContext(progress=False))
    split = CPE().erase(pipe, [Concept("chris evans"), Concept("elon musk")], {**hp, "concept_batch": 1},
                        EraseContext(progress=False))
    assert both.metadata["train"]["concept_groups"] == [2] and split.metadata["train"]["concept_groups"] == [1, 1]
    monkeypatch.setattr(cpe, "encode_texts", lambda *a, **k: rounded_once(encode_texts(*a, **k)))
    rounded = CPE().erase(pipe, [Concept("elon musk")], hp, EraseContext(progress=False))
    floor = relative_distance(rounded.tensors, alone.tensors)
    assert relative_distance({k: v[1:2] for k, v in both.tensors.items()}, alone.tensors) <= 4 * floor
    assert relative_distance(both.tensors, split.tensors) <= 4 * floor
    assert not torch.allclose(both.tensors["gate.q"][0], both.tensors["gate.q"][1])


def test_adversarial_stage_lowers_its_objective_and_next_stage_uses_only_the_newest(pipe, monkeypatch):
    made, used = [], []
    real_adv, real_losses = cpe.adversarial_stage, cpe.erase_losses

    def adv_stage(*a, **k):
        delta, record = real_adv(*a, **k)
        made.append(delta.clone())
        return delta, record

    def losses(space, net, e_t, e_n, delta, *a, **k):
        used.append(None if delta is None else delta.clone())
        return real_losses(space, net, e_t, e_n, delta, *a, **k)

    monkeypatch.setattr(cpe, "adversarial_stage", adv_stage)
    monkeypatch.setattr(cpe, "erase_losses", losses)
    # a substantive erase first (else delta = 0 is already optimal), then 40 adversarial steps
    hp = short(stages=3, iterations=150, adv_iterations=40, adv_prompts=3, lr=2e-2, stage0_lr_factor=1, rank=4,
               anchor_weight=10.0)
    art = CPE().erase(pipe, [Concept("chris evans")], hp, EraseContext(progress=False))
    stages = art.metadata["train"]["stages"][0]
    for s in ("0", "1"):
        adv = stages[s]["adversarial"]
        assert adv["last"] < adv["first"], adv
    assert "adversarial" not in stages["2"]              # the unused final adversarial stage is skipped
    assert len(made) == 2 and all(d.shape == (1, 3, 77, 32) for d in made)
    assert len(used) == 3 * 150
    assert all(u is None for u in used[:150])            # stage 0: no perturbations yet
    assert all(torch.equal(u, made[0]) for u in used[150:300])
    assert all(torch.equal(u, made[1]) for u in used[300:])
    assert not torch.equal(made[0], made[1])


def test_killed_training_resumes_from_its_last_completed_stage(pipe, tmp_path, monkeypatch):
    hp = short(stages=3)
    reference = CPE().erase(pipe, [Concept("chris evans")], hp, EraseContext(progress=False))

    calls = {"n": 0}
    real = cpe.erase_stage

    def dies_in_stage_2(space, data, state, stage, *a, **k):
        calls["n"] += 1
        if stage == 2:
            raise KeyboardInterrupt
        return real(space, data, state, stage, *a, **k)

    monkeypatch.setattr(cpe, "erase_stage", dies_in_stage_2)
    ctx = EraseContext(progress=False, workdir=tmp_path / "state")
    with pytest.raises(KeyboardInterrupt):
        CPE().erase(pipe, [Concept("chris evans")], hp, ctx)
    assert calls["n"] == 3 and (tmp_path / "state" / "group-000.safetensors").exists()
    monkeypatch.setattr(cpe, "erase_stage", lambda space, data, state, stage, *a, **k:
                        calls.__setitem__("resumed_at", calls.get("resumed_at", stage)) or real(space, data, state, stage, *a, **k))
    resumed = CPE().erase(pipe, [Concept("chris evans")], hp, ctx)
    assert calls["resumed_at"] == 2
    for k, v in reference.tensors.items():
        assert torch.equal(v, resumed.tensors[k]), k


# --------------------------------------------------------------------------- multi-concept and artifacts


def test_merged_artifacts_give_each_token_the_residual_of_its_highest_gate_concept(pipe):
    space = KVSpace(pipe.unet, "cpu")
    hp = Hparams.from_dict(short(rank=2))
    a = as_artifact(space, [random_batch(space, hp, ["a"])], hp, ["a"], pipe.unet)
    hp_b = Hparams.from_dict(short(rank=1, gate_rank=4, alpha=2.0))   # other ranks and alpha: merge is exact
    net_b = random_batch(space, hp_b, ["b"])
    b = as_artifact(space, [net_b], hp_b, ["b"], pipe.unet)
    for x in (a, b):   # unsaturated gates, so that the argmax varies from token to token
        x.tensors["gate.v"] = x.tensors["gate.v"] * 0.2
    merged = merge_artifacts([a, b])
    assert merged.metadata["concepts"] == ["a", "b"] and merged.tensors["gate.q"].shape[0] == 2
    ctx = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(5))   # any context [B, T, D]
    single = [ResAG(x.tensors, x.metadata["layers"]) for x in (a, b)]
    both = ResAG(merged.tensors, merged.metadata["layers"])
    gates = torch.stack([e.gate(ctx)[2] for e in single])          # [2, B, T]
    winner = gates.argmax(dim=0)
    assert 0 < int(winner.sum()) < winner.numel()                   # both concepts win some tokens
    assert torch.equal(both.gate(ctx)[1], winner)

    def picked(name, context):   # every token gets its winning concept's residual
        first, second = (e.residual(name, context) for e in single)
        return torch.where((winner == 0)[..., None], first, second)

    # The merged network evaluates both concepts in one batch: fp32 rounding only. The floor: how far the
    # picked residuals move when the context is rounded once more. Measured on AVX2/AVX-512, forced and not,
    # 1 and 2 threads: the merged residuals differ by 0.01-0.2x that floor (per layer); margin 5x.
    for name in merged.metadata["layers"]:
        expected = picked(name, ctx)
        floor = (picked(name, rounded_once(ctx)) - expected).abs().max()
        assert (both.residual(name, ctx) - expected).abs().max() <= floor


def test_artifact_round_trip_is_bit_exact(pipe, trained, tmp_path):
    path = trained.save(tmp_path / "art")
    loaded = CPE().load_artifact(path)
    assert loaded.sha256 == trained.sha256
    assert all(torch.equal(v, loaded.tensors[k]) for k, v in trained.tensors.items())
    ctx = encode_texts(pipe, ["a photo of chris evans"], "cpu")
    name = trained.metadata["layers"][5]
    assert torch.equal(ResAG(trained.tensors, trained.metadata["layers"]).residual(name, ctx),
                       ResAG(loaded.tensors, loaded.metadata["layers"]).residual(name, ctx))


def _write_official(art: Artifact, path, with_w_ks=True):
    """The released format: 3 gate tensors + lora_down/lora_up/alpha per layer, n = 1."""
    t = art.tensors
    out = {cpe.OFFICIAL_GATE_Q: t["gate.q"], cpe.OFFICIAL_GATE_V: t["gate.v"]}
    if with_w_ks:
        out[cpe.OFFICIAL_GATE_K] = torch.randn_like(t["gate.q"])   # never used by the forward
    r = t[art.metadata["layers"][0] + ".down"].shape[-1]
    for name in art.metadata["layers"]:
        key = official_key(name)
        out[key + ".lora_down.weight"] = t[name + ".down"]
        out[key + ".lora_up.weight"] = t[name + ".up"]
        out[key + ".alpha"] = torch.tensor(float(t["scale"][0]) * r)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"rank": str(r), "alpha": "1.0", "prompts": ",".join(art.metadata["concepts"])})
    return out


def spec_forward(official: dict, layer_key: str, e: torch.Tensor) -> torch.Tensor:
    """The official forward written out literally for one concept (n = 1)."""
    q, v = official[cpe.OFFICIAL_GATE_Q][0], official[cpe.OFFICIAL_GATE_V][0, :, 0]
    down, up = official[layer_key + ".lora_down.weight"][0], official[layer_key + ".lora_up.weight"][0]
    scale = float(official[layer_key + ".alpha"]) / down.shape[-1]
    attn = torch.softmax((e @ q) @ (e @ q).transpose(-1, -2), dim=-1)
    mixed = attn @ e
    s = torch.sigmoid(mixed @ v)
    return (s[..., None] * mixed) @ down @ up * scale


def test_official_checkpoints_load_and_give_the_same_forward(pipe, tmp_path):
    space = KVSpace(pipe.unet, "cpu")
    hp = Hparams.from_dict(short(rank=2))
    arts = [as_artifact(space, [random_batch(space, hp, [n])], hp, [n], pipe.unet) for n in ("chris evans", "elon musk")]
    raw = [_write_official(a, tmp_path / "CPE_Celeb" / a.metadata["concepts"][0].replace(" ", "_") /
                           "singleton_onebyone_person_last.safetensors") for a in arts]
    save_file({"prompts": torch.zeros(2, 77, 32)}, str(tmp_path / "CPE_Celeb" / "chris_evans" / "x_adv_prompts_last.safetensors"))
    loaded = CPE().load_artifact(tmp_path / "CPE_Celeb")
    assert len(raw[0]) == 3 + 32 * 3 == 99
    assert loaded.metadata["concepts"] == ["chris evans", "elon musk"]
    ctx = encode_texts(pipe, ["a photo of chris evans", "a dog"], "cpu")
    ours, theirs = ResAG(loaded.tensors, loaded.metadata["layers"]), ResAG(arts[0].tensors, arts[0].metadata["layers"])
    only_first = ResAG(CPE().load_artifact(tmp_path / "CPE_Celeb" / "chris_evans" /
                                           "singleton_onebyone_person_last.safetensors").tensors, loaded.metadata["layers"])
    # Up to fp32 rounding; the floor: the literal forward's distance from itself in float64. Measured on
    # AVX2/AVX-512, forced and not, 1 and 2 threads: ours differ from it by 0.9-1.7x that floor; margin 4x.
    raw64 = {k: v.double() for k, v in raw[0].items()}
    for name in loaded.metadata["layers"][:4]:
        literal = spec_forward(raw[0], official_key(name), ctx)
        floor = (literal - spec_forward(raw64, official_key(name), ctx.double())).abs().max()
        for edit in (only_first, theirs):
            assert (edit.residual(name, ctx) - literal).abs().max() <= 4 * floor
    with CPE().apply(pipe, loaded):             # the merged release applies to an SD-1.x UNet
        pass
    assert ours.n_concepts == 2


# --------------------------------------------------------------------------- bad input


def test_empty_or_duplicate_concepts_are_refused(pipe):
    with pytest.raises(ConfigError, match="no concepts"):
        CPE().erase(pipe, [], short(), EraseContext(progress=False))
    with pytest.raises(ConfigError, match="distinct"):
        CPE().erase(pipe, [Concept("a"), Concept("A")], short(), EraseContext(progress=False))


def test_bad_hyperparameters_are_named():
    with pytest.raises(ConfigError, match="unknown hyperparameter.*gate_rnak"):
        Hparams.from_dict({**SMALL, "gate_rnak": 4})
    with pytest.raises(ConfigError, match="hparams.rank must be int"):
        Hparams.from_dict({**SMALL, "rank": "one"})
    with pytest.raises(ConfigError, match="loss must be gram or direct"):
        Hparams.from_dict({**SMALL, "loss": "fast"})
    assert Hparams.from_dict({**SMALL, "anchor_weight": "1.0e4"}).anchor_weight == 1e4   # YAML 1.1 string


def test_templates_without_the_replace_word_are_refused(pipe):
    with pytest.raises(DataError, match="replace word 'actor'"):
        CPE().erase(pipe, [Concept("x")], short(templates=["a photo of someone"]), EraseContext(progress=False))


def test_artifact_for_another_layout_or_base_model_is_refused(pipe, tiny_dir, tmp_path):
    other = mixed_width_unet()
    space = KVSpace(other, "cpu")
    hp = Hparams.from_dict(short())
    wrong_arch = as_artifact(space, [random_batch(space, hp, ["x"])], hp, ["x"], other)
    with pytest.raises(ConfigError, match="another base model|another architecture"):
        CPE().apply(pipe, wrong_arch)
    renamed = Artifact("cpe", dict(wrong_arch.tensors), {**wrong_arch.metadata, "layers": wrong_arch.metadata["layers"][:30]})
    with pytest.raises(ConfigError, match="layer layout"):
        CPE().apply(pipe, renamed)

    from cpebench.models import load_pipeline, save_tiny_pipeline

    other_weights = load_pipeline(str(save_tiny_pipeline(tmp_path / "tiny-seed1", seed=1))).pipe
    space = KVSpace(other_weights.unet, "cpu")
    trained_elsewhere = as_artifact(space, [random_batch(space, hp, ["x"])], hp, ["x"], other_weights.unet)
    with pytest.raises(ConfigError, match="made from base model"):
        CPE().apply(pipe, trained_elsewhere)


def test_broken_official_checkpoint_names_the_file_and_tensor(pipe, tmp_path):
    space = KVSpace(pipe.unet, "cpu")
    hp = Hparams.from_dict(short())
    art = as_artifact(space, [random_batch(space, hp, ["x"])], hp, ["x"], pipe.unet)
    path = tmp_path / "x" / "m_last.safetensors"
    tensors = _write_official(art, path)
    key = official_key(art.metadata["layers"][3]) + ".lora_up.weight"
    del tensors[key]
    save_file(tensors, str(path))
    with pytest.raises(DataError, match=r"m_last.safetensors.*lora_up.weight missing"):
        load_official(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no official CPE checkpoint"):
        load_official(tmp_path / "empty")


def test_apply_restores_the_original_processors(pipe, trained):
    before = dict(pipe.unet.attn_processors)
    with CPE().apply(pipe, trained):
        assert any(type(p).__name__ == "KVEditProcessor" for p in pipe.unet.attn_processors.values())
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_training_record_is_in_the_artifact(trained):
    meta = trained.metadata
    assert meta["layers"] and meta["rank"] == 4 and meta["gate_rank"] == 8
    assert meta["anchor_words"]["chris evans"][:4] == ["stars", "icons", "a dog", "a city street"]
    assert "chris evans fan club" not in meta["anchor_words"]["chris evans"]      # contains the target: excluded
    assert len(meta["anchor_words"]["chris evans"]) == 4 + 2
    json.dumps(meta)   # JSON-serialisable as saved
    assert isinstance(types.SimpleNamespace(**meta["train"]).seconds, float)


def test_official_8bit_optimizer_is_a_named_option(pipe):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="adamw8bit needs bitsandbytes"):
            CPE().erase(pipe, [Concept("x")], short(optimizer="adamw8bit"), EraseContext(progress=False))
    else:
        art = CPE().erase(pipe, [Concept("x")], short(optimizer="adamw8bit"), EraseContext(progress=False))
        assert art.tensors["gate.q"].shape[0] == 1
