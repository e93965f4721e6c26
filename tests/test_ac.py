"""AC (baselines/ac.py) on the tiny model: the properties docs/methods/ac.md promises (only the named
tensors change, the BOS K/V gradient cut, the masked 4x loss, a zero model-based loss when
p = a, the prompt templates, the no-aug masks), plus artifacts, released-weight layouts, resumption and errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import baselines.ac as ac
from baselines.ac import AC, Batch, DetachBOS, Hparams, Target
from cpebench.attention import KVEdit, kv_edit
from cpebench.errors import ConfigError, DataError
from cpebench.methods import Artifact, Concept, EraseContext
from cpebench.models import text_embeddings

SMALL = dict(anchor_captions=["a photo of a person", "a person walking a dog"], n_anchor_images=4, anchor_steps=2,
             anchor_autocast="none", max_steps=2, batch_size=2, lr=1e-3)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def erase(pipe, hp=None, concepts=("Tom Hanks",), **ctx):
    return AC().erase(pipe, [Concept(c) for c in concepts], {**SMALL, **(hp or {})}, EraseContext(progress=False, **ctx))


@pytest.fixture(scope="module")
def trained(tiny):
    return erase(tiny.pipe, {"concept_type": "object", "anchor_word": "a person", "augment": True})


def unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    z = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample


def state(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


# --------------------------------------------------------------------------- what changes


@pytest.mark.parametrize("group, count", [("cross-attn", 32), ("attn", 160)])
def test_only_the_named_tensors_change(tiny, group, count):
    pipe = tiny.pipe
    before = state(pipe.unet)
    trainer, _ = AC().prepare(pipe, ["Tom Hanks"], Hparams.from_dict({**SMALL, "parameter_group": group}),
                              EraseContext(progress=False))
    try:
        assert len(trainer.names) == count
        trainer.step()
        during = state(pipe.unet)
    finally:
        trainer.close()
    named = set(trainer.names)
    changed = {k for k in before if not torch.equal(before[k], during[k])}
    assert changed == named             # every trained tensor moved (lr 1e-3), nothing else did
    after = state(pipe.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)    # close() restores the UNet bit for bit


def test_erase_returns_the_group_and_leaves_the_pipe(tiny, trained):
    assert set(trained.tensors) == set(ac.group_names(tiny.pipe.unet, "cross-attn"))
    assert all("attn2.to_k" in k or "attn2.to_v" in k for k in trained.tensors)
    assert trained.metadata["ac"]["anchors"]["needed"] <= 4


# --------------------------------------------------------------------------- the BOS gradient cut


class Capture(KVEdit):
    """Keeps the projections' raw K/V (installed outside DetachBOS, so it sees them before the cut)."""

    cacheable = False

    def __init__(self):
        self.kv = []

    def edit(self, layer, context, key, value):
        if key.requires_grad:
            key.retain_grad(), value.retain_grad()
            self.kv.append((key, value))
        return key, value


def test_bos_values_are_unchanged(tiny):
    plain = unet_out(tiny.pipe)
    with kv_edit(tiny.pipe.unet, DetachBOS()):
        cut = unet_out(tiny.pipe)
    assert torch.equal(plain, cut)


@pytest.mark.parametrize("bos_detach", [True, False])
def test_bos_kv_gradient_is_zero(tiny, bos_detach):
    pipe = tiny.pipe
    trainer, _ = AC().prepare(pipe, ["Tom Hanks"], Hparams.from_dict({**SMALL, "bos_detach": bos_detach}),
                              EraseContext(progress=False))
    capture = Capture()
    try:
        with kv_edit(pipe.unet, capture):
            trainer.loss(trainer.draw()).backward()
    finally:
        trainer.close()
    assert len(capture.kv) == 16      # the 16 attn2 layers of the one gradient pass
    for key, value in capture.kv:
        for t in (key, value):
            bos, rest = t.grad[:, 0].abs().max(), t.grad[:, 1:].abs().max()
            assert rest > 0
            assert (bos == 0) == bos_detach      # exactly zero with the cut, non-zero without


