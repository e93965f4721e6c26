"""``sd``: the unedited base model (the "SD v1.4" row of every table)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from . import Artifact, Concept, EraseContext, Method, NoEdit


class BaseModel(Method):
    name = "sd"
    version = "1"
    description = "Unedited Stable Diffusion (reference row)"
    trains = False

    def erase(self, pipe, concepts: Sequence[Concept], hparams: Mapping[str, Any] | None = None,
              ctx: EraseContext | None = None) -> Artifact:
        if hparams:
            raise ConfigError(f"method 'sd' takes no hyperparameters, got {', '.join(hparams)}")
        return Artifact(method=self.name, metadata={"concepts": [c.name for c in concepts], "hparams": {}})

    def apply(self, pipe, artifact: Artifact):
        return NoEdit()
