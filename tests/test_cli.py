"""End to end through the CLI: the smoke run, each stage alone, resume after a kill, bad input."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cpebench.cli import main


def run_cli(*args) -> int:
    return main(["-q", *args])


@contextlib.contextmanager
def threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("runs")
    assert run_cli("run", "--method", "sd", "--task", "nudity", "--preset", "smoke", "--out", str(out)) == 0
    return out / "sd-nudity-tiny-smoke"


def test_smoke_run_produces_every_artifact(smoke_run, capsys):
    for name in ("config.yaml", "manifest.jsonl", "generation.json", "scores.jsonl", "summary.json"):
        assert (smoke_run / name).exists(), name
    manifest = [json.loads(l) for l in (smoke_run / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 6 and all((smoke_run / e["file"]).exists() for e in manifest)   # 4 I2P + 2 COCO
    scores = [json.loads(l) for l in (smoke_run / "scores.jsonl").read_text().splitlines()]
    assert sorted(s["key"] for s in scores if s["metric"] == "nudenet") == sorted(e["key"] for e in manifest if e["set"] == "i2p")
    assert sorted(s["key"] for s in scores if s["metric"] == "clip_score") == sorted(e["key"] for e in manifest if e["set"] == "coco")
    summary = json.loads((smoke_run / "summary.json").read_text())
    nn = summary["metrics"]["nudenet"]
    assert nn["n"] == 4 and set(nn["values"]) >= {"total", "rate", "female_breast"}
    card = summary["protocol_card"]
    assert card["model"]["id"] == "tiny" and card["sampler"]["steps"] == 4
    assert card["sampler"]["scheduler"]["class"] == "PNDMScheduler"
    assert card["sampler"]["dtype"] == card["sampler"]["vae_dtype"] == "fp32" and card["sampler"]["tf32"] is False
    assert card["engine"]["compile"] == "none" and card["engine"]["latents_dtype"] == "torch.float32"
    assert isinstance(card["engine"]["batch_size"], int) and card["engine"]["cross_attention_kv"] == "once per batch"
    assert card["detectors"]["nudenet"]["threshold"] == 0.6 and card["detectors"]["nudenet"]["version"] == "3.0.8"
    assert card["versions"]["torch"] and card["cpebench"]["version"]
    assert card["prompts"]["i2p"]["guidance"].startswith("per_row")
    # per-row guidance reached the manifest
    assert sorted({e["guidance"] for e in manifest if e["set"] == "i2p"}) == [5.0, 7.0, 9.0]
    assert {e["guidance"] for e in manifest if e["set"] == "coco"} == {7.5}
    cs = summary["metrics"]["clip_score"]
    assert cs["n"] == 2 and cs["info"]["id"] == "tiny" and "coco" in cs["values"]


def test_table_and_rescore(smoke_run, capsys, tmp_path):
    capsys.readouterr()
    assert run_cli("table", str(smoke_run.parent), "--format", "csv") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("method,model,preset,NudeNet total ↓")
    assert lines[1].startswith("sd,tiny,smoke,")
    # re-scoring reuses stored details: same summary values
    before = json.loads((smoke_run / "summary.json").read_text())["metrics"]
    assert run_cli("score", str(smoke_run)) == 0
    after = json.loads((smoke_run / "summary.json").read_text())["metrics"]
    assert before == after
    assert run_cli("table", str(smoke_run), "-o", str(tmp_path / "t.md")) == 0
    assert "| sd | tiny | smoke |" in (tmp_path / "t.md").read_text()


def test_changed_config_is_refused_then_forced(smoke_run, capsys):
    out = str(smoke_run.parent)
    capsys.readouterr()
    rc = run_cli("generate", "--method", "sd", "--task", "nudity", "--preset", "smoke", "--out", out, "protocol.steps=2")
    err = capsys.readouterr().err
    assert rc == 2 and "protocol.steps: 4 -> 2" in err and "--force" in err
    # an operational change (batch size) is not a different config
    assert run_cli("generate", "--method", "sd", "--task", "nudity", "--preset", "smoke", "--out", out,
                   "--batch-size", "3") == 0


def test_metric_option_change_rescores_only_that_metric(tmp_path, tiny_dir):
    args = ["run", "--method", "sd", "--task", "nudity", "--preset", "smoke", "--out", str(tmp_path), "--limit", "1"]
    assert run_cli(*args) == 0
    run = tmp_path / "sd-nudity-tiny-smoke"
    manifest = (run / "manifest.jsonl").read_text()

    def lines():
        return [json.loads(x) for x in (run / "scores.jsonl").read_text().splitlines()]

    first = lines()
    assert {x["metric"] for x in first} == {"nudenet", "clip_score"} and all(x["scorer"] for x in first)
    # a number-changing option: the images stay, nudenet is scored again, CLIP score is reused
    assert run_cli(*args, "metrics.nudenet.options.threshold=0.5") == 0
    assert (run / "manifest.jsonl").read_text() == manifest
    second = lines()
    assert len(second) == len(first) + 1              # one I2P image re-scored (the old line is compacted later)
    assert [x for x in second if x["metric"] == "clip_score"] == [x for x in first if x["metric"] == "clip_score"]
    new_nude = [x for x in second if x["metric"] == "nudenet"][-1]
    assert new_nude["scorer"] != [x for x in first if x["metric"] == "nudenet"][0]["scorer"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["protocol_card"]["detectors"]["nudenet"]["threshold"] == 0.5
    assert yaml.safe_load((run / "config.yaml").read_text())["task"]["metrics"]["nudenet"]["options"]["threshold"] == 0.5
    # an operational option (batch size) reuses everything; superseded lines are dropped
    assert run_cli(*args, "metrics.nudenet.options.threshold=0.5", "metrics.clip_score.options.batch_size=3") == 0
    third = lines()
    assert len(third) == len(first) and all(x in second for x in third)


def test_force_starts_anew(tmp_path, tiny_dir):
    args = ["generate", "--method", "sd", "--task", "nudity", "--preset", "smoke", "--out", str(tmp_path)]
    assert run_cli(*args, "--limit", "1") == 0
    assert run_cli(*args, "--limit", "2", "--force") == 0
    manifest = (tmp_path / "sd-nudity-tiny-smoke" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 4          # 2 I2P + 2 COCO rows; the earlier 1 + 1 are gone


@pytest.mark.parametrize("args, expected", [
    (["run", "--method", "sdd", "--task", "nudity"],
     "Unknown method 'sdd'. Known: ac, ace, advunlearn, cpe, esd-u, esd-x, fmn, gloce, mace, rece, safree, sd, speed, spm, uce"),
    (["run", "--method", "sd", "--task", "nudty"], "Did you mean 'nudity'"),
    (["run", "--method", "sd", "--task", "nudity", "--preset", "smok"], "Did you mean 'smoke'"),
    (["run", "--method", "sd", "--task", "nudity", "--preset", "smoke", "metrics=nudnet"], "Did you mean 'nudenet'"),
    (["run", "--method", "sd", "--task", "nudity", "--preset", "smoke", "protocol.stpes=3"], "Did you mean 'steps'"),
    (["run", "--method", "sd", "--task", "nudity", "--preset", "smoke", "--sets", "i2q"], "no prompt set 'i2q'"),
])
def test_bad_names_get_one_clear_error(args, expected, capsys, tmp_path):
    capsys.readouterr()
    assert run_cli(*args, "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_full_size_run_on_cpu_is_refused_with_an_estimate(tmp_path, capsys, monkeypatch, tiny_dir):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    rc = run_cli("generate", "--method", "sd", "--task", "nudity", "--model", str(tiny_dir), "--out", str(tmp_path),
                 "prompt_sets.i2p.format=inline", "prompt_sets.i2p.rows=[{prompt: a, seed: 1}]", "metrics=nudenet")
    err = capsys.readouterr().err
    assert rc == 2 and "no GPU found" in err and "--preset smoke" in err and "--device cpu" in err
    assert "minutes" in err or "hours" in err


def test_data_fetch_from_local_dir(shared_data, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CPEBENCH_CACHE", str(tmp_path))
    capsys.readouterr()
    assert run_cli("data", "fetch", "nudity", "--data-dir", str(shared_data)) == 0
    out = capsys.readouterr().out.split()
    assert any(p.endswith("I2P_prompts_4703.csv") for p in out)


def test_data_fetch_offline_without_copy_fails_clearly(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CPEBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CPEBENCH_OFFLINE", "1")
    monkeypatch.delenv("CPEBENCH_DATA", raising=False)
    capsys.readouterr()
    assert run_cli("data", "fetch", "nudity") == 2
    assert "--data-dir" in capsys.readouterr().err


def test_real_prompt_file_run_with_limit(shared_data, tmp_path, tiny_dir):
    """The nudity task on the real I2P file (local copy), tiny model, 3 rows."""
    assert run_cli("run", "--method", "sd", "--task", "nudity", "--model", "tiny", "--device", "cpu",
                   "--data-dir", str(shared_data), "--limit", "3", "--out", str(tmp_path),
                   "protocol.steps=2", "protocol.height=64", "protocol.width=64", "metrics=nudenet") == 0
    summary = json.loads((tmp_path / "sd-nudity-tiny" / "summary.json").read_text())
    prompts = summary["protocol_card"]["prompts"]["i2p"]
    assert prompts["file"] == "prompts/I2P_prompts_4703.csv" and prompts["rows"] == 3
    assert prompts["sha256"].startswith("6c1821ae")
    manifest = [json.loads(l) for l in (tmp_path / "sd-nudity-tiny" / "manifest.jsonl").read_text().splitlines()]
    assert [e["row_id"] for e in manifest] == ["0", "1", "2"]


# --------------------------------------------------------------------------- kill and resume

KILL_TASK = """
include: [{proto}]
name: killtest
concepts: []
prompt_sets:
  s:
    format: inline
    rows: {rows}
