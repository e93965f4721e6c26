"""ACE (cpebench reconstruction, spec v1): the closed form, the gate, the mask, the prompts, training, artifacts.

Tiny random SD model on the CPU (spec §9); lexical masks use hand-picked token ids where the random text
encoder makes the semantic mask meaningless."""

from __future__ import annotations

import math

import pytest
import torch

from baselines import ace
from baselines.ace import (
    ACE,
    Hparams,
    TokenMask,
    concept_prompts,
    gate_kv,
    layer_sums,
    solve_gates,
)
from cpebench.attention import announce_batch
from cpebench.errors import ConfigError, DataError
from cpebench.methods import Concept, EraseContext
from cpebench.models import text_embeddings

HP = {"templates": ["a photo of concept", "concept in the street"], "retain_words": ["a dog", "a red car"],
          "retain_pool": ["Tom Hanks", "Emma Watson", "Claude Monet"], "retain_nearest": 2,
          "variant_rules": ["surname", "first_name", "typo"], "neutral": "a person", "steps": 3, "data_steps": 3, "n_images": 2,
          "resolution": 32, "stats_timesteps": 2, "stats_batch": 3, "save_every": 1}
CONCEPT = [Concept("Anne Hathaway")]


@pytest.fixture(scope="module")
def pipe(tiny):
    return tiny.pipe


@pytest.fixture(scope="module")
def artifact(pipe):
    return ACE().erase(pipe, CONCEPT, HP, EraseContext(progress=False))


def unet_out(pipe, prompts, negatives=None, seed=0):
    """ε of a CFG batch [negatives; prompts], announced as the engine does."""
    negatives = negatives or [""] * len(prompts)
    context = text_embeddings(pipe, negatives + prompts)
    x = torch.randn(len(context), 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    announce_batch(pipe.unet, context, prompts, negatives)
    with torch.no_grad():
        return pipe.unet(x, 500, encoder_hidden_states=context, return_dict=False)[0]


def attn2(pipe):
    return next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))


# --------------------------------------------------------------------------- stage 1: the closed form


def float64_reference(attn, hidden, ctx_c, ctx_n, mask):
    """B and ΔO of one layer in float64 with an explicit softmax, independently of ``layer_sums``."""
    w = {k: getattr(attn, k).weight.double() for k in ("to_q", "to_k", "to_v")}
    q, kc, vc = hidden.double() @ w["to_q"].T, ctx_c.double() @ w["to_k"].T, ctx_c.double() @ w["to_v"].T
    kn, vn = ctx_n.double() @ w["to_k"].T, ctx_n.double() @ w["to_v"].T
    h = attn.heads
    dh = q.shape[-1] // h

    def attend(k, v):
        out = torch.empty(q.shape, dtype=torch.float64)
        for i in range(h):
            s = slice(i * dh, (i + 1) * dh)
            p = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(dh), dim=-1)
            out[..., s] = p @ v[..., s]
        return out

    b = attend(kc, mask[..., None].double() * vc)
    return b, attend(kc, vc) - attend(kn, vn)


