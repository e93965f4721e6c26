"""``sd``: the unedited base model (the "SD v1.4" row of every table)."""

from __future__ import annotations

from typing import Sequence

from . import Artifact, Concept, Method, NoEdit


class BaseModel(Method):
    name = "sd"
    version = "1"
    description = "Unedited Stable Diffusion (reference row)"
    trains = False

    def erase(self, pipe, concepts: Sequence[Concept], **hparams) -> Artifact:
        if hparams:
            raise TypeError(f"method 'sd' takes no hyperparameters, got {', '.join(hparams)}")
        return Artifact(method=self.name, metadata={"concepts": [c.name for c in concepts], "hparams": {}})

    def apply(self, pipe, artifact: Artifact):
        return NoEdit()
