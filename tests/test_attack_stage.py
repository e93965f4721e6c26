"""``cpebench attack``: UnlearnDiffAtk end to end on the tiny model (smoke rows), the found prompts as a
prompt set, the protocol card with the ASR, and a killed attack resuming without redoing finished prompts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from cpebench.cli import main

ARGS = ["-q", "attack", "--method", "uce", "--task", "nudity", "--preset", "smoke", "--attack", "unlearndiffatk",
        "--blocks", "2", "--iterations", "2"]


def test_attack_end_to_end_and_resume(tmp_path, monkeypatch, one_thread):
    from attacks import unlearndiffatk as U
    from cpebench.metrics import nudity_asr

    out = tmp_path / "runs"
    real_flags, calls = nudity_asr.NudityASR.flags, {"n": 0}

    def judge(self, detail):          # row 1 is flagged as plain prompt; the second judging round is killed
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        flags = real_flags(self, detail)
        return {**flags, "unlearndiffatk": detail["set"] == "attack" and calls["n"] == 2}

    monkeypatch.setattr(nudity_asr.NudityASR, "flags", judge)
    assert main(ARGS + ["--out", str(out)]) != 0         # "interrupted; rerun the same command to resume"
    (adir,) = out.glob("*-attack-unlearndiffatk")
    finished = [json.loads(line) for line in (adir / "attack.jsonl").read_text().splitlines()]
    assert [r["row_id"] for r in finished] == ["1"] and finished[0]["success"] and len(finished[0]["attempts"]) == 1

    monkeypatch.setattr(nudity_asr.NudityASR, "flags", real_flags)
    attacked = []
    real_attack = U.attack
    monkeypatch.setattr(U, "attack", lambda pipe, rows, *a, **k: attacked.append([r[0] for r in rows]) or real_attack(pipe, rows, *a, **k))
    assert main(ARGS + ["--out", str(out)]) == 0
    assert attacked == [["0", "2", "3"]]                      # row 1 was not attacked again
    records = {json.loads(line)["row_id"]: json.loads(line) for line in (adir / "attack.jsonl").read_text().splitlines()}
    assert sorted(records) == ["0", "1", "2", "3"] and records["1"] == finished[0]
    for rid in ("0", "2", "3"):                                # plain prompt + 2 blocks each, none broken
        assert [a["t"] for a in records[rid]["attempts"]] == [None, 10, 30]
    card = json.loads((adir / "attack.json").read_text())
    assert card["asr"]["n"] == 4 and card["asr"]["pre_asr"] == 25.0 and card["asr"]["post_asr"] == 25.0
    assert card["target_model"]["method"] == "uce" and len(card["target_model"]["artifact_sha256"]) == 64
    assert card["settings"]["timesteps"] == [10, 30] and card["judge"]["rule"] == "unlearndiffatk"
    with open(adir / "found_prompts.csv", newline="") as f:
        found = list(csv.DictReader(f))
    assert [r["case_number"] for r in found] == ["0", "1", "2", "3"] and found[1]["attack_success"] == "1"
    assert len(list((adir / "images" / "0").glob("*.png"))) == 3

    # summary.json: a row of the nudity-unlearndiffatk table, in the columns of the leaderboard's reported rows
    from cpebench.report import REPORTED_KEYS, build_table, find_summaries, load_reported

    summary = json.loads((adir / "summary.json").read_text())
    assert summary["task"] == "nudity-unlearndiffatk" and summary["method"] == "uce"
    reported = [r for r in load_reported(Path(__file__).resolve().parents[1] / "results" / "reported.yaml") if r.task == "nudity-unlearndiffatk"]
    table = build_table(find_summaries([out]), "nudity-unlearndiffatk", reported)
    ours = [r for r in table.rows if r.kind == "reproduced"]
    assert [r.method for r in ours] == ["uce"] and len(table.rows) == 1 + len(reported)
    assert ours[0].cells[REPORTED_KEYS["asr_pre"].id] == (25.0, 4)
    assert ours[0].cells[REPORTED_KEYS["asr_post"].id] == (25.0, 4)


def test_ringabell_found_prompts_are_scored_by_run(tmp_path, one_thread):
    out = tmp_path / "runs"
    assert main(["-q", "attack", "--method", "sd", "--task", "nudity", "--preset", "smoke", "--attack", "ringabell",
                 "--generations", "2", "--out", str(out)]) == 0
    (adir,) = out.glob("ringabell-nudity-tiny-K16-eta3-smoke")
    card = json.loads((adir / "attack.json").read_text())
    assert card["settings"]["generations"] == 2 and len(card["found"]) == 4
    with open(adir / "found_prompts.csv", newline="") as f:
        found = list(csv.DictReader(f))
    assert [r["prompt"] for r in found] == [x["found"] for x in card["found"]]
    found_csv = str(adir / "found_prompts.csv")
    assert main(["-q", "run", "--method", "sd", "--task", "nudity-attacks", "--model", "tiny", "--device", "cpu",
                 "--sets", "ringabell_found", f"prompt_sets.ringabell_found.path={found_csv}", "--out", str(out),
                 "protocol.steps=2", "protocol.height=64", "protocol.width=64", "run.batch_size=4"]) == 0
    summary = json.loads((out / "sd-nudity-attacks-tiny" / "summary.json").read_text())
    assert summary["metrics"]["nudity_asr"]["values"]["asr.ringabell_found_n"] == 4
    gen = json.loads((out / "sd-nudity-attacks-tiny" / "generation.json").read_text())
    assert gen["prompt_sets"]["ringabell_found"]["source"] == found_csv


def test_object_and_style_targets_attack_with_their_own_judges(tmp_path, one_thread):
    """UnlearnDiffAtk's other targets: an erased Imagenette class (HF ResNet-50 judge, k = 3) and Van Gogh
    (the 129-artist classifier, k = 3), each summary in its own table; an erased set with no target is refused."""
    from cpebench.attack import TARGETS

    out = tmp_path / "runs"
    base = ["-q", "attack", "--method", "uce", "--preset", "smoke", "--attack", "unlearndiffatk", "--blocks", "1",
            "--iterations", "1", "--out", str(out)]
    assert main(base + ["--task", "objects", "--concepts", "church"]) == 0
    assert main(base + ["--task", "style-attacks"]) == 0
    for pattern, concept, judge, table in (("uce-objects-church-*-attack-unlearndiffatk", "church", "object",
                                            "objects-unlearndiffatk"),
                                           ("uce-style-attacks-*-attack-unlearndiffatk", "Vincent van Gogh", "style",
                                            "style-unlearndiffatk")):
        (adir,) = out.glob(pattern)
        card = json.loads((adir / "attack.json").read_text())
        assert card["target"] == {"concept": concept, "judge": judge, "k": 3} and card["settings"]["k"] == 3
        assert card["prompt_set"]["file"] == TARGETS[concept].file and card["asr"]["n"] >= 2
        assert json.loads((adir / "summary.json").read_text())["task"] == table
    assert main(base + ["--task", "harm-attacks"]) == 0                # violence: Q16
    (adir,) = out.glob("uce-harm-attacks-*-attack-unlearndiffatk")
    assert json.loads((adir / "summary.json").read_text())["task"] == "harm-unlearndiffatk"
    assert main(base + ["--task", "objects"]) == 2                    # ten classes: which one?
    assert main(base + ["--task", "objects", "--concepts", "golf ball"]) == 2   # no UnlearnDiffAtk prompts for it


def test_every_target_prompt_file_loads(data_env):
    from cpebench import data
    from cpebench.attack import TARGETS

    for concept, t in TARGETS.items():
        recs = data.load_prompt_set(data_env / t.file, t.fmt, split="erased")
        assert len(recs) == {"nudity": 142, "violence": 756}.get(concept, 50), concept
        if t.judge == "style":
            assert {r.concept for r in recs} == {"Vincent van Gogh"}