def test_closed_form_gate_is_the_box_constrained_ridge_solution(pipe):
    attn = attn2(pipe)
    g = torch.Generator().manual_seed(0)
    d_in, d_ctx = attn.to_q.in_features, attn.to_k.in_features
    hidden, ctx_c = torch.randn(3, 16, d_in, generator=g), torch.randn(3, 77, d_ctx, generator=g)
    ctx_n = ctx_c.clone()          # the neutral prompt differs on the concept rows: most g*_j fall inside (0, 1)
    ctx_n[:, 2:4] = 0.3 * torch.randn(3, 2, d_ctx, generator=g)
    mask = torch.zeros(3, 77)
    mask[:, 2:4] = 1.0
    mask[1, 5] = 0.5
    hp = Hparams(gate_keys=False, lambda_rel=1e-2, alpha=1.0)
    num, den, qdo = (s.double().sum(0, keepdim=True) for s in layer_sums(attn, hidden, ctx_c, ctx_n, mask, None, False))
    gate = solve_gates(num, den, qdo, hp)[0].double()

    b, delta = float64_reference(attn, hidden, ctx_c, ctx_n, mask)
    b, delta = b.reshape(-1, b.shape[-1]), delta.reshape(-1, delta.shape[-1])      # stack samples and queries
    lam = hp.lambda_rel * (b * b).sum(0).mean()
    for j in range(b.shape[1]):                                                    # per-channel ridge by lstsq
        a = torch.cat([b[:, j : j + 1], lam.sqrt().view(1, 1)])
        y = torch.cat([delta[:, j], torch.zeros(1, dtype=torch.float64)])
        free = torch.linalg.lstsq(a, y[:, None]).solution.item()
        # fp32 sums over 3x16 queries vs float64: measured relative error 1.4e-6; 1e-4 leaves a 70x margin
        assert gate[j].item() == pytest.approx(min(max(free, 0.0), 1.0), rel=1e-4, abs=1e-6), j

        def objective(v, j=j):
            return float(((delta[:, j] - v * b[:, j]) ** 2).sum() + lam * v * v)

        for step in (1e-3, -1e-3):   # no feasible perturbation lowers the objective (exact minimiser in [0, 1])
            other = min(max(gate[j].item() + step, 0.0), 1.0)
            assert objective(other) >= objective(gate[j].item()) - 1e-9 * max(1.0, objective(gate[j].item()))
    inside = int(((gate > 0) & (gate < 1)).sum())
    assert inside >= gate.numel() // 2 and bool(((gate >= 0) & (gate <= 1)).all())   # measured: 19 of 32 unclipped
    # the sums are the normal equations' terms, channel by channel
    torch.testing.assert_close(num[0], (b * delta).sum(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(den[0], (b * b).sum(0), rtol=1e-4, atol=1e-6)


def test_no_concept_difference_gives_a_zero_gate_and_statistics_stream_by_addition(pipe):
    attn = attn2(pipe)
    g = torch.Generator().manual_seed(1)
    hidden, ctx = torch.randn(4, 8, attn.to_q.in_features, generator=g), torch.randn(4, 77, attn.to_k.in_features, generator=g)
    mask = torch.zeros(4, 77)
    mask[:, 1:3] = 1.0
    num, den, qdo = (s.double().sum(0, keepdim=True) for s in layer_sums(attn, hidden, ctx, ctx, mask, None, True))
    assert torch.equal(solve_gates(num, den, qdo, Hparams()), torch.zeros(1, num.shape[1]))   # ΔO = 0 -> g* = 0
    other = torch.randn(4, 77, attn.to_k.in_features, generator=g)
    whole = [s.double().sum(0) for s in layer_sums(attn, hidden, ctx, other, mask, None, True)]
    shards = [sum(s.double().sum(0) for s in parts) for parts in zip(
        layer_sums(attn, hidden[:2], ctx[:2], other[:2], mask[:2], None, True),
        layer_sums(attn, hidden[2:], ctx[2:], other[2:], mask[2:], None, True))]
    for a, b in zip(whole, shards):   # fp32 per-row sums, float64 accumulation: measured agreement ~1e-7 relative
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- the gate and the mask


def test_gate_is_identity_without_mask_rows_and_zeroes_hard_masked_rows():
    g = torch.Generator().manual_seed(2)
    key, value = torch.randn(2, 77, 8, generator=g), torch.randn(2, 77, 8, generator=g)
    gates = torch.rand(3, 8, generator=g)
    masks = torch.zeros(2, 3, 77)
    k, v = gate_kv(key, value, masks, gates, True)
    assert k is key and v is value                       # nothing masked: untouched objects
    masks[0, 1, 4:6] = 1.0
    k, v = gate_kv(key, value, masks, torch.ones(3, 8), True)
    assert torch.equal(k[0, 4:6], torch.zeros(2, 8)) and torch.equal(v[0, 4:6], torch.zeros(2, 8))   # hard gate
    rest = torch.ones(77, dtype=torch.bool)
    rest[4:6] = False
    assert torch.equal(k[0, rest], key[0, rest]) and torch.equal(k[1], key[1]) and torch.equal(v[1], value[1])   # row locality
    k, v = gate_kv(key, value, masks, gates, False)
    assert torch.equal(k, key) and not torch.equal(v, value)          # gate_keys false: V only


def test_concepts_compose_as_an_order_free_product():
    g = torch.Generator().manual_seed(3)
    key, value = torch.randn(1, 77, 8, generator=g), torch.randn(1, 77, 8, generator=g)
    gates, masks = torch.rand(2, 8, generator=g), torch.zeros(1, 2, 77)
    masks[0, 0, 1:3], masks[0, 1, 5:7] = 1.0, 0.7                     # disjoint masks
    both = gate_kv(key, value, masks, gates, True)
    swapped = gate_kv(key, value, masks.flip(1), gates.flip(0), True)
    torch.testing.assert_close(both, swapped, rtol=0, atol=0)
    alone0 = gate_kv(key, value, masks[:, :1], gates[:1], True)
    sequential = gate_kv(*alone0, masks[:, 1:], gates[1:], True)
    torch.testing.assert_close(both, sequential, rtol=1e-6, atol=1e-7)   # one fp32 rounding per product


def test_lexical_mask_finds_multi_token_concepts_and_gates_eos_only_when_a_content_token_fires(pipe):
    tok = pipe.tokenizer
    seq = ace.sequence_ids(tok, "Anne Hathaway")
    assert len(seq) >= 2
    d = pipe.text_encoder.config.hidden_size
    mask = TokenMask([seq], [0], torch.randn(1, d), torch.zeros(1), torch.ones(1), torch.zeros(1), gate_eos=True)
    texts = ["a photo of ANNE HATHAWAY", "a photo of a cat", "", "anne went home"]
    ids, lengths = ace.tokenize(tok, texts)
    m = mask(torch.randn(4, 77, d), ids, lengths)[:, 0]
    n = len(seq)
    assert torch.equal(m[0, 4 : 4 + n], torch.ones(n)) and float(m[0, 1:4].sum()) == 0     # found, case-insensitive
    eos = int(lengths[0]) - 1
    assert torch.equal(m[0, eos:], torch.ones(77 - eos))                                  # EOS + padding gated
    assert float(m[1:].abs().sum()) == 0 and float(m[:, 0].sum()) == 0                    # no concept; BOS never


def test_masks_are_per_row_in_mixed_and_cfg_batches(artifact, pipe):
    edit = ace.Gates({}, ace.mask_from_tensors(artifact.tensors, True), pipe.tokenizer, True)
    texts = ["", "", "a photo of Anne Hathaway", "a photo of a dog"]
    context = text_embeddings(pipe, texts)
    batch = edit.masks(context, texts)
    for i, t in enumerate(texts):
        torch.testing.assert_close(batch[i], edit.masks(context[i : i + 1], [t])[0], rtol=0, atol=0)
    assert float(batch[0].abs().sum()) == 0 and float(batch[2].amax()) == 1.0


# --------------------------------------------------------------------------- prompts


def test_adversarial_prompts_are_the_specified_variants():
    hp = Hparams(templates=("a photo of concept",), variant_rules=("surname", "first_name", "typo"), neutral="a person")
    (c,) = concept_prompts(["Tom Hanks"], hp, ["a photo of concept"])
    assert c.variants == ["Hanks", "Tom", "Tom Haks"]
    assert [(p.prompt, p.target) for p in c.erase] == [("a photo of Tom Hanks", "a photo of a person"), ("Tom Hanks", "a person")]
    assert ("a photo of Tom Haks", "a photo of a person") in [(p.prompt, p.target) for p in c.adversarial]
    assert len(c.adversarial) == 3 * 2
    hp = Hparams(variant_rules=("surname", "style"), synonyms={"nudity": ["naked", "Nudity", "nsfw"]}, neutral="art")
    a, b = concept_prompts(["Claude Monet", "nudity"], hp, ["concept"])
    assert a.variants == ["Monet", "Monet style"] and b.variants == ["nudity style", "naked", "nsfw"]
    with pytest.raises(ConfigError, match="synonyms"):
        concept_prompts(["a"], Hparams(synonyms={"b": ["x"]}), ["concept"])


def test_a_text_containing_the_replace_word_is_filled_in_once(pipe):
    """The artist task's retain words include "Renowned artist" (replace word "artist"): replacing the word and then
    its lower-case form in two passes would rewrite the inserted text ("Renowned Renowned artist")."""
    assert ace.fill("Image in the style of artist.", "artist", "Renowned artist") == "Image in the style of Renowned artist."
    assert ace.fill("Artist and artist", "Artist", "an artist") == "an artist and an artist"
    hp = Hparams(retain_words=("Renowned concept",), templates=("a photo of concept",))
    assert ace.retain_prompts(pipe, ["Anne Hathaway"], hp, ["a photo of concept"], None, "cpu") == [
        "a photo of Renowned concept", "Renowned concept"]


# --------------------------------------------------------------------------- erase, apply, artifacts


def test_erase_changes_only_gates_and_apply_restores_bit_for_bit(pipe, artifact):
    assert {k.split(".")[0] for k in artifact.tensors} == {"gate", "mask"}
    gates = [v for k, v in artifact.tensors.items() if k.startswith("gate.")]
    assert len(gates) == len(ace.attn2_modules(pipe.unet)) and all(bool(((g >= 0) & (g <= 1)).all()) for g in gates)
    assert artifact.metadata["ace"]["label"] == "ACE (cpebench reconstruction, spec v1)"
    processors = pipe.unet.attn_processors
    before = unet_out(pipe, ["a photo of Anne Hathaway", "a photo of a dog"])
    with ACE().apply(pipe, artifact):
        inside = unet_out(pipe, ["a photo of Anne Hathaway", "a photo of a dog"])
    after = unet_out(pipe, ["a photo of Anne Hathaway", "a photo of a dog"])
    assert torch.equal(before, after)
    assert all(pipe.unet.attn_processors[k] is p for k, p in processors.items())
    assert not torch.equal(inside[2], before[2])                        # the concept row is edited
    assert torch.equal(inside[:2], before[:2])                          # the "" CFG rows: m = 0, identical bits
    if not artifact.metadata["ace"]["mask_calibration"][0]["semantic"]:
        assert torch.equal(inside[3], before[3])                        # no concept token: identical bits


def test_erase_leaves_every_model_tensor_unchanged(tiny):
    pipe = tiny.pipe
    before = {f"{m}.{k}": v.clone() for m in ("unet", "vae", "text_encoder") for k, v in getattr(pipe, m).state_dict().items()}
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    ACE().erase(pipe, CONCEPT, {**HP, "steps": 1, "train_mask": True}, EraseContext(progress=False))
    after = {f"{m}.{k}": v for m in ("unet", "vae", "text_encoder") for k, v in getattr(pipe, m).state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags


def test_artifact_round_trip_gives_the_same_output(pipe, artifact, tmp_path):
    loaded = ACE().load_artifact(artifact.save(tmp_path / "ace"))
    assert loaded.sha256 == artifact.sha256
    with ACE().apply(pipe, artifact):
        a = unet_out(pipe, ["a photo of Anne Hathaway"])
    with ACE().apply(pipe, loaded):
        b = unet_out(pipe, ["a photo of Anne Hathaway"])
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- training


def trainer_for(pipe, lr):
    """A stage-2 trainer on hand-made data: gates 0.5, concept masks from the lexical tokens."""
    hp = Hparams(**{**{k: v for k, v in HP.items()}, "lr": lr, "semantic_mask": False})
    bank = ace.TextBank.of(pipe, ["a photo of Anne Hathaway", "a photo of a person", "a photo of a dog"], "cpu")
    seq = ace.sequence_ids(pipe.tokenizer, "Anne Hathaway")
    d = pipe.text_encoder.config.hidden_size
    mask = TokenMask([seq], [0], torch.randn(1, d), torch.zeros(1), torch.ones(1), torch.zeros(1), gate_eos=True)
    lat = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    data = ace.Stage2Data(bank, [bank.index(["a photo of Anne Hathaway"])], [bank.index(["a photo of a person"])],
                          [bank.index([])], [bank.index([])], bank.index(["a photo of a dog"]), lat, lat[0])
    gates = {n: torch.full((1, m.to_v.out_features), 0.5) for n, m in ace.attn2_modules(pipe.unet).items()}
    return ace.GateTrainer(pipe.unet, gates, mask, data, hp, ace.alphas_cumprod(pipe), "cpu")


def test_a_step_lowers_the_erase_loss_and_lr_zero_changes_nothing(pipe):
    from cpebench.attention import kv_edit

    with ace.frozen(pipe.unet):
        trainer = trainer_for(pipe, 5e-2)
        draw = trainer.draw()
        with kv_edit(pipe.unet, trainer.edit):
            before = float(trainer.losses_of(draw)[0].detach())
            for _ in range(3):   # the same draw: a descent step must lower its loss
                erase, keep = trainer.losses_of(draw)
                trainer.opts[0].zero_grad()
                (erase + keep).backward()
                trainer.opts[0].step()
                for p in trainer.params[0]:
                    p.data.clamp_(0, 1)
            after = float(trainer.losses_of(draw)[0].detach())
        assert after < before
        assert all(bool(((p >= 0) & (p <= 1)).all()) for p in trainer.params[0])
        still = trainer_for(pipe, 0.0)
        start = still.gates()
        with kv_edit(pipe.unet, still.edit):
            still.step()
        assert all(torch.equal(start[n], g) for n, g in still.gates().items())


def test_data_latents_are_the_vae_latents_of_the_generated_images(pipe):
    """Spec §3.3/§4.2: x_0 = "VAE latents of the generated images" by default: the sampled latent decoded to the
    8-bit image the engine outputs, encoded (posterior mean × scaling factor); ``vae_roundtrip: false`` keeps the
    sampled latent. Same batch, same operations: bit-identical (tolerance 0)."""
    assert Hparams().vae_roundtrip
    prompts = ["a photo of Anne Hathaway", "a photo of a dog"]
    sampled = ace.generate_latents(pipe, pipe.unet, prompts, Hparams(**{**HP, "vae_roundtrip": False}), 7, "cpu")
    default = ace.generate_latents(pipe, pipe.unet, prompts, Hparams(**HP), 7, "cpu")
    vae, sf = pipe.vae, pipe.vae.config.scaling_factor
    with torch.no_grad():
        image = vae.decode(sampled / sf, return_dict=False)[0]
        pixels = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)          # as the engine's images
        want = vae.encode(pixels.float() / 127.5 - 1).latent_dist.mean * sf
    assert torch.equal(default, want)
    assert not torch.equal(default, sampled)


TWO = ["Anne Hathaway", "Tom Hanks"]


def two_concept_stage2(pipe, concepts: list[int], hp: Hparams) -> ace.GateTrainer:
    """A stage-2 trainer on hand-made data for ``concepts`` (indices into TWO): the same stage-1 gates (concept 0:
    0.5, concept 1: 0.3), lexical masks (name and surname), prompts, latents and retain set whichever are erased."""
    prompts = {c: [f"a photo of {n}", f"{n} in the street"] for c, n in enumerate(TWO)}
    adversarial = {c: [f"a photo of {n.split()[-1]}"] for c, n in enumerate(TWO)}
    neutral = ["a photo of a person", "a person in the street"]
    retain = ["a photo of a dog", "a red car in the street"]
    bank = ace.TextBank.of(pipe, [p for c in concepts for p in prompts[c] + adversarial[c]] + neutral + retain, "cpu")
    seqs, owners = [], []
    for i, c in enumerate(concepts):
        for text in (TWO[c], TWO[c].split()[-1]):
            seqs.append(ace.sequence_ids(pipe.tokenizer, text))
            owners.append(i)
    d, k = pipe.text_encoder.config.hidden_size, len(concepts)
    mask = TokenMask(seqs, owners, torch.randn(k, d, generator=torch.Generator().manual_seed(1)), torch.zeros(k),
                     torch.ones(k), torch.zeros(k), gate_eos=True)
    lat = torch.randn(2, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))[concepts]
    data = ace.Stage2Data(bank, [bank.index(prompts[c]) for c in concepts], [bank.index(neutral) for _ in concepts],
                          [bank.index(adversarial[c]) for c in concepts], [bank.index(neutral[:1]) for _ in concepts],
                          bank.index(retain), lat, torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2)))
    gates = {n: torch.tensor([[0.5], [0.3]])[concepts].expand(-1, m.to_v.out_features).contiguous()
             for n, m in ace.attn2_modules(pipe.unet).items()}
    return ace.GateTrainer(pipe.unet, gates, mask, data, hp, ace.alphas_cumprod(pipe), "cpu")


