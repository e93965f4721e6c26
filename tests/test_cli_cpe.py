"""CPE through the command line on the tiny model. The smoke preset needs no data files; the task presets
read the real training files (the optional local data folder of conftest.py; those tests skip without it)."""

import json

from cpebench.cli import main
from cpebench.methods import Artifact, common, cpe

SHORT = ["hparams.stages=2", "hparams.iterations=3", "hparams.stage0_iterations_factor=1", "hparams.adv_iterations=2",
         "hparams.anchor_nearest=3", "hparams.anchor_batch=4", "hparams.adv_prompts=2"]


def run_cli(*args) -> int:
    return main(["-q", *args])


def test_run_trains_once_then_reuses_the_cached_artifact(tiny_dir, tmp_path, monkeypatch):
    assert run_cli("run", "--method", "cpe", "--task", "nudity", "--preset", "smoke", "--out", str(tmp_path)) == 0
    run = tmp_path / "cpe-nudity-tiny-smoke"
    gen = json.loads((run / "generation.json").read_text())
    assert gen["method"]["concepts"] == ["nudity", "naked", "erotic", "sexual"]
    art = Artifact.load(gen["method"]["artifact_path"])
    assert art.metadata["rank"] == 4 and art.metadata["gate_rank"] == 64          # the explicit config
    assert art.metadata["hparams"]["stages"] == 2                                   # the smoke preset's schedule
    assert art.tensors["gate.q"].shape == (4, 32, 64)
    assert json.loads((run / "summary.json").read_text())["metrics"]["nudenet"]["n"] == 4

    def no_training(*a, **k):
        raise AssertionError("the cached artifact should have been reused")

    monkeypatch.setattr(cpe, "train", no_training)
    assert run_cli("run", "--method", "cpe", "--task", "nudity", "--preset", "smoke", "--out", str(tmp_path),
                   "--name", "again") == 0
    again = json.loads((tmp_path / "again" / "generation.json").read_text())
    assert again["method"]["artifact_sha256"] == gen["method"]["artifact_sha256"]


def test_erase_any_concepts_with_a_task_preset(data_env, tiny_dir, tmp_path, capsys):
    assert run_cli("erase", "--method", "cpe", "--concepts", "Tom Hanks", "Emma Watson", "--preset", "celebrity",
                   "--model", "tiny", "--device", "cpu", "--save", str(tmp_path / "a"), *SHORT) == 0
    assert "2 concepts" in capsys.readouterr().out
    art = Artifact.load(tmp_path / "a")
    assert art.metadata["concepts"] == ["Tom Hanks", "Emma Watson"]
    words = art.metadata["anchor_words"]["Tom Hanks"]
    assert words[:3] == ["Stars", "Public figures", "Icons"] and len(words) == 100 + 3   # general + nearest
    assert not any("tom hanks" in w.lower() for w in words[100:])


def test_erase_with_a_task_takes_a_subset_of_its_concepts(data_env, tiny_dir, tmp_path, capsys):
    assert run_cli("erase", "--method", "cpe", "--task", "celebrity", "--concepts", "Tom Hank", "--model", "tiny") == 2
    err = capsys.readouterr().err
    assert "'Tom Hank' is not among the 50 concepts of task 'celebrity'" in err and "--preset celebrity" in err
    assert run_cli("erase", "--method", "cpe", "--task", "nudity", "--preset", "celebrity", "--concepts", "x") == 2
    assert "selects task 'celebrity'" in capsys.readouterr().err
    assert run_cli("erase", "--method", "cpe", "--concepts", "x") == 2
    assert "erase needs --task" in capsys.readouterr().err


def test_task_without_concepts_is_a_clear_error(tiny_dir, tmp_path, capsys):
    assert run_cli("erase", "--method", "cpe", "--task", "character", "--preset", "smoke") == 2
    assert "names no concepts to erase" in capsys.readouterr().err


def test_generate_with_the_official_checkpoints(tiny_dir, tmp_path, tiny):
    """The authors' release format, passed with --artifact, is applied by our engine."""
    import torch
    from safetensors.torch import save_file

    for n, concept in enumerate(["nudity", "naked"]):
        g = torch.Generator().manual_seed(n)
        tensors = {cpe.OFFICIAL_GATE_Q: torch.randn(1, 32, 4, generator=g) * 0.01,
                   cpe.OFFICIAL_GATE_K: torch.zeros(1, 32, 4), cpe.OFFICIAL_GATE_V: torch.randn(1, 32, 1, generator=g)}
        for name, lin in common.kv_layers(tiny.pipe.unet):
            key = cpe.official_key(name)
            tensors[key + ".lora_down.weight"] = torch.randn(1, 32, 1, generator=g)
            tensors[key + ".lora_up.weight"] = torch.randn(1, 1, lin.out_features, generator=g) * 0.1
            tensors[key + ".alpha"] = torch.tensor(1.0)
        path = tmp_path / "CPE_Explicit" / concept / f"singleton_onebyone_explicit_{concept}_last.safetensors"
        path.parent.mkdir(parents=True)
        save_file(tensors, str(path), metadata={"prompts": concept, "rank": "1", "alpha": "1.0"})
    out = tmp_path / "runs"
    assert run_cli("generate", "--method", "cpe", "--task", "nudity", "--preset", "smoke", "--out", str(out),
                   "--artifact", str(tmp_path / "CPE_Explicit"), "--name", "official") == 0
    assert run_cli("generate", "--method", "sd", "--task", "nudity", "--preset", "smoke", "--out", str(out),
                   "--name", "base") == 0
    gen = json.loads((out / "official" / "generation.json").read_text())
    assert gen["method"]["concepts"] == ["naked", "nudity"]      # one slot per checkpoint file, in path order
    official = sorted((out / "official" / "images").rglob("*.png"))
    base = sorted((out / "base" / "images").rglob("*.png"))
    assert len(official) == len(base) == 6          # 4 I2P + 2 COCO smoke rows
    assert any(a.read_bytes() != b.read_bytes() for a, b in zip(official, base))   # the residual changed images


def test_ls_shows_cpe_and_task_presets(capsys):
    assert run_cli("ls", "methods") == 0
    out = capsys.readouterr().out
    assert "cpe" in out and "Hyun1A/CPE@4d35d02" in out
    assert run_cli("ls", "presets") == 0
    out = capsys.readouterr().out
    assert all(p in out for p in ("celebrity", "artist", "nudity", "character", "smoke"))


def test_resuming_with_another_erased_model_is_refused(tiny_dir, tmp_path, capsys):
    """Images made with one artifact are never mixed with another's in a run directory."""
    args = ["generate", "--method", "cpe", "--task", "nudity", "--preset", "smoke", "--out", str(tmp_path), "--limit", "1"]
    assert run_cli(*args) == 0
    manifest = (tmp_path / "cpe-nudity-tiny-smoke" / "manifest.jsonl").read_text()
    assert '"artifact_sha256"' in manifest
    # the same config, but the cached artifact was replaced (e.g. retrained elsewhere): refused
    path = json.loads((tmp_path / "cpe-nudity-tiny-smoke" / "generation.json").read_text())["method"]["artifact_path"]
    art = Artifact.load(path)
    art.tensors["gate.v"] = art.tensors["gate.v"] + 1.0
    art.save(path)
    capsys.readouterr()
    assert run_cli(*args) == 2
    assert "made with another erased model" in capsys.readouterr().err
    assert run_cli(*args, "--force") == 0
