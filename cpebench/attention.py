"""The one seam every method uses to change the model, with an exact inverse.

* K/V edits (CPE's residual gates, LoRA-style deltas): a diffusers attention processor on the 16
  ``attn2`` layers computes ``key, value = edit(layer, context, to_k(context), to_v(context))``.
  ``kv_edit(unet, edit)`` installs it and restores the original processor objects on exit.
* Weight edits (UCE, ESD, RECE, MACE): ``swapped_weights(module, {name: tensor})`` swaps parameter
  storage and puts the original tensors back on exit, so removal is bit-exact and free.
* Attention maps (MACE's and FMN's losses): ``probed(unet, edit)`` records every attn2 layer's
  attention probabilities, optionally with a K/V edit, and restores the processors on exit.
* Edits of any other module driven by the prompt batch (SPM's membranes, SAFREE's embedding
  projection): ``context_edit(unet, edit)`` runs ``edit.prepare(context)`` once per prompt batch and
  ``edit.output`` as a forward hook on the modules it names; every hook is removed on exit.

Never monkey-patches ``forward``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError


class KVEdit:
    """Base class for cross-attention K/V edits.

    ``cacheable = True`` promises that ``edit`` is a pure function of the context (text embedding):
    the processor then computes K/V once per prompt batch and reuses them for every denoising step
    (the engine passes the same context tensor at every step)."""

    cacheable: bool = True

    def edit(self, layer: str, context: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def layer_name(processor_key: str) -> str:
    """'down_blocks.0...attn2.processor' -> 'down_blocks.0...attn2' (the Attention module's name)."""
    return processor_key.removesuffix(".processor")


class KVEditProcessor:
    """Cross-attention with edited K/V. Same operations, in the same order, as diffusers'
    AttnProcessor2_0 for SD-1.x cross-attention, so an identity edit changes no bit."""

    def __init__(self, layer: str, edits: Sequence[KVEdit]):
        self.layer = layer
        self.edits = list(edits)
        self._cached_context: torch.Tensor | None = None   # strong ref: identity check is safe
        self._cached_version = -1
        self._cached_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def key_value(self, attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cacheable = all(e.cacheable for e in self.edits)
        if cacheable and context is self._cached_context and context._version == self._cached_version:
            return self._cached_kv  # type: ignore[return-value]
        key, value = attn.to_k(context), attn.to_v(context)
        for e in self.edits:
            key, value = e.edit(self.layer, context, key, value)
        if cacheable:
            self._cached_context, self._cached_version, self._cached_kv = context, context._version, (key, value)
        return key, value

    def clear_cache(self) -> None:
        self._cached_context, self._cached_kv = None, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise RuntimeError(f"{self.layer}: KVEditProcessor is for cross-attention (attn2) layers only")
        check_sd1_cross_attention(attn, attention_mask, self.layer)
        key, value = self.key_value(attn, encoder_hidden_states)
        return attend(attn, hidden_states, key, value)


def check_sd1_cross_attention(attn, attention_mask, layer: str) -> None:
    if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross:
        raise NotImplementedError(f"{layer}: attention masks/norms are not used by SD-1.x cross-attention")
    if attn.residual_connection:
        raise NotImplementedError(f"{layer}: residual_connection is not used by SD-1.x cross-attention")


def attend(attn, hidden_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """SD-1.x cross-attention from given K/V: the operations of diffusers' AttnProcessor2_0, in its
    order, so K/V equal to ``to_k/to_v(context)`` give the same bits."""
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch_size = key.shape[0]
    query = attn.to_q(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    return out / attn.rescale_output_factor


class FixedKVProcessor:
    """Cross-attention on K/V computed once per prompt batch (see ``fixed_cross_kv``). The denoising
    loop then never recomputes ``to_k/to_v`` (nor a method's K/V edit, e.g. CPE's gate residual),
    and a compiled block sees the K/V as plain tensor inputs: no guard on a Python cache, no
    recompilation when the next batch brings new prompts."""

    def __init__(self, layer: str):
        self.layer = layer
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise RuntimeError(f"{self.layer}: FixedKVProcessor is for cross-attention (attn2) layers only")
        if self.key is None or self.key.shape[0] != encoder_hidden_states.shape[0]:
            raise RuntimeError(f"{self.layer}: K/V were not set for this batch (call the setter of fixed_cross_kv)")
        check_sd1_cross_attention(attn, attention_mask, self.layer)
        return attend(attn, hidden_states, self.key, self.value)


# Processors whose cross-attention K/V are a pure function of the context, computed as to_k/to_v.
_PLAIN_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


@contextmanager
def fixed_cross_kv(unet) -> Iterator[Callable[[torch.Tensor], None] | None]:
    """Install ``FixedKVProcessor`` on the 16 attn2 layers for the block; yields ``set_context(ctx)``,
    which computes every layer's K/V for ``ctx`` through the processor that was installed (plain
    projections, or a ``KVEditProcessor``'s edits). Yields None, changing nothing, when some attn2
    processor is not known to be a pure function of the context (a non-cacheable edit, a third
    party's processor): the caller then passes the context at every step as usual."""
    original = unet.attn_processors
    sources = {k: p for k, p in original.items() if k.endswith("attn2.processor")}
    fixable = all(type(p).__name__ in _PLAIN_PROCESSORS
                  or (isinstance(p, KVEditProcessor) and all(e.cacheable for e in p.edits)) for p in sources.values())
    fixable = fixable and not any(i.edit.changes_context for i in _registry(unet))
    if not fixable:
        yield None
        return
    # The same processor objects every time: a compiled block guards on them, so new ones would recompile.
    kept = unet.__dict__.setdefault("_cpebench_fixed_kv", {})
    fixed = {k: kept.setdefault(k, FixedKVProcessor(layer_name(k))) for k in sources}
    modules = {k: unet.get_submodule(layer_name(k)) for k in sources}

    @torch.no_grad()
    def set_context(context: torch.Tensor) -> None:
        for k, proc in fixed.items():
            attn, source = modules[k], sources[k]
            if isinstance(source, KVEditProcessor):
                proc.key, proc.value = source.key_value(attn, context)
                source.clear_cache()
            else:
                proc.key, proc.value = attn.to_k(context), attn.to_v(context)

    unet.set_attn_processor({k: fixed.get(k, p) for k, p in original.items()})
    try:
        yield set_context
    finally:
        for proc in fixed.values():
            proc.key = proc.value = None
        unet.set_attn_processor(original)


def cross_attention_processors(unet) -> dict:
    return {k: v for k, v in unet.attn_processors.items() if k.endswith("attn2.processor")}


@contextmanager
def kv_edit(unet, edit: KVEdit) -> Iterator[None]:
    """Apply ``edit`` to the 16 attn2 layers; on exit the original processors are restored.
    Edits nest: an inner ``kv_edit`` runs after the outer one's."""
    original = unet.attn_processors
    new = {}
    for key, proc in original.items():
        if key.endswith("attn2.processor"):
            previous = proc.edits if isinstance(proc, KVEditProcessor) else []
            new[key] = KVEditProcessor(layer_name(key), previous + [edit])
        else:
            new[key] = proc
    unet.set_attn_processor(new)
    try:
        yield
    finally:
        unet.set_attn_processor(original)


class AttentionProbe:
    """attn2 with explicit attention probabilities (diffusers' ``get_attention_scores``, not SDPA), each
    appended to ``store`` as [B·heads, N, 77], and an optional K/V edit. For training losses on
    attention maps; generation never uses it."""

    def __init__(self, layer: str, edit: KVEdit | None, store: list):
        self.layer, self.edit, self.store = layer, edit, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None or hidden_states.ndim != 3:
            raise RuntimeError(f"{self.layer}: the attention probe is for SD-1.x cross-attention only")
        ctx = encoder_hidden_states
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(ctx), attn.to_v(ctx)
        if self.edit is not None:
            k, v = self.edit.edit(self.layer, ctx, k, v)
        q, k, v = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), attn.head_to_batch_dim(v)
        probs = attn.get_attention_scores(q, k, None)
        self.store.append(probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


@contextmanager
def probed(unet, edit: KVEdit | None = None) -> Iterator[list]:
    """``AttentionProbe`` on every attn2 of ``unet``; yields the list the probabilities are appended to
    (in the UNet's call order). The original processor objects are back on exit."""
    original = unet.attn_processors
    store: list = []
    unet.set_attn_processor({k: (AttentionProbe(layer_name(k), edit, store) if k.endswith("attn2.processor") else p)
                             for k, p in original.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


# --------------------------------------------------------------------------- edits of any module, per prompt batch


@dataclass
class ContextBatch:
    """What a ``ContextEdit`` is prepared for: the UNet's text context and, when the engine announced
    the batch (``announce_batch``), its texts. With classifier-free guidance the context is
    ``[negatives; prompts]``: rows 0..B-1 are the negative prompts, rows B..2B-1 the prompts."""

    context: torch.Tensor
    prompts: list[str] | None = None
    negatives: list[str] | None = None


class ContextEdit:
    """Base class for edits of UNet modules driven by the prompt batch (SPM's membranes on every linear
    layer, SAFREE's projection of the text embeddings).

    ``prepare`` runs once per prompt batch (a new context tensor, or one changed in place), before the
    first denoising step; ``output`` is a forward hook on each module named in ``modules`` (it returns
    the module's new output); ``context`` may give the UNet other text embeddings at step ``step``
    (0-based UNet calls since ``prepare``), and then ``changes_context`` must be True, so that K/V are
    not fixed once per batch."""

    modules: tuple[str, ...] = ()
    changes_context: bool = False

    def prepare(self, batch: ContextBatch) -> None:
        pass

    def context(self, context: torch.Tensor, step: int) -> torch.Tensor:
        return context

    def output(self, name: str, module: torch.nn.Module, inputs: tuple, output):
        return output


class _Installed:
    """One installed ContextEdit: which context it was prepared for, and the steps since."""

    def __init__(self, edit: ContextEdit):
        self.edit = edit
        self.prepared_for: torch.Tensor | None = None   # strong ref: the identity check is safe
        self.version = -1
        self.step = 0

    def ensure(self, batch: ContextBatch) -> None:
        ctx = batch.context
        if ctx is not self.prepared_for or ctx._version != self.version:
            self.edit.prepare(batch)
            self.prepared_for, self.version, self.step = ctx, ctx._version, 0


def _registry(unet) -> list:
    return unet.__dict__.setdefault("_cpebench_context_edits", [])


def announce_batch(unet, context: torch.Tensor, prompts: Sequence[str], negatives: Sequence[str]) -> None:
    """The engine names the texts of the context it is about to denoise with (``[negatives; prompts]``):
    installed ContextEdits are prepared now, with the texts, before any K/V are computed from it."""
    batch = ContextBatch(context, list(prompts), list(negatives))
    unet.__dict__["_cpebench_announced"] = batch
    for installed in _registry(unet):
        installed.ensure(batch)


def _is_compiled(module) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


@contextmanager
def context_edit(unet, edit: ContextEdit) -> Iterator[None]:
    """Install ``edit`` on ``unet`` for the block: a forward pre-hook on the UNet prepares it once per
    context (and swaps the context when ``changes_context``), forward hooks on ``edit.modules`` change
    their outputs. Every hook is removed on exit; nothing else is touched, so K/V edits and weight
    edits compose with it. On a compiled UNet the compiled graphs are dropped and traced again with
    the hooks (dynamo's default skips guards on hooks, so the old graphs would silently run without
    them), and once more without them on exit."""
    named = dict(unet.named_modules())
    unknown = [m for m in edit.modules if m not in named]
    if unknown:
        raise ConfigError(f"{type(edit).__name__}: the UNet has no module(s) {', '.join(unknown[:5])}")
    installed = _Installed(edit)

    def pre_hook(module, args, kwargs):
        from_kwargs = "encoder_hidden_states" in kwargs
        context = kwargs["encoder_hidden_states"] if from_kwargs else args[2]
        announced = unet.__dict__.get("_cpebench_announced")
        installed.ensure(announced if announced is not None and announced.context is context else ContextBatch(context))
        if not edit.changes_context:
            return None
        new = edit.context(context, installed.step)
        installed.step += 1
        if from_kwargs:
            return args, {**kwargs, "encoder_hidden_states": new}
        return (*args[:2], new, *args[3:]), kwargs

    def output_hook(name):
        return lambda module, inputs, output: edit.output(name, module, inputs, output)

    handles = []
    with _retraced(_is_compiled(unet)):
        try:
            handles.append(unet.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles += [named[m].register_forward_hook(output_hook(m)) for m in edit.modules]
            _registry(unet).append(installed)
            yield
        finally:
            for h in handles:
                h.remove()
            if installed in _registry(unet):
                _registry(unet).remove(installed)
            unet.__dict__.pop("_cpebench_announced", None)


@contextmanager
def _retraced(compiled: bool) -> Iterator[None]:
    """Compiled code traced with the hooks of this block, guarded on them; traced afresh after it."""
    if not compiled:
        yield
        return
    import torch._dynamo

    skip = torch._dynamo.config.skip_nnmodule_hook_guards
    torch._dynamo.reset()
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    try:
        yield
    finally:
        torch._dynamo.reset()
        torch._dynamo.config.skip_nnmodule_hook_guards = skip


@contextmanager
def swapped_weights(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Replace named parameters/buffers of ``module`` (e.g. 'down_blocks.0...attn2.to_k.weight') for
    the duration of the block. The originals are put back as the same tensor objects (bit-exact)."""
    named = dict(module.named_parameters())
    named.update(dict(module.named_buffers()))
    unknown = [n for n in tensors if n not in named]
    if unknown:
        raise KeyError(f"edit names tensors the model does not have: {', '.join(unknown[:5])}")
    saved = {}
    try:
        for name, new in tensors.items():
            target = named[name]
            if tuple(new.shape) != tuple(target.shape):
                raise ValueError(f"{name}: edit has shape {tuple(new.shape)}, model has {tuple(target.shape)}")
            saved[name] = target.data
            # Own, aligned storage in the target's dtype, device and memory format (channels-last
            # convolutions stay channels-last): same kernels, same bits.
            target.data = torch.empty_like(target.data).copy_(new)
        yield
    finally:
        for name, data in saved.items():
            named[name].data = data
