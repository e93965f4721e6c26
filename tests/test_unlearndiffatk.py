"""UnlearnDiffAtk text_grad, batched: its pieces against independent recomputations, the ASR formula on
hand-made records, and the attack loop on the tiny model (batched = one prompt at a time)."""

from __future__ import annotations

import pytest
import torch

from attacks import unlearndiffatk as U


def bisection(u, tol=1e-5):
    """The official projection: bisection on the shift mu until |Σ clamp(u - mu, 0, 1) - 1| is small."""
    lo, hi = (u.min(-1, keepdim=True).values - 1), u.max(-1, keepdim=True).values
    for _ in range(100):
        mu = (lo + hi) / 2
        s = (u - mu).clamp(0, 1).sum(-1, keepdim=True)
        lo, hi = torch.where(s > 1, mu, lo), torch.where(s > 1, hi, mu)
    return (u - (lo + hi) / 2).clamp(0, 1)


def test_simplex_projection():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, 3, 1000, generator=g, dtype=torch.float64) * 0.05 + 1e-3
    p = U.project_simplex(u)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(4, 3, dtype=torch.float64))
    assert (p - bisection(u)).abs().max() < 1e-5                      # the official rule's tolerance
    assert torch.allclose(U.project_simplex(p), p)                     # a point on the simplex stays
    uniform = torch.full((2, 5), 0.2, dtype=torch.float64)
    assert torch.equal(U.project_simplex(uniform), uniform)


def test_prefix_layout_and_decode(tiny):
    tok = tiny.pipe.tokenizer
    ids = U.prefix_layout(tok, ["a red car", "a dog"], k=3)
    plain = tok(["a red car"], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    assert ids.shape == (2, 77) and ids[0, 0] == tok.bos_token_id
    assert torch.equal(ids[0, 4:7], plain[1:4]) and ids[0, 7] == tok.eos_token_id
    chosen = torch.tensor(tok(["cat hat sun"], add_special_tokens=False).input_ids[0])
    assert U.decode_attack(tok, chosen, ids[0], 3) == "cat hat sun a red car"
    assert U.prompt_lengths(tok, ["a red car"]) == [5]


def test_prefix_embeddings_equal_encoding_those_tokens(tiny):
    pipe = tiny.pipe
    tok, enc = pipe.tokenizer, pipe.text_encoder
    layout = U.prefix_layout(tok, ["a red car"], k=2)
    chosen = torch.tensor(tok(["blue star"], add_special_tokens=False).input_ids[0])
    with torch.no_grad():
        prefix = enc.get_input_embeddings().weight[chosen][None]
        got = U.encode_with_prefix(enc, layout, prefix, 2)
        direct = layout.clone()
        direct[0, 1:3] = chosen
        want = enc(direct)[0]
    assert torch.equal(got, want)


def test_straight_through_gradient_is_hardtanh_of_the_one_hot_gradient():
    g = torch.Generator().manual_seed(1)
    table = torch.randn(50, 8, generator=g, dtype=torch.float64)
    target = torch.randn(2, 3, 8, generator=g, dtype=torch.float64) * 5
    ids = torch.tensor([[1, 7, 3], [0, 49, 7]])
    u = torch.full((2, 3, 50), 0.02, dtype=torch.float64, requires_grad=True)
    ((U.StraightThrough.apply(u, ids, table) - target) ** 2).sum().backward()
    onehot = F_one_hot(ids, 50).requires_grad_(True)
    ((onehot @ table - target) ** 2).sum().backward()
    assert torch.equal(u.grad, torch.nn.functional.hardtanh(onehot.grad))
    assert (u.grad.abs() == 1).any()          # the clipping is exercised


def F_one_hot(ids, n):
    return torch.nn.functional.one_hot(ids, n).double()


def test_asr_formula_on_hand_made_records():
    # 5 prompts: #0 flagged plainly (its attack stops at entry 0), #1 broken at the 3rd evaluation,
    # #2 never broken, #3 skipped by the attack (too long) but flagged plainly, #4 attack crashed.
    no_attack = [True, False, False, True, False]
    attacked = [[True], [False, False, True], [False] * 51, None, None]
    r = U.asr(no_attack, attacked)
    assert r["pre_asr"] == 40.0 and r["post_asr"] == 60.0 and r["att"] == 1 and r["attacked"] == 3
    with pytest.raises(ValueError):
        U.asr([True], [])


SMALL = U.Settings(k=2, iterations=3, timesteps=(10, 30, 50), seed=7)


def run(pipe, rows, x0, succeed_at):
    """Attack with a fake judge: row i succeeds at evaluation succeed_at[i] (0 = the plain prompt)."""
    calls = {}

    def evaluate(texts, indices):
        out = []
        for i in indices:
            calls[i] = calls.get(i, 0) + 1
            out.append(calls[i] - 1 == succeed_at[i])
        return out

    return U.attack(pipe, rows, x0, evaluate, SMALL)


def test_attack_loop_stops_each_prompt_at_its_first_success(tiny, one_thread):
    pipe = tiny.pipe
    rows = [("a", "a red car"), ("b", "a dog on grass"), ("c", "a plain prompt"), ("d", " ".join(["word"] * 70))]
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = run(pipe, rows, x0, succeed_at={0: 0, 1: 2, 2: 99, 3: 0})
    a, b, c, d = states
    assert a.success and len(a.attempts) == 1 and a.attempts[0]["t"] is None       # pre-attack success
    assert b.success and [x["t"] for x in b.attempts] == [None, 10, 30] and b.found == b.attempts[-1]["text"]
    assert not c.success and [x["t"] for x in c.attempts] == [None, 10, 30, 50]   # every block, no success
    assert d.skipped and not d.attempts                                            # > 60 tokens: not attacked
    assert b.attempts[1]["text"].endswith("a dog on grass") and b.attempts[1]["text"] != "a dog on grass"
    assert all(x["loss"] > 0 for x in c.attempts[1:])


def test_batched_attack_equals_one_prompt_at_a_time(tiny, one_thread):
    pipe = tiny.pipe
    rows = [("b", "a dog on grass"), ("c", "a plain prompt")]
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    together = run(pipe, rows, x0, succeed_at={0: 99, 1: 99})
    alone = [run(pipe, [r], x0[i : i + 1], succeed_at={0: 99})[0] for i, r in enumerate(rows)]
    for s, t in zip(together, alone):
        assert [x["text"] for x in s.attempts] == [x["text"] for x in t.attempts]
        # the UNet at batch 2 vs 1: fp32 rounding only (measured <= 1.2e-7 relative, AVX2 and AVX-512, 1 thread;
        # 1e-4 leaves room for other kernels)
        for x, y in zip(s.attempts[1:], t.attempts[1:]):
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
