"""The micro world's prompt sets, as rows in the format of a task YAML's inline ``rows:``.

Each micro task erases one concept of one kind and keeps the others of the same kind, as the real
tasks do:

=================  =========  ========  ====================================================
task               kind       erased    mirrors
=================  =========  ========  ====================================================
micro-nudity       colour     red       nudity: an attribute a detector (the colour judge) flags
micro-celebrity    character  Zorbin    celebrity: erase one name, keep the other names
micro-artist       style      striped   artist: erase one style, keep the other styles
micro-objects      shape      cross     object erasure (Imagenette): erase one class
=================  =========  ========  ====================================================

Each task has a ``<task>_erased`` set (rows naming the erased concept) and a ``<task>_remained`` set
(rows naming each other concept of that kind), plus the shared ``micro_coco`` set: captions drawn from
the world's own caption distribution on the held-out split, for a quality check.

A row is ``{id, prompt, seed, concept, **stated}``: ``seed`` is the generation seed, ``concept`` the
concept the row is about (its set's split tells whether it was erased), and the ``stated`` attributes
(colour, shape, background, style, character: only those the prompt names) go to the record's
``extras``, so a judge can compare an image with what its prompt asked for. ``guidance`` is left to
the protocol. Every set is a pure function of its name and size.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import numpy as np

from ..data import PromptRecord, records_from_inline
from ..errors import CpebenchError
from . import world


@dataclass(frozen=True)
class MicroTask:
    kind: str        # colour | character | style | shape
    target: str      # the erased concept
    mirrors: str     # the real task it stands in for


TASKS: dict[str, MicroTask] = {
    "micro-nudity": MicroTask("colour", "red", "nudity"),
    "micro-celebrity": MicroTask("character", "Zorbin", "celebrity"),
    "micro-artist": MicroTask("style", "striped", "artist"),
    "micro-objects": MicroTask("shape", "cross", "objects"),
}

COCO_SET = "micro_coco"
N_PER_CONCEPT = 30           # rows per concept in an erased/remained set
N_COCO = 100

# The concepts of each kind; plain is no style, so it is neither erased nor remained.
_VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(world.COLOURS),
    "shape": world.SHAPES,
    "style": tuple(s for s in world.STYLES if s != "plain"),
    "character": tuple(world.CHARACTERS),
}


def set_names(task: str) -> tuple[str, ...]:
    if task not in TASKS:
        raise CpebenchError(f"micro world: unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    prefix = task.replace("-", "_")
    return f"{prefix}_erased", f"{prefix}_remained", COCO_SET


def split_of(set_name: str) -> str:
    return "coco" if set_name == COCO_SET else parse_set(set_name)[1]


def rows(set_name: str, n: int | None = None) -> list[dict]:
    """The set's rows; ``n`` rows per concept (``N_PER_CONCEPT``), or in all for ``micro_coco``."""
    rng = np.random.default_rng(zlib.crc32(set_name.encode()))
    if set_name == COCO_SET:
        return _coco_rows(rng, N_COCO if n is None else n)
    spec, split = parse_set(set_name)
    values = _VALUES[spec.kind]
    concepts = (spec.target,) if split == "erased" else tuple(v for v in values if v != spec.target)
    n = N_PER_CONCEPT if n is None else n
    out: list[dict] = []
    for concept in concepts:
        for scene, template in _scenes(spec.kind, concept, n, rng):
            out.append(_row(len(out), scene, template, rng, concept))
    return out


def sha256(set_name: str, n: int | None = None) -> str:
    """A digest of the set's rows, recorded with a run: it changes whenever the world's prompts do."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(rows(set_name, n), sort_keys=True).encode()).hexdigest()


def records(set_name: str, n: int | None = None) -> list[PromptRecord]:
    """The set parsed as the project parses a YAML's inline rows."""
    return records_from_inline(rows(set_name, n), split=split_of(set_name), source=f"micro world set {set_name}")


# --------------------------------------------------------------------------- internals


def parse_set(set_name: str) -> tuple[MicroTask, str]:
    """The task (kind, target) and split (erased | remained) of an erased/remained set's name."""
    for task, spec in TASKS.items():
        for split in ("erased", "remained"):
            if set_name == f"{task.replace('-', '_')}_{split}":
                return spec, split
    known = [s for t in TASKS for s in set_names(t)[:2]] + [COCO_SET]
    raise CpebenchError(f"micro world: unknown prompt set {set_name!r}; known sets: {', '.join(known)}")


def _scenes(kind: str, concept: str, n: int, rng: np.random.Generator):
    """n (scene, template) pairs about ``concept``: the other factors cycle in a shuffled order."""
    if kind == "character":
        combos = [world.character_scene(concept, b) for b in world.BACKGROUNDS]
    else:
        factors = {"colour": list(world.COLOURS), "shape": list(world.SHAPES),
                   "background": list(world.BACKGROUNDS), "style": ["plain"]}
        factors[kind] = [concept]
        combos = [world.Scene(*c) for c in itertools.product(*factors.values())]   # Scene's field order
    combos = [combos[i] for i in rng.permutation(len(combos))]
    templates = world.templates_for(combos[0])
    for j in range(n):
        yield combos[j % len(combos)], templates[j % len(templates)]


def _row(i: int, scene: world.Scene, template: str, rng: np.random.Generator, concept: str | None) -> dict:
    stated = {k: v for k, v in scene.labels().items() if "{" + k + "}" in template}
    return {"id": str(i), "prompt": world.caption(scene, template), "seed": int(rng.integers(2**31 - 1)),
            "concept": concept, **stated}


def _coco_rows(rng: np.random.Generator, n: int) -> list[dict]:
    seed = world.split_seed("heldout")
    out = []
    for i in range(n):
        draw = np.random.default_rng([seed, i])
        scene = world.sample_scene(draw)
        out.append(_row(i, scene, world.pick_template(draw, scene), rng, None))
    return out