# --------------------------------------------------------------------------- the loss


def test_masked_loss_is_four_times_the_mean():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ones = torch.ones(3, 1, 8, 8)
    # float32 sums of 768 terms: agreement to ~1e-7 relative; 1e-6 leaves a 10x margin
    assert ac.masked_loss(pred, target, ones).item() == pytest.approx(4 * F.mse_loss(pred, target).item(), rel=1e-6)
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, 1:7, 1:7] = 1
    per = ((pred - target) ** 2 * mask).sum([1, 2, 3]) / 36
    assert ac.masked_loss(pred, target, mask).item() == pytest.approx(per.mean().item(), rel=1e-6)
    mask[0] = 0                # a paste too small to keep a latent pixel: that sample adds 0 (officially NaN)
    assert ac.masked_loss(pred, target, mask).item() == pytest.approx(per[1:].sum().item() / 3, rel=1e-6)


def test_model_based_loss_is_zero_when_p_equals_a(tiny):
    trainer, _ = AC().prepare(tiny.pipe, ["Tom Hanks"], Hparams.from_dict(SMALL), EraseContext(progress=False))
    try:
        b = trainer.draw()
        nonzero = trainer.loss(b).item()
        same = Batch(**{**b.__dict__, "prompts": list(b.anchors)})
        loss = trainer.loss(same)
        loss.backward()
        grads = [p.grad for p in trainer.params]
    finally:
        trainer.close()
    assert nonzero > 0
    # the same forward twice (with and without autograd) gives the same bits: exactly zero, no gradient
    assert loss.item() == 0.0
    assert all(g is None or not g.any() for g in grads)


def regulariser_mse(trainer, b: Batch) -> torch.Tensor:
    """MSE(ε_θ(z_t, a, t), ε) of the batch's regulariser samples, from a forward of those samples alone with
    diffusers' own calls (independently of ``Trainer.loss``)."""
    n, vae = b.n_abl, trainer.pipe.vae
    dist = vae.encode(b.pixels[n:]).latent_dist
    z0 = (dist.mean + dist.std * b.latent_noise[n:]) * vae.config.scaling_factor
    zt = trainer.ddpm.add_noise(z0, b.noise[n:], b.timesteps[n:])
    context = text_embeddings(trainer.pipe, b.prompts[n:])
    return F.mse_loss(trainer.unet(zt, b.timesteps[n:], encoder_hidden_states=context).sample, b.noise[n:])


def test_regularisers_add_their_weighted_terms(tiny):
    """CompVis: + 0.2 x the masked mean of the regulariser half (4x the element mean: the channels are summed);
    diffusers prior preservation: + 1.0 x the plain MSE of a second batch of the batch's size. The added term is
    (loss at the default weight) - (loss at weight 0) on one draw, against a separate forward of the regulariser
    samples (batch-size-dependent kernels and float32 sums: measured 2.2e-8 relative; bound 1e-6)."""
    for kind, weight, scale in (("compvis", 0.2, 4.0), ("diffusers", 1.0, 1.0)):
        hp = Hparams.from_dict({**SMALL, "regularization": kind, "batch_size": 2})
        assert hp.regulariser_weight() == weight
        trainer, _ = AC().prepare(tiny.pipe, ["Tom Hanks"], hp, EraseContext(progress=False))
        try:
            b = trainer.draw()
            assert b.n_abl == (1 if kind == "compvis" else 2) and len(b.prompts) == 2 * b.n_abl
            # the regulariser samples carry their anchor captions
            assert b.prompts[b.n_abl :] == [ac.anchor_text(trainer.per_image[i], hp) for i in b.images[b.n_abl :]]
            with torch.no_grad():
                total = trainer.loss(b).item()
                trainer.hp = dataclasses.replace(hp, reg_weight=0.0)
                ablation_only = trainer.loss(b).item()
                expected = weight * scale * regulariser_mse(trainer, b).item()
        finally:
            trainer.close()
        assert expected > 0 and total - ablation_only == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- prompts and images


