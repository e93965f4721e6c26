"""The smoke preset needs no data files: every registered method runs every task that names concepts to
erase with no --data-dir, no $CPEBENCH_DATA, an empty cache and downloads made impossible."""

import json

import pytest

from cpebench import data
from cpebench.cli import main
from cpebench.config import resolve_run, task_names
from cpebench.errors import DataError
from cpebench.registry import METHODS
from cpebench.runner import concepts_slug, get_method, task_concepts

from cpebench.microworld.prompts import TASKS as MICRO_TASKS

# Tasks that erase as another task (nudity-attacks erases as nudity: the same artifact) add no erase to
# check; their sets are run end to end in tests/test_attack_sets.py.
TASKS = [t for t in task_names() if t not in MICRO_TASKS and task_concepts(resolve_run("sd", t, preset="smoke"))
         and not resolve_run("sd", t, preset="smoke").task.erase_as]


@pytest.fixture(scope="module")
def offline(tmp_path_factory, tiny_dir, one_thread):
    """A fresh cache (no data files, no cached artifacts; the tiny model linked in), no data dir, a
    download that fails, and a record of every data file asked for."""
    cache = tmp_path_factory.mktemp("offline-cache")
    (cache / "models").symlink_to(tiny_dir.parent, target_is_directory=True)
    asked = []
    resolve = data.resolve_data_file

    def recorded(name, *args, **kwargs):
        asked.append(name)
        return resolve(name, *args, **kwargs)

    def no_download(df, dest, *, progress):
        raise DataError(f"test: download of {df.name} attempted")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CPEBENCH_CACHE", str(cache))
        mp.delenv("CPEBENCH_DATA", raising=False)
        mp.setattr(data, "resolve_data_file", recorded)
        mp.setattr(data, "_download", no_download)
        yield tmp_path_factory.mktemp("runs"), asked


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS.names())
def test_smoke_run_reads_no_data_file(offline, method, task, capsys):
    out, asked = offline
    cfg = resolve_run(method, task, preset="smoke")
    concepts, name = task_concepts(cfg), f"{method}-{task}-tiny-smoke"
    one = cfg.task.erase_each and method != "sd"      # one model per concept (objects): its first concept checks it
    if one:
        concepts, name = concepts[:1], f"{method}-{task}-{concepts_slug(concepts[:1])}-tiny-smoke"
    rc = main(["-q", "run", "--method", method, "--task", task, "--preset", "smoke", "--out", str(out)]
              + (["--concepts", *concepts] if one else []))
    assert asked == [] and rc == 0, capsys.readouterr().err
    run = out / name
    gen = json.loads((run / "generation.json").read_text())
    assert gen["method"]["concepts"] == concepts
    if get_method(method).trains:   # trained now, into the fresh cache
        assert gen["method"]["artifact_path"].startswith(str(data.cache_dir()))
    assert json.loads((run / "summary.json").read_text())["metrics"]


def test_the_smoke_tasks_include_every_erasure_task():
    assert {"nudity", "celebrity", "artist", "objects"} <= set(TASKS)