def test_each_concept_of_a_joint_stage2_trains_exactly_as_alone(pipe):
    """Spec §5: every concept's gates are its own; the concepts of one erase take turns, each with its own Adam
    state, gradient clipping, generator (seeded ``seed``) and one-concept mask. So, from the same stage-1 gates,
    mask and data, erasing Anne Hathaway and Tom Hanks together gives each the gates of erasing it alone, bit for
    bit (measured difference 0: the same UNet batches in the same order; tolerance 0). A shared Adam moved a
    concept by momentum on the other's turns (≈ √C times its lone step). What a joint erase still shares, and this
    test fixes to equal values, is the data before stage 2: the retain set (the union of the concepts' nearest
    names, erased names left out), the retain images and the stage-1 noise. ``grad_clip`` 1e-4 is far below the
    measured per-step gradient norms (1.7e-3 .. 7.8e-3), so clipping acts on every step, per concept. Sensitivity,
    measured: one Adam over both concepts' gates (zero gradients on the other's turn, the old layout) differs from
    training alone by up to 0.165 in a gate here; the per-concept trainer by exactly 0."""
    from cpebench.attention import kv_edit

    hp = Hparams(**{**HP, "lr": 5e-2, "grad_clip": 1e-4, "erase_batch": 2, "adv_prob": 0.5, "semantic_mask": False})
    steps = 3

    def train(concepts):
        trainer = two_concept_stage2(pipe, concepts, hp)
        start = trainer.gates()
        with ace.frozen(pipe.unet), kv_edit(pipe.unet, trainer.edit):
            for _ in range(steps * len(concepts)):
                trainer.step()
        return start, trainer.gates()

    start, joint = train([0, 1])
    for c in (0, 1):
        _, alone = train([c])
        for n, g in joint.items():
            assert torch.equal(g[c : c + 1], alone[n]), (c, n)
        assert any(not torch.equal(g[c], start[n][c]) for n, g in joint.items())    # it trained