def draws(fn, n=400):
    g = torch.Generator().manual_seed(0)
    return [fn(g) for _ in range(n)]


def test_style_templates():
    compvis = draws(lambda g: ac.style_prompt("a lake", "monet", "compvis", g))
    assert set(compvis) == {"a lake, in the style of monet", "monet inspired painting, a lake", "in monet's style, a lake",
                            "a lake, in the style of monet monet", "monet monet inspired painting, a lake",
                            "in monet monet's style, a lake"}
    diffusers = draws(lambda g: ac.style_prompt("a lake", "monet", "diffusers", g))
    assert set(diffusers) == {"a lake, in the style of monet", "in monet's style, a lake"}
    # 1/3 vs 2/3: 400 draws put the first template's share within ±0.08 (3.4 sigma)
    assert abs(diffusers.count("a lake, in the style of monet") / 400 - 1 / 3) < 0.08


def test_nudity_and_object_templates():
    assert set(draws(lambda g: ac.nudity_prompt("a man", "nudity, nsfw", g))) == {
        "nudity, nsfw, a man", "in nudity, nsfw style, a man", "a man, nudity, nsfw"}
    hp = Hparams.from_dict({"concept_type": "object", "anchor_word": "a person"})
    assert ac.object_prompt("A Person on A bench", Target("Tom Hanks", "a person"), "compvis") == "a person on a bench".replace(
        "a person", "Tom Hanks")
    assert ac.object_prompt("A Person on a bench", Target("Tom Hanks", "a person"), "diffusers") == "A Person on a bench"
    assert ac.object_prompt("a cat on a mat", Target("grumpy cat", "cat"), "diffusers") == "a grumpy cat on a mat"
    assert ac.object_prompt("anything", Target("New Orleans House Galaxy Case", "*"), "compvis") == "New Orleans House Galaxy Case"
    assert ac.parse_targets(["cat+grumpy cat", "Tom Hanks"], hp) == [Target("grumpy cat", "cat"), Target("Tom Hanks", "a person")]
    slot = Hparams.from_dict({"concept_type": "object"})
    assert ac.anchor_text("a photo of {}", slot) == "a photo of"
    assert ac.target_prompt("{} on a gray background", Target("Zorbin"), slot, torch.Generator()) == "zorbin on a gray background".replace(
        "zorbin", "Zorbin")


def test_object_check_compares_prompts_as_clip_reads_them(caplog):
    """The CompVis templates lower-case p; CLIP lower-cases every prompt, so a capitalised caption without the
    anchor word gives p = a as the text encoder sees it (no signal) and must count as unchanged."""
    hp = Hparams.from_dict({"concept_type": "object", "anchor_word": "a cat"})
    targets = ac.parse_targets(["Garfield"], hp)
    with pytest.raises(ConfigError, match="no anchor caption contains 'a cat'"):
        ac.check_object_targets(["A Photo of a Person", "A Person walking a dog"], targets, hp, "ac")
    with caplog.at_level("WARNING", logger="baselines.ac"):
        ac.check_object_targets(["A photo of a cat", "A Person walking a dog"], targets, hp, "ac")
    assert "1 of 2 anchor captions do not contain 'a cat'" in caplog.text


def test_captions_per_image_orders():
    assert ac.captions_per_image(["a", "b"], 4, "repeat", "ac") == ["a", "a", "b", "b"]
    assert ac.captions_per_image(["a", "b", "c"], 4, "cycle", "ac") == ["a", "b", "c", "a"]
    with pytest.raises(ConfigError, match="multiple"):
        ac.captions_per_image(["a", "b", "c"], 4, "repeat", "ac")


def test_noaug_masks_diffusers_border_compvis_none():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 64, 64)).float()
    x, m = ac.place(img, 64, 64, 8, "diffusers", g)
    assert torch.equal(x, img / 127.5 - 1) and m.shape == (1, 8, 8)
    assert m[:, 1:7, 1:7].all() and m.sum() == 36          # 6x6 of 8x8: the 1-latent-pixel border is dropped
    x, m = ac.place(img, 64, 64, 8, "compvis", g)
    assert torch.equal(x, img / 127.5 - 1) and m.all()


