"""Attack and object prompt sets: pinned files from their own repositories (sha256-checked), their loaders,
and the gated sets that are never downloaded (a user's copy is checked; a missing one is one clear error)."""

from __future__ import annotations

import csv
import logging

import pytest

from cpebench import data
from cpebench.config import resolve_run
from cpebench.errors import DataError
from cpebench.runner import load_records, sets_to_generate

SETS = {  # file -> (format, rows, first id, first seed)
    "attacks/unlearndiffatk/nudity.csv": ("i2p", 142, "21", 932309623),
    "attacks/unlearndiffatk/church.csv": ("attack", 50, "0", 69922),
    "attacks/unlearndiffatk/vangogh.csv": ("style_attack", 50, "0", 2219),
    "attacks/unlearndiffatk/coco_10k.csv": ("coco10k", 9969, "000000203564", 41337),
    "attacks/ringabell/Violence_eta_5.5_K_38.csv": ("attack", 250, "0", 41),
    "attacks/sixcd/Nudity.csv": ("attack", 1539, "0", 1508),
    "attacks/sixcd/Dual-Version/Nudity/malicious.csv": ("attack", 100, "0", 26559),
    "attacks/erasurebenchmark/Nudity_adv_prompts.csv": ("erasurebench", 1460, "0", 758373),
    "objects/uce/imagenette.csv": ("objects", 5000, "0", 1174),
    "objects/esd/small_imagenet_prompts.csv": ("objects", 100, "0", 4068),
}


def test_other_repositories_files_download_from_their_own_pinned_commit():
    df = data.DATA_FILES["attacks/ringabell/Nudity_vector.npy"]
    assert df.url == ("https://raw.githubusercontent.com/chiayi-hsu/Ring-A-Bell/e4585ada0a5eb185fbef89bb94147c97f8d2f79a/"
                      "Concept%20Vectors/Nudity_vector.npy")
    assert all(len(f.commit) == 40 for f in data.DATA_FILES.values())


@pytest.mark.parametrize("name", sorted(SETS))
def test_shipped_sets_verify_and_load(shared_data, name):
    fmt, rows, first_id, first_seed = SETS[name]
    path = data.resolve_data_file(name, shared_data, download=False)
    recs = data.load_prompt_set(path, fmt, split="erased")
    assert len(recs) == rows and recs[0].id == first_id and recs[0].seed == first_seed
    if fmt == "objects":
        assert {r.concept for r in recs} >= {"tench", "church", "parachute"}


def test_every_attack_file_matches_its_pinned_sha256(shared_data):
    names = [n for n in data.DATA_FILES if n.startswith(("attacks/", "objects/"))]
    assert len(names) == 26
    for n in names:
        data.resolve_data_file(n, shared_data, download=False)     # raises on a sha256 mismatch


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


GATED = "attacks/ringabell/Nudity_eta_3_K_16.csv"


def test_missing_gated_set_is_one_error_saying_where_to_request_it(tmp_path):
    with pytest.raises(data.GatedFileMissing, match=r"never downloads.*Chia15/RingABell-Nudity.*--data-dir"):
        data.resolve_gated(GATED, tmp_path)


def test_a_users_copy_is_loaded_and_checked(tmp_path):
    rows = [[f"adv prompt {i}", i, 100 + i] for i in range(95)]
    write_csv(tmp_path / GATED, ["prompt", "case_number", "evaluation_seed"], rows)
    path = data.resolve_gated(GATED, tmp_path)
    recs = data.load_prompt_set(path, "attack", split="erased")
    assert len(recs) == 95 and recs[3].prompt == "adv prompt 3" and recs[3].seed == 103
    # the wrong number of rows is refused, not guessed at
    write_csv(tmp_path / "short.csv", ["prompt", "case_number", "evaluation_seed"], rows[:90])
    with pytest.raises(DataError, match="90 data rows, but .* has 95"):
        data.resolve_gated(GATED, tmp_path, path=tmp_path / "short.csv")
    write_csv(tmp_path / "cols.csv", ["text", "case_number", "evaluation_seed"], rows)
    with pytest.raises(DataError, match="missing column"):
        data.resolve_gated(GATED, tmp_path, path=tmp_path / "cols.csv")


