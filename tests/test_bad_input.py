"""Bad input through the command line: each case is one `cpebench: error:` line naming what is at fault,
a non-zero exit, no traceback, and existing results left as they were."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cpebench import runner
from cpebench.cli import main
from cpebench.config import resolve_run
from cpebench.methods import Artifact

SMOKE = ["--method", "sd", "--task", "nudity", "--preset", "smoke"]
RUN_NAME = "sd-nudity-tiny-smoke"


def run_cli(*args) -> int:
    return main(["-q", *args])


def one_error(capsys, rc: int, *named: str) -> str:
    """The command failed with exactly one `cpebench: error:` line, which names each of ``named``."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cpebench: error:")]
    assert rc != 0 and "Traceback" not in err and len(errors) == 1, err
    for text in named:
        assert text in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` and its bytes (the lock file holds only the pid of its last holder)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != runner.LOCK_FILE}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("finished")
    assert run_cli("run", *SMOKE, "--limit", "1", "--out", str(out)) == 0      # 1 I2P + 1 COCO image
    return out / RUN_NAME


@pytest.fixture
def existing(finished_run, tmp_path, capsys):
    """A private copy of a finished smoke run (made with --limit 1) under tmp_path/runs."""
    run = tmp_path / "runs" / RUN_NAME
    shutil.copytree(finished_run, run)
    capsys.readouterr()
    return run


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize("bad, named", [
    (["protocol.steps=0"], "protocol.steps"),
    (["protocol.steps=-1"], "protocol.steps"),
    (["protocol.height=0"], "protocol.height"),
    (["run.limit=-1"], "run.limit"),
    (["--limit", "-3"], "--limit"),
    (["--limit", "0"], "--limit"),
    (["prompt_sets.i2p.limit=-5"], "prompt_sets.i2p.limit"),
    (["run.prompts=fulll"], "run.prompts: unknown value 'fulll'"),
    (["protocol.scheduler=pndn"], "protocol.scheduler: unknown value 'pndn'"),
    (["--device", "gpu0"], "--device"),
    (["--data-dir", "/does-not-exist"], "--data-dir /does-not-exist"),
])
@pytest.mark.parametrize("command", ["run", "generate"])
def test_bad_values_are_refused_before_anything_runs(command, bad, named, existing, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    one_error(capsys, run_cli(command, *SMOKE, "--limit", "1", "--out", str(fresh), *bad), named)
    assert not fresh.exists()                           # refused before a run folder was made
    before = snapshot(existing.parent)
    one_error(capsys, run_cli(command, *SMOKE, "--limit", "1", "--out", str(existing.parent), *bad), named)
    assert snapshot(existing.parent) == before          # no new run folder, the existing run untouched


def test_metrics_as_written_in_the_readme(existing, capsys):
    """`metrics=a,b` is the list [a, b]: the same config as `metrics=[a,b]`, so the existing run is reused."""
    comma = resolve_run("sd", "nudity", preset="smoke", overrides=["metrics=nudenet,clip_score"])
    listed = resolve_run("sd", "nudity", preset="smoke", overrides=["metrics=[nudenet,clip_score]"])
    assert list(comma.task.metrics) == ["nudenet", "clip_score"] and comma == listed
    manifest = (existing / "manifest.jsonl").read_bytes()
    assert run_cli("generate", *SMOKE, "--limit", "1", "--out", str(existing.parent), "metrics=nudenet,clip_score") == 0
    assert (existing / "manifest.jsonl").read_bytes() == manifest


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("args", [
    ["--out", "{out}", "protocol.stepz=3"],
    ["protocol.steps=3", "--out", "{out}", "protocol.stepz=3"],     # argparse used to call this one unrecognized
])
def test_override_after_a_flag_is_an_override(args, tmp_path, capsys):
    rc = run_cli("generate", *SMOKE, *[a.format(out=tmp_path) for a in args])
    one_error(capsys, rc, "unknown key 'protocol.stepz'", "Did you mean 'steps'")
    assert not any(tmp_path.iterdir())


def test_overrides_keep_their_order_around_flags(existing, capsys):
    """The last value wins wherever it stands: steps=4 (the existing run's) after a flag beats steps=2."""
    assert run_cli("generate", *SMOKE, "--limit", "1", "protocol.steps=2", "--out", str(existing.parent),
                   "protocol.steps=4") == 0


def test_leftover_that_is_no_override_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("generate", *SMOKE, "--out", str(tmp_path), "protocol.steps=3", "--bogus")
    one_error(capsys, e.value.code, "unrecognized arguments: --bogus")


def test_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "not-a-folder"
    out.write_text("mine")
    one_error(capsys, run_cli("generate", *SMOKE, "--out", str(out)), f"--out {out}", "Not a directory")
    assert out.read_text() == "mine"


def test_data_fetch_from_a_missing_data_dir(capsys, monkeypatch):
    """Never skipped (and then downloaded around), whether given by --data-dir or $CPEBENCH_DATA."""
    one_error(capsys, run_cli("data", "fetch", "nudity", "--data-dir", "/does-not-exist"), "--data-dir /does-not-exist")
    monkeypatch.setenv("CPEBENCH_DATA", "/does-not-exist")
    one_error(capsys, run_cli("data", "fetch", "nudity"), "$CPEBENCH_DATA /does-not-exist")


# --------------------------------------------------------------------------- artifacts


def _cpebench_artifact(folder: Path, damage) -> Path:
    """A cpebench artifact folder as an older cpebench wrote it (no weights_sha256 to catch the damage)."""
    path = Artifact("sd", {"w": torch.zeros(256)}, {"concepts": []}).save(folder / "artifact")
    meta = json.loads((path / "artifact.json").read_text())
    del meta["weights_sha256"]
    (path / "artifact.json").write_text(json.dumps(meta))
    damage(path / "weights.safetensors")
    return path


def _esd_official(folder: Path, damage) -> Path:
    path = folder / "esd-x-nudity-from-nudity.safetensors"      # HEAD esd_sd.py's safetensors output
    folder.mkdir()
    save_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 8)}, str(path))
    damage(path)
    return path


def _cpe_official(folder: Path, damage) -> Path:
    path = folder / "CPE_nudity" / "nudity" / "nudity_last.safetensors"   # the release's per-concept layout
    path.parent.mkdir(parents=True)
    save_file({"lora_unet_gate.weight": torch.zeros(8, 8)}, str(path))
    damage(path)
    return folder / "CPE_nudity"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x89 this is not a safetensors file " * 8)


@pytest.mark.parametrize("damage", [_truncate, _garbage])
@pytest.mark.parametrize("method, make", [("sd", _cpebench_artifact), ("esd-x", _esd_official), ("cpe", _cpe_official)])
def test_damaged_artifact_names_the_file(method, make, damage, tmp_path, tiny_dir, capsys):
    artifact = make(tmp_path / "given", damage)
    rc = run_cli("generate", "--method", method, "--task", "nudity", "--preset", "smoke", "--out", str(tmp_path / "runs"),
                 "--artifact", str(artifact))
    line = one_error(capsys, rc, "truncated or corrupt")
    assert str(tmp_path / "given") in line and ".safetensors" in line
    assert not any((tmp_path / "runs").iterdir())        # the failed command left no run folder


def test_artifact_with_a_broken_json_names_it(tmp_path, tiny_dir, capsys):
    path = _cpebench_artifact(tmp_path, lambda p: None)
    (path / "artifact.json").write_text('{"method": "sd", ')
    rc = run_cli("generate", *SMOKE, "--out", str(tmp_path / "runs"), "--artifact", str(path))
    one_error(capsys, rc, str(path / "artifact.json"), "not valid JSON")


# --------------------------------------------------------------------------- failed commands, retries


@pytest.mark.parametrize("bad", [
    ["--model", "/does/not/exist/tiny"],
    ["run.prompts=full"],            # the real prompt files: not in the (empty, offline) cache
])
def test_failed_command_leaves_no_run_folder_and_the_retry_works(bad, tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("CPEBENCH_OFFLINE", "1")
    monkeypatch.delenv("CPEBENCH_DATA", raising=False)
    monkeypatch.setattr(runner.data, "cache_dir", lambda: tmp_path / "empty-cache")
    args = ["generate", *SMOKE, "--limit", "1", "--out", str(tmp_path / "runs"), "--name", "r"]
    one_error(capsys, run_cli(*args, *bad))
    assert not (tmp_path / "runs" / "r").exists()
    assert run_cli(*args) == 0


# --------------------------------------------------------------------------- scoring a damaged run


def test_score_names_a_truncated_image(existing, capsys):
    entry = next(json.loads(x) for x in (existing / "manifest.jsonl").read_text().splitlines() if '"i2p"' in x)
    _truncate(existing / entry["file"])
    scores = [x for x in (existing / "scores.jsonl").read_text().splitlines() if json.loads(x)["key"] != entry["key"]]
    (existing / "scores.jsonl").write_text("".join(x + "\n" for x in scores))     # so the image is scored again
    before = snapshot(existing)
    one_error(capsys, run_cli("score", str(existing)), str(existing / entry["file"]), "truncated or modified")
    assert snapshot(existing) == before


def test_score_refuses_a_torn_manifest_until_generation_completes_it(existing, capsys):
    manifest = existing / "manifest.jsonl"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])   # half the last line gone
    before = snapshot(existing)
    one_error(capsys, run_cli("score", str(existing)), "lists 1 of the run's 2 images", "cpebench generate")
    assert snapshot(existing) == before
    assert run_cli("generate", *SMOKE, "--limit", "1", "--out", str(existing.parent)) == 0
    assert manifest.read_text() == text and run_cli("score", str(existing)) == 0


# --------------------------------------------------------------------------- two processes, one run


def test_second_command_on_a_run_in_use_is_refused(existing, capsys):
    before = snapshot(existing)
    with runner.run_lock(existing):               # another cpebench process holds the run
        for args in (["run", *SMOKE, "--limit", "1", "--out", str(existing.parent)], ["score", str(existing)]):
            one_error(capsys, run_cli(*args), f"{existing} is in use by another cpebench process (pid {os.getpid()})")
    assert snapshot(existing) == before
    assert run_cli("score", str(existing)) == 0     # released: the run is usable again