def test_augmentation_paste_and_crop():
    g = torch.Generator().manual_seed(1)
    img = torch.full((3, 64, 64), 255.0)
    x, m = ac.place(img, 32, 64, 8, "compvis", g)          # pasted: 32x32 of white in a zero canvas
    assert (x == 1).sum() == 3 * 32 * 32 and (x == 0).sum() == 3 * (64 * 64 - 32 * 32)
    assert m.sum() == 2 * 2                                   # the 4x4 latent box shrunk by one pixel per side
    x, m = ac.place(img, 80, 64, 8, "diffusers", g)          # cropped: all valid
    assert x.shape == (3, 64, 64) and m.all()
    assert ac.prefix(32, 64, g) in ac.FAR_PREFIXES and ac.prefix(80, 64, g) in ac.NEAR_PREFIXES and ac.prefix(64, 64, g) == ""


# --------------------------------------------------------------------------- anchors


def test_anchor_images_do_not_depend_on_the_batch(tiny):
    hp = Hparams.from_dict(SMALL)
    texts, seeds = ["a photo of a person", "a dog", "a bowl of fruit"], [1, 2, 3]
    together = ac.sample_anchors(tiny.pipe, texts, seeds, hp, "cpu")
    alone = torch.cat([ac.sample_anchors(tiny.pipe, [t], [s], hp, "cpu") for t, s in zip(texts, seeds)])
    assert together.shape == (3, 64, 64, 3) and together.dtype == torch.uint8
    # per-image generators: the same noise whatever the batch; batched convolutions may round differently,
    # which moves a pixel by at most one step after quantisation
    assert (together.int() - alone.int()).abs().max() <= 1
    assert not torch.equal(together[0], together[1])


def test_anchors_are_cached_and_reused(tiny, trained):
    again = erase(tiny.pipe, {"concept_type": "object", "anchor_word": "a person", "augment": True}, concepts=["Emma Watson"])
    record = again.metadata["ac"]["anchors"]
    assert record["generated"] == 0 and record["reused"] == record["needed"] > 0
    assert record["key"] == trained.metadata["ac"]["anchors"]["key"]


# --------------------------------------------------------------------------- artifacts


def test_artifact_round_trip_and_exact_restore(tiny, trained, tmp_path):
    pipe, method = tiny.pipe, AC()
    before, base = state(pipe.unet), unet_out(pipe)
    with method.apply(pipe, trained):
        edited = unet_out(pipe)
    assert not torch.equal(edited, base)
    assert all(torch.equal(before[k], v) for k, v in state(pipe.unet).items())
    loaded = method.load_artifact(trained.save(tmp_path / "a"))
    assert loaded.sha256 == trained.sha256
    with method.apply(pipe, loaded):
        assert torch.equal(unet_out(pipe), edited)
    assert torch.equal(unet_out(pipe), base)


def test_artifact_from_another_base_model_is_refused(tiny, trained):
    bad = Artifact("ac", dict(trained.tensors), {**trained.metadata, "base_checksum": [1.0, 1.0]})
    with pytest.raises(ConfigError, match="base model"):
        AC().apply(tiny.pipe, bad)


def test_resumed_training_gives_the_same_weights(tiny, tmp_path, kill_at):
    hp = {**SMALL, "max_steps": 4, "save_every": 1}
    whole = erase(tiny.pipe, hp, workdir=tmp_path / "a")
    calls = kill_at(ac, "train_step", 3)
    with pytest.raises(KeyboardInterrupt):
        erase(tiny.pipe, hp, workdir=tmp_path / "b")
    calls["restore"]()
    resumed = erase(tiny.pipe, hp, workdir=tmp_path / "b")
    assert set(resumed.tensors) == set(whole.tensors)
    assert all(torch.equal(resumed.tensors[k], whole.tensors[k]) for k in whole.tensors)
    assert resumed.metadata["ac"]["train"]["loss_last"] == whole.metadata["ac"]["train"]["loss_last"]