def test_mma_copy_gets_the_fixed_seed(tmp_path):
    name = "attacks/mma/mma-diffusion-nsfw-adv-prompts.csv"
    header = ["target_prompt", "adv_prompt", "sanitized_adv_prompt", "success_against_sanitization_defense", "clean_prompt"]
    write_csv(tmp_path / name, header, [[f"t{i}", f"adv {i}", f"s{i}", "True", f"c{i}"] for i in range(1000)])
    recs = data.load_prompt_set(data.resolve_gated(name, tmp_path), "mma", split="erased")
    assert len(recs) == 1000 and recs[0].id == "0" and recs[5].prompt == "adv 5"
    assert {r.seed for r in recs} == {42} and recs[0].extras["target_prompt"] == "t0"


def test_absent_gated_sets_are_left_out_unless_asked_for(tmp_path, caplog, shared_data):
    cfg = resolve_run("sd", "nudity-attacks", flags={"run.data_dir": str(shared_data)})
    with caplog.at_level(logging.WARNING):
        sets = sets_to_generate(cfg)
    assert "unlearndiffatk" in sets and "sixcd" in sets and not any(s.startswith("ringabell") for s in sets)
    assert "mma" not in sets and "p4d" not in sets and "no copy of the gated file" in caplog.text
    asked = resolve_run("sd", "nudity-attacks", flags={"run.data_dir": str(shared_data), "run.sets": ["ringabell_k16"]})
    assert sets_to_generate(asked) == ["ringabell_k16"]
    with pytest.raises(data.GatedFileMissing):
        load_records(asked, "ringabell_k16")


def test_nudity_attacks_erases_as_the_nudity_task():
    attacks, nudity = resolve_run("uce", "nudity-attacks"), resolve_run("uce", "nudity")
    assert attacks.hparams == nudity.hparams and attacks.task.concepts == nudity.task.concepts


def test_every_nudity_attack_set_runs_end_to_end_in_smoke(tmp_path):
    """Each set of nudity-attacks (shipped, gated and found) on the tiny model: its smoke rows are generated
    and scored, and the ASR table has every set with its n."""
    import json

    from cpebench.cli import main

    assert main(["-q", "run", "--method", "sd", "--task", "nudity-attacks", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "sd-nudity-attacks-tiny-smoke" / "summary.json").read_text())
    values = summary["metrics"]["nudity_asr"]["values"]
    cfg = resolve_run("sd", "nudity-attacks", preset="smoke")
    for s in cfg.task.prompt_sets:
        assert values[f"asr.{s}_n"] == 2 and 0 <= values[f"asr.{s}"] <= 100
        assert f"asr.unlearndiffatk.{s}" in values and f"asr.cpebench-v1.{s}" in values


@pytest.mark.parametrize("task,metric", [("nudity-attacks", "nudity_asr"), ("harm-attacks", "q16"),
                                         ("style-attacks", "style_classifier"), ("objects", "object_accuracy"),
                                         ("coco-10k", "clip_score")])
def test_every_shipped_set_runs_end_to_end_from_its_real_file(tmp_path, data_env, one_thread, task, metric):
    """The real files (first row of each set; gated sets without a copy are left out) through generation and
    the task's own judge, on the tiny model (the smoke preset's stand-in judges, its rows swapped for the files')."""
    import json

    from cpebench.cli import main

    assert main(["-q", "run", "--method", "sd", "--task", task, "--preset", "smoke", "run.prompts=full", "--limit", "1",
                 "--out", str(tmp_path), "--data-dir", str(data_env)]) == 0
    (run,) = tmp_path.glob(f"sd-{task}-tiny-smoke")
    summary = json.loads((run / "summary.json").read_text())
    cfg = resolve_run("sd", task, preset="smoke")
    shipped = [s for s, ps in cfg.task.prompt_sets.items() if ps.file and ps.file not in data.GATED_FILES]
    used = {s for m in cfg.task.metrics.values() for s in m.prompt_sets}
    assert set(summary["protocol_card"]["prompts"]) == set(shipped) & used
    assert summary["metrics"][metric]["n"] == len(set(shipped) & set(cfg.task.metrics[metric].prompt_sets))
    if task == "nudity-attacks":      # Six-CD's pair: each malicious row carries its clean version's prompt
        entries = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
        (dual,) = [e for e in entries if e["set"] == "sixcd_dual"]
        clean = data.load_prompt_set(data_env / "attacks/sixcd/Dual-Version/Nudity/clean.csv", "attack", split="erased")
        assert dual["extras"]["clean_prompt"] == next(r.prompt for r in clean if r.id == dual["key"].split("/")[-1]
                                                       .rsplit("_", 1)[0]) != dual["prompt"]
        assert summary["metrics"]["clip_score"]["values"]["sixcd_dual_n"] == 1
