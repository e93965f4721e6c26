"""The K/V edit seam: identity edits change no bit, removal restores the pipeline bit for bit."""

import contextlib
import copy

import torch

from cpebench.attention import ContextEdit, KVEdit, KVEditProcessor, context_edit, kv_edit, swapped_weights


class Identity(KVEdit):
    def __init__(self):
        self.calls = 0

    def edit(self, layer, context, key, value):
        self.calls += 1
        return key, value


class ShiftValue(KVEdit):
    """A residual on V only: v + context @ W (a stand-in for CPE's gated residual). W is a fixed random
    matrix: a constant one would add only each token's feature mean, which the text encoder's final
    LayerNorm makes zero (the edit would then change the output by rounding alone)."""

    def __init__(self, scale=1.0):
        self.scale = scale
        self.layers = set()

    def edit(self, layer, context, key, value):
        self.layers.add(layer)
        w = torch.randn(context.shape[-1], value.shape[-1], generator=torch.Generator().manual_seed(0))
        return key, value + context @ (w.to(context.dtype) * (self.scale / context.shape[-1] ** 0.5))


def unet_out(pipe, ctx, steps=(999, 500)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(pipe.unet.dtype)
    with torch.no_grad():
        return [pipe.unet(x, t, encoder_hidden_states=ctx).sample for t in steps]


def context(pipe):
    ids = pipe.tokenizer(["a cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_identity_edit_changes_no_bit_and_runs_once_per_prompt(tiny):
    pipe = tiny.pipe
    ctx = context(pipe)
    ref = unet_out(pipe, ctx)
    ident = Identity()
    with kv_edit(pipe.unet, ident):
        procs = [p for k, p in pipe.unet.attn_processors.items() if k.endswith("attn2.processor")]
        assert len(procs) == 16 and all(isinstance(p, KVEditProcessor) for p in procs)
        out = unet_out(pipe, ctx)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    # Two denoising steps on the same context tensor: K/V computed once per layer (cached).
    assert ident.calls == 16


def test_edit_changes_output_and_removal_restores_bit_for_bit(tiny):
    pipe = tiny.pipe
    ctx = context(pipe)
    before_procs = pipe.unet.attn_processors
    ref = unet_out(pipe, ctx)
    edit = ShiftValue()
    with kv_edit(pipe.unet, edit):
        edited = unet_out(pipe, ctx)
    assert len(edit.layers) == 16 and all(l.endswith("attn2") for l in edit.layers)
    assert not torch.allclose(ref[0], edited[0])
    after = unet_out(pipe, ctx)
    assert all(torch.equal(a, b) for a, b in zip(ref, after))
    assert all(before_procs[k] is v for k, v in pipe.unet.attn_processors.items())


def test_removal_happens_even_on_error(tiny):
    pipe = tiny.pipe
    before = pipe.unet.attn_processors
    try:
        with kv_edit(pipe.unet, ShiftValue()):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(before[k] is v for k, v in pipe.unet.attn_processors.items())


def shifted(pipe, *scales):
    """The UNet's outputs under nested ShiftValue edits, one per scale."""
    with contextlib.ExitStack() as stack:
        for s in scales:
            stack.enter_context(kv_edit(pipe.unet, ShiftValue(s)))
        return unet_out(pipe, context(pipe))


def test_edits_nest_in_order(tiny):
    """v + c@W + c@2W equals v + c@3W up to fp32 rounding. The floor: the single edit's distance from the
    same computation in float64. Measured on AVX2/AVX-512, forced and not, 1 and 2 threads: the nested
    edits differ by 1.0-1.2x that floor (about 6e-7, where one edit moves the output by 0.7); margin 4x."""
    both, single = shifted(tiny.pipe, 1.0, 2.0), shifted(tiny.pipe, 3.0)
    exact = shifted(copy.deepcopy(tiny.pipe).to(torch.float64), 3.0)
    floor = max(float((a - b).abs().max()) for a, b in zip(single, exact))
    assert max(float((a - b).abs().max()) for a, b in zip(both, single)) <= 4 * floor


def test_cache_invalidated_by_new_context(tiny):
    pipe = tiny.pipe
    ident = Identity()
    with kv_edit(pipe.unet, ident):
        unet_out(pipe, context(pipe), steps=(999,))
        unet_out(pipe, context(pipe), steps=(999,))   # a new tensor: recomputed
    assert ident.calls == 32


def test_swapped_weights_restore_exact_tensors(tiny):
    unet = tiny.pipe.unet
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    param = dict(unet.named_parameters())[name]
    original = param.data
    snapshot = original.clone()
    ctx = context(tiny.pipe)
    ref = unet_out(tiny.pipe, ctx)
    with swapped_weights(unet, {name: torch.zeros_like(original)}):
        assert torch.count_nonzero(param) == 0
        changed = unet_out(tiny.pipe, ctx)
    assert param.data_ptr() == original.data_ptr() and torch.equal(param.data, snapshot)
    assert not torch.equal(ref[0], changed[0])
    assert all(torch.equal(a, b) for a, b in zip(ref, unet_out(tiny.pipe, ctx)))


def test_swapped_weights_rejects_bad_names_and_shapes(tiny):
    import pytest

    unet = tiny.pipe.unet
    with pytest.raises(KeyError, match="does not have"):
        with swapped_weights(unet, {"nope.weight": torch.zeros(1)}):
            pass
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    original = dict(unet.named_parameters())[name].data
    with pytest.raises(ValueError, match="shape"):
        with swapped_weights(unet, {name: torch.zeros(3, 3)}):
            pass
    assert dict(unet.named_parameters())[name].data_ptr() == original.data_ptr()


# --------------------------------------------------------------------------- the attention probe


def test_probe_records_attention_maps_and_restores_processors(tiny):
    from cpebench.attention import probed

    pipe = tiny.pipe
    ctx = context(pipe)
    before = pipe.unet.attn_processors
    ref = unet_out(pipe, ctx, steps=(999,))[0]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), probed(pipe.unet) as store:
        out = pipe.unet(x, 999, encoder_hidden_states=ctx).sample
    attn2 = [pipe.unet.get_submodule(k.removesuffix(".processor")) for k in before if k.endswith("attn2.processor")]
    assert len(store) == len(attn2) == 16
    for probs, attn in zip(store, attn2):
        assert probs.shape[0] == 2 * attn.heads and probs.shape[2] == 77
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]))   # softmax rows
    # The probe computes attention with explicit probabilities instead of SDPA: equal up to fp32 rounding,
    # bounded by 4x the plain output's own distance from float64 (measured ratio < 1 on AVX2 and AVX-512).
    exact = copy.deepcopy(pipe.unet).double()(x.double(), 999, encoder_hidden_states=ctx.double()).sample
    assert (out - ref).abs().max() <= 4 * (ref - exact).abs().max()
    assert all(before[k] is v for k, v in pipe.unet.attn_processors.items())