# --------------------------------------------------------------------------- released weights

# The CompVis-to-diffusers block map of docs/methods/ac.md, written out independently of ac.diffusers_name.
SPEC_BLOCKS = {**{f"input_blocks.{i}.1": f"down_blocks.{b}.attentions.{a}"
                  for i, b, a in zip((1, 2, 4, 5, 7, 8), (0, 0, 1, 1, 2, 2), (0, 1, 0, 1, 0, 1))},
               "middle_block.1": "mid_block.attentions.0",
               **{f"output_blocks.{i}.1": f"up_blocks.{b}.attentions.{a}"
                  for i, b, a in zip(range(3, 12), (1, 1, 1, 2, 2, 2, 3, 3, 3), (0, 1, 2) * 3)}}


def official_delta(unet):
    """The 32 K/V tensors of ``unet`` perturbed (what a released cross-attn delta holds), diffusers names."""
    return {n: p.detach().clone() + 0.01 for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n}


def test_compvis_delta_checkpoint_loads(tiny, tmp_path):
    delta = official_delta(tiny.pipe.unet)
    back = {d: c for c, d in SPEC_BLOCKS.items()}
    compvis = {}
    for name, t in delta.items():
        block = next(d for d in back if name.startswith(d + "."))
        compvis[f"model.diffusion_model.{back[block]}{name[len(block):]}"] = t
    assert len(compvis) == 32
    path = tmp_path / "delta_step_100.ckpt"
    torch.save({"state_dict": compvis}, path)
    art = AC().load_artifact(path)
    assert art.metadata["official_layout"] == "compvis" and art.metadata["parameter_group"] == "cross-attn"
    assert set(art.tensors) == set(delta) and all(torch.equal(art.tensors[k], delta[k]) for k in delta)
    with AC().apply(tiny.pipe, art):
        w = dict(tiny.pipe.unet.named_parameters())
        assert all(torch.equal(w[k], delta[k]) for k in delta)


def test_diffusers_delta_bin_loads(tiny, tmp_path):
    delta = official_delta(tiny.pipe.unet)
    (tmp_path / "run").mkdir()
    torch.save({"unet": delta}, tmp_path / "run" / "delta.bin")
    art = AC().load_artifact(tmp_path / "run")                # a folder holding delta.bin
    assert art.metadata["official_layout"] == "diffusers"
    assert all(torch.equal(art.tensors[k], delta[k]) for k in delta)


def test_bad_official_files(tmp_path):
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)}}, tmp_path / "x.ckpt")
    with pytest.raises(DataError, match="out.2.weight"):
        AC().load_artifact(tmp_path / "x.ckpt")
    torch.save({"state_dict": {"embed": torch.zeros(2, 768)}}, tmp_path / "e.ckpt")
    with pytest.raises(ConfigError, match="embedding"):
        AC().load_artifact(tmp_path / "e.ckpt")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.bin"):
        AC().load_artifact(tmp_path / "junk.bin")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad, needle", [
    ({"concept_type": "memorisation"}, "hparams.concept_type"),
    ({"parameter_group": "embedding"}, "hparams.parameter_group"),
    ({"loss": "frozen"}, "hparams.loss"),
    ({"regularization": "compvis", "batch_size": 3}, "batch_size must be even"),
    ({"max_steps": 0}, "hparams.max_steps"),
    ({"lr": 0}, "hparams.lr"),
    ({"anchor_stepz": 3}, "anchor_steps"),
])
def test_bad_hparams_are_named(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        AC().parse_hparams({**SMALL, **bad})


def test_object_type_needs_a_word_the_captions_contain(tiny):
    with pytest.raises(ConfigError, match="anchor_word"):
        erase(tiny.pipe, {"concept_type": "object"})
    with pytest.raises(ConfigError, match="no anchor caption contains 'a cat'"):
        erase(tiny.pipe, {"concept_type": "object", "anchor_word": "a cat"})
    with pytest.raises(ConfigError, match="slot"):
        erase(tiny.pipe, {"anchor_captions": ["a photo of {}"]})
