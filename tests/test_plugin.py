"""A third-party method is one package: its Method class, registered under the ``cpebench.methods`` entry
point, and its YAML shipped beside it (``Method.config_file``), used with no file in cpebench's tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = '''
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from cpebench.attention import swapped_weights
from cpebench.methods import Artifact, Method
from cpebench.methods.common import concept_names, kv_layers, parse_hparams


@dataclass(frozen=True)
class Hparams:
    factor: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Hparams":
        return parse_hparams(cls, d, "scale-v")

    def check(self, method: str) -> None:
        pass


class ScaleV(Method):
    name = "scale-v"
    hparams_class = Hparams
    config_file = "scale_v.yaml"

    def erase(self, pipe, concepts, hparams, ctx=None):
        names, hp = concept_names(self.name, concepts), self.hparams(hparams)
        tensors = {f"{n}.weight": lin.weight.detach().cpu() * hp.factor
                   for n, lin in kv_layers(pipe.unet, ("to_v",))}
        return Artifact(self.name, tensors, {"concepts": names, "factor": hp.factor})

    def apply(self, pipe, artifact):
        return swapped_weights(pipe.unet, artifact.tensors)
'''

YAML = '''
name: scale-v
description: "test plugin: scales every attn2.to_v"
source: "the plugin's own package"
hparams:
  factor: 0.5
'''


def make_plugin(root: Path) -> Path:
    site = root / "site"
    pkg = site / "scale_v_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (pkg / "scale_v.yaml").write_text(textwrap.dedent(YAML))
    dist = site / "scale_v_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: scale-v-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cpebench.methods]\nscale-v = scale_v_plugin:ScaleV\n")
    return site


def cli(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cpebench.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_plugin_package_with_its_own_yaml_runs_end_to_end(tmp_path):
    site = make_plugin(tmp_path)
    listed = cli(site, "ls", "methods")
    assert listed.returncode == 0, listed.stderr
    line = next(l for l in listed.stdout.splitlines() if l.startswith("scale-v"))
    assert "scales every attn2.to_v" in line and "the plugin's own package" in line
    out = tmp_path / "runs"
    run = cli(site, "-q", "run", "--method", "scale-v", "--task", "nudity", "--preset", "smoke", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    generation = json.loads((out / "scale-v-nudity-tiny-smoke" / "generation.json").read_text())
    assert generation["method"]["hparams"] == {"factor": 0.5}     # the plugin's YAML, not the class default 1.0
    artifact = json.loads((Path(generation["method"]["artifact_path"]) / "artifact.json").read_text())
    assert artifact["factor"] == 0.5 and artifact["method"] == "scale-v"
