"""The engine settings the perf scripts compare (generate.py, fidelity.py), by name.

Ordered so that modes sharing a (dtype, vae dtype) are neighbours: one loaded pipeline serves them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    dtype: str                    # protocol.dtype: UNet and text encoder
    vae_dtype: str | None = None  # protocol.vae_dtype (None: dtype)
    tf32: bool = False            # protocol.tf32
    compile: str = "none"         # run.compile
    cuda_graphs: bool = False     # run.cuda_graphs (CUDA only)

    @property
    def weights(self) -> tuple[str, str | None]:
        return self.dtype, self.vae_dtype


MODES = {
    "fp32": Mode("fp32"),
    "tf32": Mode("fp32", tf32=True),
    "fp16": Mode("fp16"),
    "fp16-regional": Mode("fp16", compile="regional"),
    "fp16-regional-cudagraphs": Mode("fp16", compile="regional", cuda_graphs=True),
    "fp16-full": Mode("fp16", compile="full"),
    "fp16-vae32": Mode("fp16", "fp32"),
    "bf16": Mode("bf16"),
    "bf16-regional": Mode("bf16", compile="regional"),
}
