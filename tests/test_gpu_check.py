"""benchmarks/perf/gpu_check.py on its CPU paths: the output format, the skip without CUDA, the budget,
and that a corrupted fast path is reported as a failure (the check can fail)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

PERF = Path(__file__).resolve().parents[1] / "benchmarks" / "perf"
CUDA_ONLY = {"tf32", "auto-batch", "fp16-regional-cudagraphs"}
FIDELITY = {"pinned-async", "channels-last", "fp16-regional"}
CHECK_KEYS = {"name", "exercises", "status", "reason", "seconds", "budget_s", "over_budget", "numbers"}
MD_HEADERS = [
    "| check | exercises | status | s (budget) | Δpixel vs fp32: mean / worst image / max | bound | notes |",
    "| setting | batch | img/s | ratio | MFU | warm-up s |",
    "| method | run | figure | unit | speed-up | result diff | diff of |",
    "| metric | img/s | ratio |",
]


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(PERF))
    import gpu_check

    yield gpu_check
    sys.path.remove(str(PERF))


def cpu_run(gpu_check, out: Path, *more: str) -> tuple[int, dict, str]:
    rc = gpu_check.main(["--device", "cpu", "--model", "tiny", "--out", str(out), *more])
    strict = lambda c: pytest.fail(f"JSON holds {c}")  # noqa: E731 (NaN is not JSON)
    return rc, json.loads((out / "gpu_check.json").read_text(), parse_constant=strict), (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_every_cpu_path_runs_and_the_output_format_is_fixed(gpu_check, tmp_path, tiny_dir, one_thread):
    plan = [c.name for c in gpu_check.PLAN if c.name != "shard"]    # shard: the slow test below
    rc, report, md = cpu_run(gpu_check, tmp_path, "--checks", ",".join(plan))
    assert rc == 0
    assert set(report) == {"meta", "checks", "generation", "training", "scoring"}
    assert {"date", "device", "torch", "cuda", "driver", "git", "total_budget_s", "plan"} <= set(report["meta"])
    assert [c["name"] for c in report["checks"]] == plan
    for c in report["checks"]:
        assert set(c) == CHECK_KEYS
        if c["name"] in CUDA_ONLY:
            assert c["status"] == "skipped" and c["reason"], c
        else:
            assert c["status"] == "pass", c
    for c in (c for c in report["checks"] if c["name"] in FIDELITY):
        n = c["numbers"]   # each value beside its bound, measured in this run
        for k in ("pixel_mean", "pixel_worst_image", "pixel_max"):
            assert 0 <= n[k] <= n["bound"][k] and n["bound"][k] > 0
        assert n["bound_from"]
    assert [r["mode"].split()[0] for r in report["generation"]] == ["official", "diffusers", "cpebench", "cpebench"]
    assert all(set(r) == {"mode", "batch", "rate", "ratio", "mfu", "warmup_s"} and r["rate"] > 0
               for r in report["generation"])
    assert {r["method"] for r in report["training"]} == {"cpe", "esd-x", "mace"}
    assert all(set(r) == {"method", "run", "figure", "unit", "speedup", "diff", "diff_of"} for r in report["training"])
    assert {r["metric"] for r in report["scoring"]} >= {"nudenet", "clip_score"}
    assert all(set(r) == {"metric", "rate", "ratio"} for r in report["scoring"])
    lines = md.splitlines()
    for header in MD_HEADERS:
        assert header in lines
    assert sum(line.startswith("| pinned-async |") for line in lines) == 1


def test_a_corrupted_fast_path_fails(gpu_check, tmp_path, tiny_dir, one_thread, monkeypatch):
    """Noise on the compiled engine's images, and two images swapped on the channels_last engine's:
    both are outside the bound; the eager references are untouched."""
    from cpebench.engine import Engine

    finish = Engine.finish

    def corrupted(self, batch):
        arrays, flags, truncated = finish(self, batch)
        if self.compile != "none":
            noise = np.random.default_rng(0).integers(-8, 9, arrays.shape)
            arrays = np.clip(arrays.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        elif self.channels_last:
            arrays = arrays[::-1].copy()
        return arrays, flags, truncated

    monkeypatch.setattr(Engine, "finish", corrupted)
    rc, report, _ = cpu_run(gpu_check, tmp_path, "--checks", "references,channels-last,fp16-regional")
    status = {c["name"]: (c["status"], c["reason"]) for c in report["checks"]}
    assert rc == 1
    assert status["references"][0] == "pass"
    assert status["channels-last"][0] == "fail" and "outside the bound" in status["channels-last"][1]
    assert status["fp16-regional"][0] == "fail" and "outside the bound" in status["fp16-regional"][1]


def test_without_cuda_it_skips_in_one_line(gpu_check, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "no CUDA device: skipped\n"
    assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path)]) == 0
    assert not list(tmp_path.iterdir())


def test_no_check_starts_without_its_budget(gpu_check, tmp_path, tiny_dir):
    rc, report, md = cpu_run(gpu_check, tmp_path, "--total-budget", "0")
    assert rc == 0
    assert len(report["checks"]) == len(gpu_check.PLAN)
    for c in report["checks"]:
        assert c["status"] == "skipped" and not c["over_budget"]
        assert c["name"] in CUDA_ONLY or c["reason"].startswith("total budget spent"), c
    assert MD_HEADERS[0] in md.splitlines()


@pytest.mark.slow
def test_two_processes_give_the_single_process_images(gpu_check, tmp_path, tiny_dir, one_thread):
    rc, report, _ = cpu_run(gpu_check, tmp_path, "--checks", "references,shard")
    shard = report["checks"][1]
    assert rc == 0 and shard["status"] == "pass", shard
    assert shard["numbers"]["backend"] == "gloo" and shard["numbers"]["world"] == 2
    assert shard["numbers"]["nccl"].startswith("skipped")


@pytest.mark.slow
def test_the_wave2_plan_runs_on_the_cpu(gpu_check, tmp_path, tiny_dir, one_thread):
    """The second-wave methods' and the attack's checks (``--checks wave2``) end to end on the tiny model."""
    rc, report, md = cpu_run(gpu_check, tmp_path, "--checks", "wave2", "--total-budget", "2000")
    assert rc == 0 and [c["name"] for c in report["checks"]] == [c.name for c in gpu_check.WAVE2]
    assert all(c["status"] == "pass" for c in report["checks"]), report["checks"]
    assert {r["method"] for r in report["training"]} == {"fmn", "ac", "spm", "ace", "advunlearn", "speed", "gloce",
                                                        "unlearndiffatk"}
    assert all(set(r) == {"method", "run", "figure", "unit", "speedup", "diff", "diff_of"} and r["figure"] > 0
               for r in report["training"])
    safree = next(c for c in report["checks"] if c["name"] == "safree-overhead")["numbers"]
    assert set(safree["img_per_s"]) == {"sd", "safree"}
    assert "| method | run | figure | unit | speed-up | result diff | diff of |" in md.splitlines()