def test_probe_applies_its_kv_edit(tiny):
    from cpebench.attention import probed

    pipe = tiny.pipe
    ctx = context(pipe)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with probed(pipe.unet) as plain:
            pipe.unet(x, 999, encoder_hidden_states=ctx)
        edit = ShiftValue()
        with probed(pipe.unet, edit) as shifted:
            pipe.unet(x, 999, encoder_hidden_states=ctx)
    assert len(edit.layers) == 16
    # The shift is on V only: the first layer's map (its Q and K) is the same bits; the layers after it
    # see the shifted values through their inputs.
    assert torch.equal(plain[0], shifted[0]) and not torch.equal(plain[-1], shifted[-1])


# --------------------------------------------------------------------------- context edits of any module


class Recorder(ContextEdit):
    """Scales the outputs of ``modules`` by ``scale`` (1.0 = identity) and counts what it is asked."""

    def __init__(self, modules, scale=1.0, swap=None):
        self.modules, self.scale, self.swap = tuple(modules), scale, swap
        self.changes_context = swap is not None
        self.batches, self.steps, self.outputs = [], [], []

    def prepare(self, batch):
        self.batches.append(batch)

    def context(self, context, step):
        self.steps.append(step)
        return self.swap

    def output(self, name, module, inputs, output):
        self.outputs.append(name)
        return output * self.scale if self.scale != 1.0 else output


def some_modules(unet):
    names = [n for n, _ in unet.named_modules()]
    return [next(n for n in names if n.endswith("attn2.to_k")), next(n for n in names if n.endswith("ff.net.2")),
            next(n for n in names if n.endswith("attn1.to_out.0"))]


