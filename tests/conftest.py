"""Shared fixtures: offline hub, a private cache, the tiny SD-1.x model saved once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine a spinning thread steals the
# core its partner needs (measured: a module with a CPU hog beside it, 24.6 s spinning, 14.4 s passive).
# Set before torch is imported, so that OpenMP reads it; it changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Every test sees one private cache (the tiny model is built into it once)."""
    cache = os.environ.get("CPEBENCH_TEST_CACHE") or str(tmp_path_factory.mktemp("cpebench-cache"))
    old = os.environ.get("CPEBENCH_CACHE")
    os.environ["CPEBENCH_CACHE"] = cache
    yield Path(cache)
    if old is None:
        os.environ.pop("CPEBENCH_CACHE", None)
    else:
        os.environ["CPEBENCH_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def _bf16_attention_works_on_this_cpu():
    """With ATEN_CPU_CAPABILITY forced below the hardware's (avx2 or default on a CPU with AMX), PyTorch's
    CPU flash attention still packs bf16 for AMX and fails ("pack_vnni2 is only supported when avx512 is
    supported"); a real AVX2 CPU never takes that path. Only then, and only for bf16 inputs, attention
    runs on the math backend: fp32 keeps the default path, so in-process and subprocess runs agree."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.zeros(1, 1, 77, 64, dtype=torch.bfloat16)   # a CLIP text-encoder shape (short ones take another path)
    try:
        F.scaled_dot_product_attention(q, q, q)
    except RuntimeError as e:
        if "pack_vnni2" not in str(e):
            raise
    else:
        yield
        return
    real = F.scaled_dot_product_attention

    def bf16_on_math(query, *args, **kwargs):
        if query.dtype != torch.bfloat16 or query.device.type != "cpu":
            return real(query, *args, **kwargs)
        with sdpa_kernel([SDPBackend.MATH]):
            return real(query, *args, **kwargs)

    F.scaled_dot_product_attention = bf16_on_math
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@pytest.fixture(scope="session")
def tiny_dir(_session_cache):
    from cpebench.models import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """The tiny pipeline loaded through the public loader (from_pretrained on the saved dir)."""
    from cpebench.models import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def one_thread():
    """The tiny UNet is launch-bound: on a shared 2-core machine one thread is several times faster
    than oversubscribed ones. Modules that train on it use this for all their tests."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture
def data_env(shared_data, monkeypatch):
    """The shared data files, also as $CPEBENCH_DATA (for code that finds them on its own)."""
    monkeypatch.setenv("CPEBENCH_DATA", str(shared_data))
    return shared_data


@pytest.fixture
def kill_at(monkeypatch):
    """``calls = kill_at(module, "train_step", 3)``: the 3rd call of ``module.train_step`` raises
    KeyboardInterrupt, as a kill mid-training would; ``calls["n"]`` counts every call (reset it to count a
    resumed run's), ``calls["at"] = None`` keeps counting without the kill, ``calls["restore"]()`` puts the
    real function back."""

    def arm(owner, name: str, at: int) -> dict:
        real, calls = getattr(owner, name), {"n": 0, "at": at}

        def dying(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["at"]:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, dying)
        calls["restore"] = lambda: monkeypatch.setattr(owner, name, real)
        return calls

    return arm
