"""``cpebench`` command line: run | erase | generate | score | table | leaderboard | report | ls | data | microworld."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import CpebenchError

log = logging.getLogger("cpebench")


def _add_run_args(p: argparse.ArgumentParser, task_required: bool = True) -> None:
    p.add_argument("--method", required=True, help="erasure method (cpebench ls methods)")
    p.add_argument("--task", required=task_required, help="task name or YAML path (cpebench ls tasks)"
                   + ("" if task_required else "; optional with --concepts and a task preset (--preset celebrity)"))
    p.add_argument("--artifact", help="use this artifact instead of erasing (cpebench artifact folder, or a "
                                      "method's own format, e.g. CPE's official checkpoint folder)")
    p.add_argument("--model", help="base model: hub id, local diffusers dir, or 'tiny' (default: the protocol's)")
    p.add_argument("--revision", help="hub revision (commit) of --model")
    p.add_argument("--preset", help="preset (cpebench ls presets), e.g. smoke")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (cpu forces a full-size run on CPU)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--batch-size", type=_batch_size, help="images per batch, or auto (from free GPU memory)")
    p.add_argument("--limit", type=int, help="first N rows of every prompt set")
    p.add_argument("--sets", help="comma-separated prompt sets to generate (default: those the metrics use)")
    p.add_argument("--out", help="runs folder (default runs/)")
    p.add_argument("--name", help="run name (default <method>-<task>-<model>[-<preset>])")
    p.add_argument("--data-dir", help="local copy of the data files (else $CPEBENCH_DATA, cache, download)")
    p.add_argument("--concepts", nargs="+", help="concepts to erase instead of the task's (with --task: some of its "
                                                 "concepts, e.g. one Imagenette class of the objects task)")
    p.add_argument("--force", action="store_true", help="start an existing run directory anew")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. protocol.steps=25 run.batch_size=4 hparams.lr=1e-5 metrics=nudenet")


def _batch_size(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive integer or auto") from None


def _resolve(args):
    from .config import resolve_run

    flags = {
        "protocol.model": args.model, "protocol.revision": args.revision, "protocol.dtype": args.dtype,
        "run.device": args.device, "run.batch_size": args.batch_size, "run.limit": args.limit,
        "run.out": args.out, "run.name": args.name, "run.data_dir": args.data_dir, "run.artifact": args.artifact,
        "run.sets": args.sets.split(",") if args.sets else None,
    }
    from .registry import METHODS

    METHODS.get(args.method)  # unknown method: fail before anything is loaded
    return resolve_run(args.method, args.task, preset=args.preset, overrides=args.overrides, flags=flags)


def _with_concepts(cfg, concepts, task_given: bool = True):
    """The config erasing ``concepts`` instead of the task's (and the method's own list for the task);
    with a task, they must be among its concepts so that its metrics still apply."""
    import dataclasses

    from . import config, runner

    if task_given:
        runner.check_task_concepts(cfg, concepts)
    return dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, concepts=tuple(concepts), concepts_from=None),
                               method=config.without_method_concepts(cfg.method, cfg.task.name))


def _run_configs(args) -> list:
    """The runs one command makes: one, or one per concept on an ``erase_each`` task (ESD's objects: one
    erased model per class) unless --concepts names them."""
    from . import runner

    cfg = _resolve(args)
    if args.concepts:
        return [_with_concepts(cfg, args.concepts)]
    if not cfg.task.erase_each or cfg.method.name == "sd":
        return [cfg]
    if cfg.run.name:
        raise CpebenchError(f"task {cfg.task.name!r} makes one run per concept; --name needs --concepts")
    return [_with_concepts(cfg, [c], task_given=False) for c in runner.task_concepts(cfg)]


def cmd_generate(args, then_score: bool = False) -> int:
    from . import runner

    configs = _run_configs(args)
    for i, cfg in enumerate(configs):
        if len(configs) > 1:
            print(f"[{i + 1}/{len(configs)}] {cfg.method.name} erasing {cfg.task.concepts[0]!r}", file=sys.stderr)
        if then_score:
            runner.check_metrics(cfg)
        with runner.open_run(cfg, force=args.force) as run_dir:
            _generate_into(args, cfg, run_dir, then_score)
    return 0


def _generate_into(args, cfg, run_dir: Path, then_score: bool) -> int:
    from . import runner

    print(f"run directory: {run_dir}", file=sys.stderr)
    scorer = None
    if then_score and cfg.run.overlap_scoring and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        scorer = runner.BackgroundScorer.for_run(run_dir, cfg)
    try:
        stats = runner.generate(cfg, run_dir, progress=not args.quiet, on_written=scorer)
    except BaseException:
        if scorer is not None:
            scorer.close(finish=False)
        raise
    if scorer is not None:
        scorer.close()
    print(f"generated {stats.get('generated', 0)} images, {stats.get('skipped', 0)} already done, "
          f"{stats.get('flagged', 0)} flagged (NaN/black)", file=sys.stderr)
    if then_score and int(os.environ.get("RANK", "0")) == 0:   # one scorer when sharded
        runner.ensure_reference_run(cfg, progress=not args.quiet)
        summary = runner.score(run_dir, cfg, progress=not args.quiet)
        from .report import render

        print(render([summary], cfg.task.name, "md"))
        _write_run_report(run_dir)
    return 0


def cmd_attack(args) -> int:
    import dataclasses

    from attacks import unlearndiffatk as U

    from .attack import ATTACKS, run_attack, target_of

    cfg = _resolve(args)
    if args.concepts:
        cfg = _with_concepts(cfg, args.concepts)
    if args.attack == "ringabell":
        from attacks import ringabell as R

        settings = R.Settings(**({"generations": args.generations} if args.generations else {}))
        card = run_attack(cfg, args.attack, settings=settings, progress=not args.quiet)
        print(f"ringabell: {len(card['found'])} prompts found (K={settings.length}, eta={settings.eta:g}, "
              f"{settings.generations} generations); score them with `cpebench run --task nudity-attacks --sets "
              "ringabell_found prompt_sets.ringabell_found.path=<attack dir>/found_prompts.csv`")
        return 0
    if args.attack == "cce":
        from .attack import run_cce

        card = run_cce(cfg, steps=args.steps, progress=not args.quiet)
        r = card["asr"]
        print(f"cce on {cfg.method.name}/{cfg.task.name} ({card['target']['concept']}): pre-ASR {r['pre_asr']:.2f} %, "
              f"post-ASR {r['post_asr']:.2f} % (n={int(r['n'])}, {card['settings']['steps']} inversion steps)")
        return 0
    if args.attack != "unlearndiffatk":
        raise CpebenchError(f"--attack {args.attack!r}: known attacks: {', '.join(ATTACKS)}")
    settings = U.Settings(k=target_of(cfg)[1].k)
    if args.blocks is not None:
        settings = dataclasses.replace(settings, timesteps=U.TIMESTEPS[: args.blocks])
    if args.iterations is not None:
        settings = dataclasses.replace(settings, iterations=args.iterations)
    card = run_attack(cfg, args.attack, settings=settings, progress=not args.quiet)
    r = card["asr"]
    print(f"{args.attack} on {cfg.method.name}/{cfg.task.name}: pre-ASR {r['pre_asr']:.2f} %, post-ASR "
          f"{r['post_asr']:.2f} % (n={int(r['n'])}, attacked {int(r['attacked'])})")
    return 0


def cmd_erase(args) -> int:
    from . import config, runner
    from .models import load_pipeline
    from .report import short_names

    if args.task is None:
        preset = config.load_preset(args.preset) if args.preset else None
        if preset is None or not preset.task or not args.concepts:
            raise CpebenchError("erase needs --task, or --concepts with a preset that names a task's hyperparameters "
                                "(e.g. --preset celebrity; see `cpebench ls presets`)")
        args.task = preset.task
        configs = [_with_concepts(_resolve(args), args.concepts, task_given=False)]
    else:
        configs = _run_configs(args)
    if args.save and len(configs) > 1:
        raise CpebenchError(f"task {args.task!r} erases one model per concept; --save needs --concepts")
    hparams = [runner.method_hparams(cfg) for cfg in configs]     # a bad value fails before the model loads
    for cfg, hp in zip(configs, hparams):
        device = cfg.run.device if cfg.run.device != "auto" else ("cuda" if _cuda() else "cpu")
        # a fresh base model per concept: no method may see another's training
        loaded = load_pipeline(cfg.protocol.model, revision=cfg.protocol.revision, dtype=cfg.protocol.dtype,
                               device=device, vae_dtype=cfg.protocol.vae_dtype)
        artifact, path = runner.erase(cfg, loaded, progress=not args.quiet, hparams=hp)
        if args.save:
            path = artifact.save(args.save)
        names = artifact.metadata.get("concepts", [])
        print(f"{cfg.method.name}: {len(names)} concepts ({short_names(names, 3)}), artifact sha256 {artifact.sha256[:16]}"
              + (f", saved at {path}" if path else " (no training needed, nothing saved)"))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_score(args) -> int:
    from . import runner
    from .report import render

    for d in map(Path, args.run_dirs):
        cfg = runner.load_run_config(d)      # a folder that is no run is said so before anything is written there
        with runner.run_lock(d):
            summary = runner.score(d, cfg, progress=not args.quiet)
            print(render([summary], summary["task"], "md"))
            _write_run_report(d)
    return 0


def _write_run_report(run_dir: Path) -> None:
    """grid.png + report.html after run/score; a failure here only warns (the scores are already saved)."""
    try:
        from .grid import write_run_report
        from .report import resolve_reported

        grid, page = write_run_report(run_dir, reported=resolve_reported("auto"))
        print(f"report: {page}" + (f" (grid {grid})" if grid else ""), file=sys.stderr)
    except Exception as e:   # noqa: BLE001 - never lose a scored run to a reporting problem
        log.warning("could not write the grid/HTML report of %s: %s: %s (scores are saved; retry with "
                    "`cpebench report %s`)", run_dir, type(e).__name__, e, run_dir)


def cmd_table(args) -> int:
    from .report import find_summaries, render, resolve_reported, tasks_in

    summaries = find_summaries(args.paths)
    reported = resolve_reported(args.reported)
    if not summaries and not (args.task and any(r.task == args.task for r in reported)):
        raise CpebenchError(f"no summary.json under {', '.join(args.paths)}; run `cpebench score RUN_DIR` first")
    tasks = [args.task] if args.task else tasks_in(summaries)
    link_base = Path(args.output).resolve().parent if args.output else Path.cwd()
    text = "\n".join(render(summaries, t, args.format, reported, link_base=link_base) for t in tasks)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


def cmd_leaderboard(args) -> int:
    from .report import leaderboard, load_reported, reported_path

    path = reported_path(args.reported)
    written = leaderboard(args.runs_dir, args.out, load_reported(path) if path else [], reported_path=path)
    for p in written:
        print(p)
    return 0


def cmd_report(args) -> int:
    from .grid import write_run_report
    from .report import resolve_reported

    reported = resolve_reported(args.reported)
    for d in args.run_dirs:
        grid, page = write_run_report(Path(d), reported=reported, per_set=args.per_set, max_rows=args.max_rows,
                                      cell=args.cell)
        print(page)
        if grid:
            print(grid)
    return 0


def cmd_ls(args) -> int:
    from . import config
    from .registry import METHODS, METRICS
    from .report import short_names

    what = args.what
    if what == "methods":
        for n in METHODS.names():
            cls = METHODS.get(n)
            mc = config.load_method_config(n)
            print(f"{n:12s} {cls.description or mc.description}" + (f"  [source: {mc.source}]" if mc.source else ""))
            for task, entry in mc.concepts.items():   # what the method erases where its paper code has its own list
                print(f"{'':12s}   concepts on {task}: {short_names(entry['names'])}  [source: {entry['source']}]")
            if mc.concepts:
                print(f"{'':12s}   concepts on other tasks: the task's")
    elif what == "metrics":
        for n in METRICS.names():
            cls = METRICS.get(n)
            print(f"{n:12s} {'↑' if cls.higher_is_better else '↓'} {cls.description}")
    elif what == "tasks":
        for n in config.task_names():
            t, _ = config.load_task(n)
            print(f"{n:12s} {t.description}  [sets: {', '.join(t.prompt_sets)}; metrics: {', '.join(t.metrics) or '-'}]")
    elif what == "presets":
        for n in config.preset_names():
            print(f"{n:12s} {config.load_preset(n).description}")
    elif what == "prompt-sets":
        from . import data

        seen = set()
        for n in config.task_names():
            t, _ = config.load_task(n)
            for s, ps in t.prompt_sets.items():
                if (s, ps.file) in seen:
                    continue
                seen.add((s, ps.file))
                df = data.DATA_FILES.get(ps.file or "")
                print(f"{s:20s} {ps.format:10s} {ps.file or '(inline)'}" + (f"  [{df.origin}]" if df else ""))
    return 0


def cmd_data(args) -> int:
    from . import config, data

    if args.action == "list":
        for name, df in data.DATA_FILES.items():
            print(f"{name:50s} {df.size:>10,d}  {df.sha256[:12]}  {df.origin}")
        return 0
    names: list[str] = []
    for target in args.targets or ["all"]:
        if target == "all":
            names += list(data.DATA_FILES)
        elif target in data.DATA_FILES:
            names.append(target)
        else:
            task, _ = config.load_task(target)
            names += [ps.file for ps in task.prompt_sets.values() if ps.file]
    paths = data.fetch(list(dict.fromkeys(names)), data_dir=args.data_dir, progress=not args.quiet)
    for p in paths:
        print(p)
    return 0


def cmd_microworld(args) -> int:
    if args.action == "leaderboard":
        from .microworld import board

        args.out = args.out or "results"
        return board.main(args)
    from .microworld import build

    args.out = args.out or "micro-model"
    return build.main(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cpebench", description="Concept-erasure benchmark for SD-1.x models")
    parser.add_argument("--version", action="version", version=f"cpebench {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="erase → generate → score → table")
    _add_run_args(p)
    p.set_defaults(func=lambda a: cmd_generate(a, then_score=True))
    p = sub.add_parser("generate", help="generate the task's images into a run directory (resumable)")
    _add_run_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("erase", help="train (or load the cached) erased-model artifact")
    _add_run_args(p, task_required=False)
    p.add_argument("--save", help="also save the artifact to this directory")
    p.set_defaults(func=cmd_erase)
    p = sub.add_parser("attack", help="attack the method's erased model (resumable per prompt): found prompts + ASR")
    _add_run_args(p)
    p.add_argument("--attack", required=True, help="attack name: unlearndiffatk | ringabell | cce")
    p.add_argument("--blocks", type=int, help="first N of the attack's 50 timestep blocks (default: all)")
    p.add_argument("--iterations", type=int, help="Adam steps per block (default: the attack's, 40)")
    p.add_argument("--generations", type=int, help="ringabell: generations of the search (default 3000)")
    p.add_argument("--steps", type=int, help="cce: textual-inversion steps (default 5000)")
    p.set_defaults(func=cmd_attack)
    p = sub.add_parser("score", help="score run directories (resumable) and write summary.json")
    p.add_argument("run_dirs", nargs="+")
    p.set_defaults(func=cmd_score)
    reported_help = ("paper-reported rows (always marked †): a YAML file, 'auto' (results/reported.yaml if present) "
                     "or 'none'")
    p = sub.add_parser("table", help="comparison tables from run summaries (+ marked paper-reported rows)")
    p.add_argument("paths", nargs="+", help="run folders or summary.json files")
    p.add_argument("--task")
    p.add_argument("--format", default="md", choices=["md", "csv", "latex"],
                   help="latex: booktabs tabular, best reproduced value per column in bold")
    p.add_argument("--reported", default="auto", help=reported_help)
    p.add_argument("--output", "-o")
    p.set_defaults(func=cmd_table)
    p = sub.add_parser("leaderboard", help="regenerate results/<task>.md|csv for every task + results/README.md")
    p.add_argument("runs_dir", nargs="?", default="runs", help="folder of run directories (default runs/)")
    p.add_argument("--out", default="results", help="output folder (default results/)")
    p.add_argument("--reported", default="auto", help=reported_help)
    p.set_defaults(func=cmd_leaderboard)
    p = sub.add_parser("report", help="write <run>/grid.png (prompts x methods) and <run>/report.html")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--reported", default="auto", help=reported_help)
    p.add_argument("--per-set", type=int, default=4, help="prompts per prompt set in the grid (default 4)")
    p.add_argument("--max-rows", type=int, default=12, help="prompts in the grid in all (default 12)")
    p.add_argument("--cell", type=int, default=128, help="grid cell size in px (default 128)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("ls", help="list methods | tasks | metrics | prompt-sets | presets")
    p.add_argument("what", choices=["methods", "tasks", "metrics", "prompt-sets", "presets"])
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("data", help="fetch / list the pinned data files")
    p.add_argument("action", choices=["fetch", "list"])
    p.add_argument("targets", nargs="*", help="task names, file names, or 'all'")
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("microworld", help="build the micro world's model (resumable), or run its leaderboard")
    p.add_argument("action", choices=["build", "leaderboard"])
    p.add_argument("--out", help="build: model folder to write (default micro-model/); leaderboard: tables "
                                 "folder (default results/)")
    p.add_argument("--runs", default="results/micro-runs", help="leaderboard: run directories (default "
                                                                 "results/micro-runs/: its summaries are committed)")
    p.add_argument("--methods", nargs="+", help="leaderboard: methods (default: sd and every built-in method)")
    p.add_argument("--tasks", nargs="+", help="leaderboard: micro tasks (default: all four)")
    p.add_argument("--reported", default="auto", help=reported_help)
    p.add_argument("--vae-steps", type=int, help="autoencoder training steps (default: the recipe's)")
    p.add_argument("--unet-steps", type=int, help="UNet training steps (default: the recipe's)")
    p.add_argument("--n-train", type=int, help="train-split renders to draw batches from")
    p.add_argument("--judge-steps", type=int, help="the judge's training steps (default: the recipe's)")
    p.add_argument("--checkpoint-every", type=int, help="steps between saved training states")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval", type=int, default=0, metavar="N", help="then score N held-out prompts")
    p.add_argument("--judge", help="micro-world judge file for --eval (default: the one the build trained)")
    p.set_defaults(func=cmd_microworld)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Subcommand options may also come before the subcommand's own arguments; keep -q/-v global.
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    # argparse leaves key=value typed after an option (`--out X protocol.steps=3`) over: an override too
    overrides = [a for a in extra if "=" in a and not a.startswith("-")] if hasattr(args, "overrides") else []
    if len(overrides) < len(extra):
        parser.error(f"unrecognized arguments: {' '.join(a for a in extra if a not in overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        return args.func(args)
    except CpebenchError as e:
        print(f"cpebench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpebench: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