def no_hooks(module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def test_identity_context_edit_changes_no_bit_prepares_once_per_context(tiny):
    pipe = tiny.pipe
    ctx = context(pipe)
    ref = unet_out(pipe, ctx, steps=(999, 500, 1))
    edit = Recorder(some_modules(pipe.unet))
    with context_edit(pipe.unet, edit):
        out = unet_out(pipe, ctx, steps=(999, 500, 1))
        assert len(edit.batches) == 1 and edit.batches[0].context is ctx and edit.batches[0].prompts is None
        assert len(edit.outputs) == 3 * 3
        other = ctx.clone()
        unet_out(pipe, other, steps=(999,))
        assert len(edit.batches) == 2          # a new context tensor
        other.mul_(1.0)
        unet_out(pipe, other, steps=(999,))
        assert len(edit.batches) == 3          # the same tensor changed in place
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert no_hooks(pipe.unet) and not pipe.unet.__dict__["_cpebench_context_edits"]


def test_context_edit_changes_output_and_removal_restores_bit_for_bit(tiny):
    pipe = tiny.pipe
    ctx = context(pipe)
    ref = unet_out(pipe, ctx)
    with context_edit(pipe.unet, Recorder(some_modules(pipe.unet), scale=1.5)):
        edited = unet_out(pipe, ctx)
    assert not torch.allclose(ref[0], edited[0])
    assert all(torch.equal(a, b) for a, b in zip(ref, unet_out(pipe, ctx)))
    assert no_hooks(pipe.unet)
    try:
        with context_edit(pipe.unet, Recorder(some_modules(pipe.unet), scale=1.5)):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert no_hooks(pipe.unet)


def test_context_edit_rejects_unknown_modules(tiny):
    import pytest

    from cpebench.errors import ConfigError

    with pytest.raises(ConfigError, match="no module"):
        with context_edit(tiny.pipe.unet, Recorder(["down_blocks.9.nothing"])):
            pass
    assert no_hooks(tiny.pipe.unet)


def test_context_edit_nests_with_kv_edit(tiny):
    pipe = tiny.pipe
    ctx = context(pipe)
    ref = unet_out(pipe, ctx)
    with kv_edit(pipe.unet, ShiftValue()):
        kv_only = unet_out(pipe, ctx)
    with context_edit(pipe.unet, Recorder(some_modules(pipe.unet), scale=1.5)):
        hooks_only = unet_out(pipe, ctx)
        with kv_edit(pipe.unet, ShiftValue()):
            both = unet_out(pipe, ctx)
    assert not torch.allclose(both[0], kv_only[0]) and not torch.allclose(both[0], hooks_only[0])
    with context_edit(pipe.unet, Recorder(some_modules(pipe.unet))), kv_edit(pipe.unet, ShiftValue()):
        identity_hooks = unet_out(pipe, ctx)
    assert all(torch.equal(a, b) for a, b in zip(kv_only, identity_hooks))
    assert all(torch.equal(a, b) for a, b in zip(ref, unet_out(pipe, ctx)))


def test_context_swap_is_per_step_and_disables_fixed_kv(tiny):
    from cpebench.attention import fixed_cross_kv

    pipe = tiny.pipe
    ctx = context(pipe)
    swapped = ctx.flip(0).contiguous()         # the other prompt's embedding for each sample
    want = unet_out(pipe, swapped)
    edit = Recorder([], swap=swapped)
    with context_edit(pipe.unet, edit):
        with fixed_cross_kv(pipe.unet) as set_context:
            assert set_context is None          # K/V must follow the context of each step
        got = unet_out(pipe, ctx)
    assert edit.steps == [0, 1] and len(edit.batches) == 1
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_engine_announces_its_prompts_and_identity_edit_keeps_images(tiny):
    import numpy as np

    from cpebench.config import ProtocolConfig
    from cpebench.data import PromptRecord
    from cpebench.engine import Engine, plan_items

    pipe = tiny.pipe
    records = [PromptRecord(str(i), p, i, None, "test", None) for i, p in enumerate(["a cat", "a dog"])]
    items = plan_items("s", records, images_per_row=1, negative_prompt="blurry", default_guidance=7.5,
                       per_row_guidance=False)
    engine = Engine(pipe, ProtocolConfig(model="tiny", steps=3, height=64, width=64), batch_size=2, progress=False)
    ref = engine.denoise(items)[0]
    edit = Recorder(some_modules(pipe.unet))
    with context_edit(pipe.unet, edit):
        out = engine.denoise(items)[0]
    assert np.array_equal(ref, out)
    assert len(edit.batches) == 1
    batch = edit.batches[0]
    assert batch.prompts == ["a cat", "a dog"] and batch.negatives == ["blurry", "blurry"]
    assert batch.context.shape[0] == 4


def test_context_edit_on_a_compiled_unet_runs_its_hooks(tiny):
    """Compiled blocks were traced without the hooks: context_edit has them traced again (eager backend:
    same kernels, so the same bits as the uncompiled UNet), and without them again on exit."""
    from cpebench.engine import compile_model

    pipe = tiny.pipe
    ctx = context(pipe)
    ref = unet_out(pipe, ctx)
    with context_edit(pipe.unet, Recorder(some_modules(pipe.unet), scale=1.5)):
        want = unet_out(pipe, ctx)
    try:
        for how in ("regional", "full"):
            compile_model(pipe, how, backend="eager")
            assert all(torch.equal(a, b) for a, b in zip(ref, unet_out(pipe, ctx)))
            with context_edit(pipe.unet, Recorder(some_modules(pipe.unet), scale=1.5)):
                got = unet_out(pipe, ctx)
            assert all(torch.equal(a, b) for a, b in zip(want, got)), how
            assert all(torch.equal(a, b) for a, b in zip(ref, unet_out(pipe, ctx))), how
    finally:
        compile_model(pipe, "none")