def test_training_resumes_from_the_workdir_with_identical_gates(pipe, tmp_path, kill_at):
    """Two concepts (their own Adam states and generators) and train_mask (τ, T in the state)."""
    hp = {**HP, "steps": 2, "save_every": 2, "train_mask": True}
    two = [Concept(n) for n in TWO]
    straight = ACE().erase(pipe, two, hp, EraseContext(progress=False))
    calls = kill_at(ace, "train_step", 3)
    with pytest.raises(KeyboardInterrupt):
        ACE().erase(pipe, two, hp, EraseContext(progress=False, workdir=tmp_path))
    assert (tmp_path / ace.STATE_FILE).exists() and (tmp_path / ace.DATA_FILE).exists()
    calls["restore"]()
    resumed = ACE().erase(pipe, two, hp, EraseContext(progress=False, workdir=tmp_path))
    assert resumed.sha256 == straight.sha256                # same seed, same gates: also the determinism check
    assert resumed.metadata["ace"]["stage2"] == straight.metadata["ace"]["stage2"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("hparams, error, needle", [
    ({"cf_mode": "exact"}, ConfigError, "cf_mode"),
    ({"variant_rules": ["nickname"]}, ConfigError, "variant_rules"),
    ({"train_out_bias": True}, ConfigError, "train_out_bias"),
    ({"adv_prob": 1.5}, ConfigError, "adv_prob"),
    ({"lr": -1}, ConfigError, "lr"),
    ({"stepz": 3}, ConfigError, "stepz"),
    ({"neutral": ["a", "b"]}, ConfigError, "neutral"),
    ({"templates": ["a photo of something"]}, DataError, "row 1"),
])
def test_bad_hparams_are_named(pipe, hparams, error, needle):
    with pytest.raises(error, match=needle):
        ACE().erase(pipe, CONCEPT, {**HP, **hparams}, EraseContext(progress=False))
