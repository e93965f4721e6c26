"""Ring-A-Bell (Tsai et al., ICLR 2024): a genetic search on the text encoder only, vectorised over prompts.

For a target prompt p and a concept vector v (77×768, in the SD v1.4 text encoder's ``last_hidden_state``
space; the released ``Nudity_vector.npy``), the target is T = E(p) + η·v and an individual is a token
sequence [SOT, L free ids in 1..49405, EOS × (76 − L)]; its fitness is Σ (T − E(individual))² over all
77×768 entries (lower is better). The official search (``InversePrompt.ipynb``), per generation:

1. score and sort ascending, keep the best ``population // 2`` (100);
2. unless it is the last generation, crossover: each kept parent stays and, with probability 0.5, is
   paired with a random kept parent at a random cut c ∈ 1..L, appending both children;
3. mutation: every member (parents too: no protected elite), with probability 0.25, gets one free
   position replaced by a random id in 1..49405.

The found prompt decodes the L free ids of the best individual. Here the populations of all target
prompts are scored in one text-encoder batch per generation, and a member whose tokens did not change
since it was scored (a kept, unmutated parent) keeps its fitness. The official search is unseeded; each
prompt here draws from its own numpy generator seeded from (seed, row id) (Δ). The output is the best
individual of one final scoring (the notebook takes the first of its sorted list after the last mutation;
``final: first`` does that).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

SOT, EOS, TOP_ID = 49406, 49407, 49405


@dataclass(frozen=True)
class Settings:
    """InversePrompt.ipynb: population 200, 3000 generations, mutation 0.25, crossover 0.5, L = 16
    (K16; K38 → 38, K77 → 75); η = 3 for nudity in the released files."""

    length: int = 16
    eta: float = 3.0
    population: int = 200
    generations: int = 3000
    mutation: float = 0.25
    crossover: float = 0.5
    seed: int = 0
    final: str = "rescored"          # rescored | first (the notebook's: first of the sorted list after mutation)


def rng_for(seed: int, row_id: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little"))


def individuals(free: np.ndarray) -> np.ndarray:
    """[N, L] free ids → [N, 77] token sequences (SOT, the ids, EOS padding)."""
    n, length = free.shape
    out = np.full((n, 77), EOS, dtype=np.int64)
    out[:, 0] = SOT
    out[:, 1 : 1 + length] = free
    return out


@torch.no_grad()
def embed(text_encoder, ids: np.ndarray, batch: int = 1024) -> torch.Tensor:
    device = text_encoder.device
    t = torch.from_numpy(ids)
    return torch.cat([text_encoder(t[i : i + batch].to(device))[0].float() for i in range(0, len(t), batch)])


def crossover(parents: np.ndarray, rng: np.random.Generator, rate: float) -> np.ndarray:
    """Each parent, then for those drawn (rate) the two children of a cut with a random partner."""
    n, length = parents.shape
    chosen = np.nonzero(rng.random(n) < rate)[0]
    partners = rng.integers(0, n, size=len(chosen))
    cuts = rng.integers(1, length + 1, size=len(chosen))
    cols = np.arange(length)
    first = parents[chosen].copy()
    second = parents[partners].copy()
    mask = cols[None, :] >= cuts[:, None]                # positions after the cut come from the other parent
    child_a = np.where(mask, second, first)
    child_b = np.where(mask, first, second)
    return np.concatenate([parents, child_a, child_b])


def mutate(pop: np.ndarray, rng: np.random.Generator, rate: float) -> np.ndarray:
    """Which members changed: one random free position each, for a share ``rate`` of the members."""
    n, length = pop.shape
    hit = np.nonzero(rng.random(n) < rate)[0]
    pop[hit, rng.integers(0, length, size=len(hit))] = rng.integers(1, TOP_ID + 1, size=len(hit))
    changed = np.zeros(n, dtype=bool)
    changed[hit] = True
    return changed


def search(text_encoder, tokenizer, rows: Sequence[tuple[str, str]], vector: torch.Tensor,
           settings: Settings = Settings(), *, progress: bool = False) -> list[dict]:
    """The found prompt of every (row id, prompt): {row_id, prompt, found, fitness}."""
    from tqdm.auto import tqdm

    s = settings
    if s.final not in ("rescored", "first"):
        raise ValueError(f"ringabell: final must be rescored or first, got {s.final!r}")
    ids = tokenizer([p for _, p in rows], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids.numpy()
    targets = embed(text_encoder, ids) + s.eta * vector.reshape(77, -1).float().to(text_encoder.device)
    rngs = [rng_for(s.seed, rid) for rid, _ in rows]
    pops = [rng.integers(1, TOP_ID + 1, size=(s.population, s.length)) for rng in rngs]   # torch draws in the notebook
    known = [np.full(len(p), np.nan) for p in pops]      # fitness of members unchanged since scored
    keep = s.population // 2
    for gen in tqdm(range(s.generations), desc="ring-a-bell", disable=not progress, leave=False):
        score_all(text_encoder, targets, pops, known)
        last = gen == s.generations - 1
        for i, rng in enumerate(rngs):
            order = np.argsort(known[i], kind="stable")[:keep]
            parents, fit = pops[i][order], known[i][order]
            if not last:
                pop = crossover(parents, rng, s.crossover)
                fit = np.concatenate([fit, np.full(len(pop) - len(parents), np.nan)])
            else:
                pop = parents
            changed = mutate(pop, rng, s.mutation)
            fit[changed] = np.nan
            pops[i], known[i] = pop, fit
    if s.final == "rescored":
        score_all(text_encoder, targets, pops, known)
    out = []
    for (rid, prompt), pop, fit in zip(rows, pops, known):
        best = int(np.nanargmin(fit)) if s.final == "rescored" else 0
        out.append({"row_id": rid, "prompt": prompt, "found": tokenizer.decode(pop[best].tolist()), "ids": pop[best].tolist(),
                    "fitness": float(fit[best]) if not np.isnan(fit[best]) else None})
    return out


def score_all(text_encoder, targets: torch.Tensor, pops: list, known: list) -> None:
    """Fitness of every member not scored since its tokens last changed: one batch for all prompts."""
    todo = [(i, np.nonzero(np.isnan(k))[0]) for i, k in enumerate(known)]
    ids = np.concatenate([individuals(pops[i][j]) for i, j in todo]) if todo else np.zeros((0, 77), np.int64)
    if not len(ids):
        return
    e = embed(text_encoder, ids)
    owner = torch.from_numpy(np.concatenate([np.full(len(j), i) for i, j in todo])).to(e.device)
    values = ((e - targets[owner]) ** 2).flatten(1).sum(1).double().cpu().numpy()
    at = 0
    for i, j in todo:
        known[i][j] = values[at : at + len(j)]
        at += len(j)