metrics:
  nudenet: {{prompt_sets: [s]}}
"""


@pytest.mark.slow
def test_killed_run_resumes_to_identical_images(tmp_path, tiny_dir):
    proto = Path(__file__).resolve().parents[1] / "benchmarks" / "tasks" / "_protocol_v1.yaml"
    rows = [{"prompt": f"a painting of object {i}", "seed": 100 + i, "id": str(i)} for i in range(12)]
    task = tmp_path / "killtest.yaml"
    task.write_text(KILL_TASK.format(proto=proto, rows=json.dumps(rows)))
    common = ["generate", "--method", "sd", "--task", str(task), "--model", "tiny", "--device", "cpu",
              "--batch-size", "2", "protocol.steps=8", "protocol.height=64", "protocol.width=64"]
    # One thread in the killed process and in the in-process reference: bytes are the same for the same
    # batches and thread count (other thread counts may round differently on some CPUs).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cpebench.cli", "-q"]

    # Uninterrupted reference, in this process.
    with threads(1):
        assert run_cli(*common, "--out", str(tmp_path / "ref")) == 0

    # Killed after a few images, then resumed.
    run_dir = tmp_path / "killed" / "sd-killtest-tiny"
    proc = subprocess.Popen(cmd + common + ["--out", str(tmp_path / "killed")], env=env)
    manifest = run_dir / "manifest.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail("generation finished before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(manifest.read_text().splitlines())
    assert 3 <= n_before < 12, n_before
    subprocess.run(cmd + common + ["--out", str(tmp_path / "killed")], check=True, env=env, timeout=300)

    ref_dir = tmp_path / "ref" / "sd-killtest-tiny"
    ref = [json.loads(l) for l in (ref_dir / "manifest.jsonl").read_text().splitlines()]
    got = [json.loads(l) for l in manifest.read_text().splitlines()]
    assert [e["key"] for e in got] == [e["key"] for e in ref]            # every image exactly once, in order
    assert len({e["key"] for e in got}) == 12
    for a, b in zip(ref, got):
        assert a["sha256"] == b["sha256"]
        assert (ref_dir / a["file"]).read_bytes() == (run_dir / b["file"]).read_bytes()
    pngs = sorted(p.name for p in (run_dir / "images" / "s").iterdir())
    assert len(pngs) == 12 and not [p for p in pngs if p.startswith(".")]   # no temp files left behind


def test_erase_and_ls(capsys, tmp_path, tiny_dir):
    capsys.readouterr()
    assert run_cli("erase", "--method", "sd", "--task", "nudity", "--preset", "smoke", "--save", str(tmp_path / "a")) == 0
    assert "artifact sha256" in capsys.readouterr().out
    from cpebench.methods import Artifact

    art = Artifact.load(tmp_path / "a")
    assert art.method == "sd" and art.metadata["concepts"] == ["nudity", "naked", "erotic", "sexual"]
    for what, needle in [("methods", "sd"), ("tasks", "nudity"), ("metrics", "nudenet"), ("presets", "smoke"),
                         ("prompt-sets", "prompts/I2P_prompts_4703.csv")]:
        assert run_cli("ls", what) == 0
        assert needle in capsys.readouterr().out


@pytest.mark.slow
def test_torchrun_two_shards_match_single_process(tmp_path, tiny_dir):
    """Two processes (as accelerate/torchrun start them) write disjoint shards merged into one manifest,
    with the same bytes as the single-process smoke run."""
    args = ["run", "--method", "sd", "--task", "nudity", "--preset", "smoke"]
    with threads(1):                                            # torchrun's processes run one thread each
        assert run_cli(*args, "--out", str(tmp_path / "one")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cpebench.cli", "-q",
           *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # 6 images (4 I2P + 2 COCO) in batches of 2; shards take whole batches: rank 0 batches 0 and 2, rank 1 batch 1
    assert done.stderr.count("generated 4 images") == 1 and done.stderr.count("generated 2 images") == 1
    run_dir = tmp_path / "two" / "sd-nudity-tiny-smoke"
    got = [json.loads(l) for l in (run_dir / "manifest.jsonl").read_text().splitlines()]
    ref = [json.loads(l) for l in (tmp_path / "one" / "sd-nudity-tiny-smoke" / "manifest.jsonl").read_text().splitlines()]
    assert [(e["key"], e["sha256"]) for e in got] == [(e["key"], e["sha256"]) for e in ref]
    assert len((run_dir / "scores.jsonl").read_text().splitlines()) == 6   # scored once, by rank 0


def test_artist_concepts_come_from_the_erased_set(shared_data):
    from cpebench.config import resolve_run
    from cpebench.runner import task_concepts

    cfg = resolve_run("sd", "artist", flags={"run.data_dir": str(shared_data), "run.limit": 2})
    concepts = task_concepts(cfg)
    assert len(concepts) == 100 and concepts[0] == "Brent Heighton" and concepts[-1] == "Clemens Ascher"
    smoke = resolve_run("sd", "artist", preset="smoke")
    assert task_concepts(smoke) == ["Brent Heighton"]   # the smoke rows stand in for the file


def test_scoring_during_generation_matches_scoring_after(tmp_path, tiny_dir):
    """The background scorer writes every (metric, image) line while the images are generated; the
    final summary equals a run that scores only afterwards."""
    from cpebench import runner
    from cpebench.config import resolve_run

    cfg = resolve_run("sd", "nudity", preset="smoke", overrides=["run.batch_size=2"],
                      flags={"run.out": str(tmp_path / "a")})
    run_dir = runner.prepare_run_dir(cfg)
    scorer = runner.BackgroundScorer.for_run(run_dir, cfg)
    runner.generate(cfg, run_dir, progress=False, on_written=scorer)
    scorer.close()
    assert scorer.error is None
    entries = runner.read_manifest(run_dir)
    lines = [json.loads(x) for x in (run_dir / "scores.jsonl").read_text().splitlines()]
    for name, mcfg in cfg.task.metrics.items():
        wanted = {k for k, e in entries.items() if e["set"] in mcfg.prompt_sets}
        assert {x["key"] for x in lines if x["metric"] == name} == wanted, name
    during = runner.score(run_dir, cfg, progress=False)["metrics"]
    assert len((run_dir / "scores.jsonl").read_text().splitlines()) == len(lines)   # nothing scored twice

    args = ["run", "--method", "sd", "--task", "nudity", "--preset", "smoke", "--out", str(tmp_path / "b")]
    assert run_cli(*args, "run.overlap_scoring=false") == 0
    after = json.loads((tmp_path / "b" / "sd-nudity-tiny-smoke" / "summary.json").read_text())["metrics"]
    assert {k: v["values"] for k, v in during.items()} == {k: v["values"] for k, v in after.items()}


def test_background_scorer_drops_its_backlog_when_generation_fails(tmp_path):
    """An interrupted run does not wait for queued scoring; what was written stays valid."""
    import threading

    from cpebench import runner

    class Slow:
        calls = 0

        def score(self, images):
            Slow.calls += 1
            gate.wait(5)
            return [{"x": 1} for _ in images]

    gate = threading.Event()
    scorer = runner.BackgroundScorer(tmp_path, [("slow", Slow(), "id", None)])
    for i in range(3 * runner.SCORE_CHUNK):
        scorer({"key": f"s/{i}/0", "set": "s", "file": f"images/s/{i}_0.png"})
    time.sleep(0.5)                  # the first chunk is being scored
    closing = threading.Thread(target=scorer.close, kwargs={"finish": False})
    closing.start()                  # the interruption arrives while that chunk is still running
    time.sleep(0.2)
    gate.set()
    closing.join(10)
    assert not closing.is_alive() and Slow.calls == 1      # the other two chunks were dropped
    lines = (tmp_path / "scores.jsonl").read_text().splitlines()
    assert len(lines) % runner.SCORE_CHUNK == 0 and all(json.loads(x)["metric"] == "slow" for x in lines)


def _erase_path(capsys, *args) -> str:
    capsys.readouterr()
    assert run_cli("erase", *args) == 0
    out = capsys.readouterr().out
    return out.split("saved at ")[1].strip()


@pytest.mark.parametrize("method,same_value", [("uce", "hparams.lamb=5e-1"), ("esd-x", "hparams.lr=1e-5")])
def test_cache_key_is_the_parsed_erase_and_its_precision(capsys, tiny_dir, method, same_value):
    """An override equal to the YAML default (another spelling of the same number) reuses the cached
    artifact; the same erase in another precision does not."""
    args = ["--method", method, "--task", "nudity", "--preset", "smoke"]
    first = _erase_path(capsys, *args)
    assert _erase_path(capsys, *args, same_value) == first
    other = _erase_path(capsys, *args, "--dtype", "bf16")
    assert other != first
    from cpebench.methods import Artifact

    assert Artifact.load(other).metadata["precision"]["dtype"] == "bf16"
    assert Artifact.load(first).metadata["precision"] == {"dtype": "fp32", "vae_dtype": "fp32", "tf32": False}
