"""Ring-A-Bell's genetic search: its operators on hand-checkable arrays, the fitness against an independent
recomputation, reuse of known fitness = rescoring everything, and batched prompts = one at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks import ringabell as R

SMALL = R.Settings(length=4, population=8, generations=4, seed=3)


def test_crossover_children_are_cut_and_swapped():
    rng = np.random.default_rng(0)
    parents = np.arange(40).reshape(10, 4) + 100
    pop = R.crossover(parents, np.random.default_rng(0), 0.5)
    chosen = np.nonzero(rng.random(10) < 0.5)[0]
    partners, cuts = rng.integers(0, 10, size=len(chosen)), rng.integers(1, 5, size=len(chosen))
    assert pop.shape == (10 + 2 * len(chosen), 4) and np.array_equal(pop[:10], parents)
    for j, (c, q, cut) in enumerate(zip(chosen, partners, cuts)):
        a, b = pop[10 + j], pop[10 + len(chosen) + j]
        assert np.array_equal(a, np.r_[parents[c, :cut], parents[q, cut:]])
        assert np.array_equal(b, np.r_[parents[q, :cut], parents[c, cut:]])


def test_mutation_changes_one_free_position_of_the_drawn_members():
    pop = np.ones((1000, 6), dtype=np.int64)
    before = pop.copy()
    changed = R.mutate(pop, np.random.default_rng(1), 0.25)
    diff = (pop != before).sum(1)
    assert set(diff[changed]) <= {0, 1} and (diff[~changed] == 0).all()     # 0: redrew id 1 (rare)
    assert 200 < changed.sum() < 300 and pop.min() >= 1 and pop.max() <= R.TOP_ID


def reference_fitness(enc, tok, prompt, vector, eta, free):
    with torch.no_grad():
        target = enc(tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0][0]
        e = enc(torch.from_numpy(R.individuals(free[None])))[0][0]
    return float(((target + eta * vector - e) ** 2).sum())


def test_search_finds_scored_prompts_and_reuse_equals_rescoring(tiny, monkeypatch):
    enc, tok = tiny.pipe.text_encoder, tiny.pipe.tokenizer
    vector = torch.randn(77, enc.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.1
    rows = [("0", "a photo of a nude figure"), ("1", "a person on a beach")]
    found = R.search(enc, tok, rows, vector, SMALL)
    again = R.search(enc, tok, rows, vector, SMALL)
    assert found == again                                              # seeded per row
    for f, (_, prompt) in zip(found, rows):
        want = reference_fitness(enc, tok, prompt, vector, SMALL.eta, np.array(f["ids"]))
        assert f["fitness"] == pytest.approx(want, rel=1e-5)     # batch-size rounding at most (measured equal)
        assert f["found"] == tok.decode(f["ids"]) and len(f["ids"]) == SMALL.length
    # reusing the fitness of unchanged members = rescoring every member every generation
    real = R.score_all
    monkeypatch.setattr(R, "score_all", lambda e, t, pops, known: [k.fill(np.nan) for k in known] and real(e, t, pops, known))
    assert R.search(enc, tok, rows, vector, SMALL) == found


def test_batched_prompts_equal_one_at_a_time(tiny):
    enc, tok = tiny.pipe.text_encoder, tiny.pipe.tokenizer
    vector = torch.randn(77, enc.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.1
    rows = [("7", "a red car"), ("8", "a statue"), ("9", "a woman swimming")]
    together = R.search(enc, tok, rows, vector, SMALL)
    alone = [R.search(enc, tok, [r], vector, SMALL)[0] for r in rows]
    assert [f["found"] for f in together] == [f["found"] for f in alone]
    # the text encoder at another batch size: fp32 rounding at most (measured equal on AVX2 and AVX-512;
    # 1e-5 allows other kernels)
    for a, b in zip(together, alone):
        assert a["fitness"] == pytest.approx(b["fitness"], rel=1e-5)


def test_bad_final_rule(tiny):
    with pytest.raises(ValueError, match="final"):
        R.search(tiny.pipe.text_encoder, tiny.pipe.tokenizer, [("0", "x")], torch.zeros(77, 32), R.Settings(final="best"))
