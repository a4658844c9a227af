"""The `papertrain` command.

    papertrain ls [--json]                               every recipe, its status and last result
    papertrain run RECIPE|FILE [key=value ...]           train (re-running resumes)
    papertrain launch --nproc N RECIPE|FILE [...]        train on N processes (torchrun)
    papertrain export RUN_DIR [--step N]                 one safetensors file from any checkpoint
    papertrain plan RECIPE|FILE --gpus N --gpu-mem 48GB  will it fit? memory per GPU, per strategy
    papertrain cp RECIPE DEST.yaml                       copy a config to edit
    papertrain validate RECIPE|FILE [key=value ...]      every config problem at once
    papertrain show RECIPE|FILE [key=value ...]          the resolved config
    papertrain submit RECIPE|FILE [key=value ...]        to Slurm (--sweep, --dry-run, --local; see --help)
    papertrain jobs / papertrain logs JOB                submitted jobs, their states and logs

RECIPE is a name from `papertrain ls` (`gpt`), optionally with a config (`gpt:tiny`).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from papertrain.errors import PapertrainError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DISK_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, "EDQUOT", errno.ENOSPC))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come before or after --options: argparse leaves the later ones over, collect them
    args, leftover = parser.parse_known_args(argv)
    from papertrain.config import is_override

    strays = [word for word in leftover if not (hasattr(args, "overrides") and is_override(word))]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if leftover:
        args.overrides += leftover
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.handler(args)
    except PapertrainError as err:
        print(f"error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"  fix: {err.hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as err:  # a second Ctrl-C: stopped at once (papertrain.stopping.Interrupted says more)
        print(f"\n{err}" if str(err) else "\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # the disk, not papertrain: full, read-only, permissions (checkpoints say more)
        if err.errno not in DISK_ERRORS:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror}{where}", file=sys.stderr)
        print("  fix: free disk space, or make the folder writable (or use another --run-dir), then run the same "
              "command again: a run resumes from its last checkpoint", file=sys.stderr)
        return EXIT_USER_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="papertrain", description="Annotated paper re-implementations, trained on one engine.",
        epilog="Run `papertrain COMMAND --help` for each command's options.")
    parser.add_argument("--version", action="version", version=f"papertrain {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    ls = commands.add_parser("ls", help="list recipes with their status and last measured result",
                             description="Every recipe: family, paper, status (verified/failing/measured/new) "
                                         "and the result recorded by `papertrain run NAME --record`.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=cmd_ls)

    run = commands.add_parser("run", help="train a recipe (re-running the same command resumes)",
                              description="Train RECIPE (a name from `papertrain ls`, or a YAML file) with "
                                          "dotted overrides such as trainer.max_steps=200. The run directory "
                                          "(default runs/NAME) gets metrics, checkpoints, samples and plots; "
                                          "running the same command again resumes from the last checkpoint; "
                                          "with a larger trainer.max_steps it trains the run longer.")
    _add_target(run)
    run.add_argument("--run-dir", type=Path, help="where the run is written (default: runs/<name>)")
    run.add_argument("--restart", action="store_true",
                     help="start over: remove the previous run's checkpoints, metrics and samples from the run "
                          "directory first (not in a command a scheduler may re-run: it would start over again)")
    run.add_argument("--record", action="store_true",
                     help="write the result into the recipe's results.json (shipped configs, no overrides)")
    run.set_defaults(handler=cmd_run)

    compare = commands.add_parser(
        "compare", help="train a recipe's variants side by side: one table, one plot",
        description="Train every variant listed in the `compare:` section of RECIPE's meta.yaml (e.g. the "
                    "optimizers, the normalization layers) into RUN_DIR/<variant>, then write comparison.png "
                    "(all loss curves), comparison.md (the table) and comparison.json. Overrides apply to every "
                    "variant; re-running resumes, and finished variants are not trained again.")
    _add_target(compare)
    compare.add_argument("--only", help="comma-separated variant names to run (default: all)")
    compare.add_argument("--run-dir", type=Path, help="where the variants are written (default: runs/<name>-compare)")
    compare.add_argument("--record", action="store_true",
                         help="copy the table and plot into the recipe's folder (shipped variants, no overrides)")
    compare.set_defaults(handler=cmd_compare)

    launch = commands.add_parser(
        "launch", help="train on N processes of this machine (and M machines)",
        description="Start N processes of `python -m papertrain.launch` on this machine, with the environment "
                    "torchrun would give them (RANK, WORLD_SIZE, MASTER_ADDR, ...). The config is checked first; the "
                    "strategy must be a multi-process one (e.g. strategy=fsdp2), and each rank verifies that the job "
                    "really has them all. Ctrl-C stops every rank at the same step with a checkpoint (exit 130); the "
                    "workers die with the launcher. On several machines, run the same command on each with its "
                    "--node-rank.")
    launch.add_argument("--nproc", type=int, required=True, help="processes on this machine (one per GPU)")
    launch.add_argument("--nnodes", type=int, default=1, help="machines in the job (default 1)")
    launch.add_argument("--node-rank", type=int, default=0, help="this machine's number, 0 .. nnodes-1")
    launch.add_argument("--master-addr", help="address of node 0, where the ranks meet (default: this machine)")
    launch.add_argument("--master-port", type=int, help="a free port on node 0 (default: any free port; 29500 "
                                                        "with several nodes)")
    _add_target(launch)
    launch.add_argument("--run-dir", type=Path, help="where the run is written (default: runs/<name>)")
    launch.set_defaults(handler=cmd_launch)

    export = commands.add_parser(
        "export", help="consolidate a run's checkpoint into one safetensors file",
        description="Write the full weights of RUN_DIR's latest (or --step) checkpoint, whatever strategy and "
                    "world size wrote it, as one safetensors file; in Hugging Face's layout with a config.json "
                    "where the recipe has one (default folder: RUN_DIR/export).")
    _add_checkpoint(export)
    export.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/export)")
    export.add_argument("--format", choices=["safetensors"], default="safetensors", help="file format")
    export.add_argument("--layout", choices=["auto", "hf", "papertrain"], default="auto",
                        help="key names: Hugging Face's where the recipe has them (auto), or ours")
    _add_trust(export)
    export.set_defaults(handler=cmd_export)

    rerecord = commands.add_parser(
        "rerecord", help="run recipes again and record them (e.g. the stale ones): old figure beside new",
        description="Train each named recipe's tiny config from scratch in runs/NAME-record and write its "
                    "results.json, printing the recorded figure before and after. --stale picks every recipe "
                    "whose record's code changed since (or was never stamped).")
    rerecord.add_argument("names", nargs="*", help="recipe names (default with --stale: every stale one)")
    rerecord.add_argument("--stale", action="store_true", help="every recipe whose record is stale or unstamped")
    rerecord.add_argument("--dry-run", action="store_true", help="list what would be recorded again, and why")
    rerecord.set_defaults(handler=cmd_rerecord)

    evaluate = commands.add_parser(
        "eval", help="a trained run's metrics on a whole split (e.g. --split test)",
        description="Evaluate RUN_DIR's latest (or --step) checkpoint on every example of a split of its data "
                    "(default: test, which training never sees), on one process in fp32; writes "
                    "RUN_DIR/eval/<split>-step_N.json.")
    _add_checkpoint(evaluate)
    evaluate.add_argument("--split", default="test", help="train, val or test (default: test)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    evaluate.add_argument("--batch-size", type=int, help="examples per batch (default: the run's trainer.batch_size)")
    _add_trust(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    plan = commands.add_parser(
        "plan", help="estimate per-GPU memory of a config under every strategy",
        description="Count the model's parameters exactly (built on the meta device, so any size works) and "
                    "estimate per-GPU bytes of weights, gradients, optimizer state and activations for each "
                    "strategy, and for fp16/int8 generation; says which fit in --gpu-mem.")
    _add_target(plan)
    plan.add_argument("--gpus", type=int, default=1, help="GPUs the job would use")
    plan.add_argument("--gpu-mem", default="80GB", help="memory per GPU, e.g. 48GB, 80GiB")
    plan.set_defaults(handler=cmd_plan)

    generate = commands.add_parser(
        "generate", help="stream text from a trained run or a pretrained model",
        description="Continue --prompt with TARGET's model, printing tokens as they are drawn. TARGET is a run "
                    "directory (its latest checkpoint and tokenizer) or a recipe/config with pretrained weights "
                    "(e.g. neox:20b pretrained.path=/models/gpt-neox-20b). Models with a key/value cache decode "
                    "each token in O(context).")
    _add_target(generate)
    generate.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    generate.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    generate.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    generate.add_argument("--top-k", type=int, help="keep the k most likely tokens")
    generate.add_argument("--top-p", type=float, help="nucleus sampling: keep the most likely tokens with mass p")
    generate.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    generate.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    generate.add_argument("--step", type=int, help="a run directory's checkpoint (default: the latest)")
    generate.set_defaults(handler=cmd_generate)

    cp = commands.add_parser("cp", help="copy a recipe's config to a file you can edit",
                             description="Copy RECIPE's config to DEST; then `papertrain run DEST`.")
    cp.add_argument("recipe", help="recipe name, optionally NAME:CONFIG")
    cp.add_argument("dest", type=Path, help="destination .yaml file")
    cp.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    cp.set_defaults(handler=cmd_cp)

    validate = commands.add_parser("validate", help="check a config and report every problem at once",
                                   description="Load, override and check a config against the code it names. "
                                               "Exit status 0 if valid, 2 with every problem listed if not.")
    _add_target(validate)
    validate.set_defaults(handler=cmd_validate)

    show = commands.add_parser("show", help="print the resolved config",
                               description="Print the config after overrides and ${} references.")
    _add_target(show)
    show.add_argument("--origins", action="store_true", help="print each key with where it was set")
    show.set_defaults(handler=cmd_show)

    from papertrain.cluster.commands import add_commands  # submit, jobs, logs (Slurm)

    add_commands(commands, _add_target)
    return parser


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="recipe name (e.g. gpt, gpt:tiny) or path to a YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. trainer.max_steps=200 model.n_layers=4; ~key deletes")
    _add_trust(parser)


def _add_trust(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust", action="append", default=[], metavar="PACKAGE",
                        help="let `_component_` name classes of PACKAGE (besides papertrain's and torch's building "
                             "blocks); repeatable. Never os, subprocess, builtins and the like")


def _add_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory (with checkpoints/)")
    parser.add_argument("--step", type=int, help="which checkpoint (default: the latest)")


def _version() -> str:
    from papertrain import __version__

    return __version__


# -- commands ---------------------------------------------------------------------------------------------

def cmd_ls(args: argparse.Namespace) -> int:
    from papertrain.catalog import discover

    recipes = discover()
    if args.json:
        rows = [{"name": r.name, "family": r.family, "title": r.title, "paper": r.paper, "url": r.url,
                 "status": r.status(recipes), "goal": r.goal.describe() if r.goal else None, "configs": r.configs,
                 "result": r.result(), "changed_since_record": r.stale_parts(recipes)} for r in recipes.values()]
        print(json.dumps(rows, indent=2))
        return 0
    header = ("recipe", "family", "paper", "status", "last result (tiny config)", "code since")
    rows = [(r.name, r.family, _shorten(r.paper, 50), r.status(recipes), r.summary() or "-", _code_since(r, recipes))
            for r in recipes.values()]
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _code_since(recipe, recipes) -> str:
    if recipe.result() is None:
        return "-"
    parts = recipe.stale_parts(recipes)
    return "not stamped" if parts is None else ("unchanged" if not parts else "changed: " + ", ".join(parts))


def cmd_rerecord(args: argparse.Namespace) -> int:
    """Run recipes' tiny configs again with --record; print each old figure beside the new one."""
    from papertrain.catalog import DEFAULT_CONFIG, discover, record_result
    from papertrain.config import load_config
    from papertrain.trainer import Trainer

    recipes = discover()
    unknown = [n for n in args.names if n not in recipes]
    if unknown:
        raise PapertrainError(f"no recipe named {', '.join(unknown)}", "`papertrain ls` lists them")
    if not args.names and not args.stale:
        raise PapertrainError("name the recipes to record again, or --stale for every stale or unstamped one",
                              "e.g. papertrain rerecord gpt evidential, or papertrain rerecord --stale")
    chosen = [recipes[n] for n in args.names] or [r for r in recipes.values() if r.result() is not None
                                                  and r.stale_parts(recipes) != []]  # stale, or unstamped
    if args.dry_run:
        for recipe in chosen:
            print(f"{recipe.name}: {_code_since(recipe, recipes)}")
        return 0
    for recipe in chosen:
        before = recipe.result() or {}
        metric = recipe.goal.metric if recipe.goal else next(iter(before.get("metrics", {})), None)
        run_dir = Path("runs") / f"{recipe.name}-record"
        result = Trainer(load_config(recipe.config_path(DEFAULT_CONFIG)), run_dir, restart=True).run()
        if result.status != "completed":
            return EXIT_INTERRUPTED
        record_result(recipe, DEFAULT_CONFIG, run_dir, result.wall_s, result.metrics, result.step)
        old, new = before.get("metrics", {}).get(metric), result.metrics.get(metric)
        shown = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        print(f"rerecord {recipe.name}: {metric} {shown(old)} ({before.get('date', 'never')}) -> {shown(new)} "
              f"now; status {recipe.status()}")
    return 0


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _load(args: argparse.Namespace):
    from papertrain.catalog import resolve_target
    from papertrain.config import load_config

    path, recipe = resolve_target(args.target)
    return load_config(path, args.overrides, trust=args.trust), recipe


def cmd_run(args: argparse.Namespace) -> int:
    from papertrain.catalog import record_result
    from papertrain.distributed import process_info
    from papertrain.metrics import format_duration
    from papertrain.rundir import RunConfigChanged, default_run_dir, next_free_run_dir
    from papertrain.trainer import Trainer

    config, recipe = _load(args)
    if args.record and (recipe is None or args.overrides):
        raise PapertrainError("--record stores a shipped recipe's result, so it needs a recipe name and no overrides",
                              "drop --record, or run e.g. `papertrain run gpt --record`")
    name = config.run.name or config.source.stem
    run_dir = args.run_dir or (Path(config.run.run_dir) if config.run.run_dir else default_run_dir(name))
    try:
        result = Trainer(config, run_dir, restart=args.restart).run()
    except RunConfigChanged as err:
        raise PapertrainError(err.message, _what_you_meant(args, err)) from None
    if result.status == "interrupted":
        return EXIT_INTERRUPTED
    if process_info().rank != 0:
        return 0  # rank 0 reports for the job
    shown = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                      if k.startswith("val/") and isinstance(v, (int, float)))
    if result.status == "already complete":
        longer = _command(args, [f"trainer.max_steps={2 * result.step}"], drop=("trainer.max_steps",))
        print(f"{run_dir} already holds a finished run ({result.step} steps). {shown}\n"
              f"  to train it longer:   {longer}\n"
              f"  to start over:        {_command(args, [], flags=['--restart'])}\n"
              f"  to train a new run:   {_command(args, [], flags=['--run-dir', str(next_free_run_dir(run_dir))])}")
        return 0
    segments = f" (over {result.segments} segments)" if result.segments > 1 else ""
    print(f"done: {result.step} steps in {format_duration(result.wall_s)}{segments}  {shown}")
    for path in result.samples:
        print(f"  sample: {path}")
    if result.plot:
        print(f"  plot:   {result.plot}")
    print(f"  run:    {run_dir} (metrics.jsonl, checkpoints/, config.yaml)")
    if args.record:
        stem = config.source.stem
        path = record_result(recipe, stem, run_dir, result.wall_s, result.metrics, result.step)
        print(f"  recorded: {path}")
    return 0


def _command(args: argparse.Namespace, extra: list[str], flags: list[str] = (), drop: tuple[str, ...] = ()) -> str:
    """The `papertrain run` command the user typed, with overrides and flags added or replaced."""
    import shlex

    overrides = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") not in drop] + extra
    words = ["papertrain", "run", args.target, *overrides]
    words += [w for t in args.trust for w in ("--trust", t)]
    if args.run_dir and "--run-dir" not in flags:
        words += ["--run-dir", str(args.run_dir)]
    return " ".join(shlex.quote(w) for w in [*words, *flags])


def _what_you_meant(args: argparse.Namespace, err: Exception) -> str:
    """For a config that differs from the run on disk: the commands for each thing the user may have meant."""
    from papertrain.rundir import next_free_run_dir

    lines = [f"to train this config as a new run:  {_command(args, [], flags=['--run-dir', str(next_free_run_dir(err.run_dir))])}",
             f"to start over in {err.run_dir}:  {_command(args, [], flags=['--restart'])}"]
    if len(err.differing) <= 5 and all(old != "<unset>" for _, old, _ in err.differing):
        changed = {key for key, _, _ in err.differing}
        kept = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") not in changed]
        as_saved = [f"{key}={json.dumps(old) if not isinstance(old, str) else old}" for key, old, _ in err.differing]
        saved = argparse.Namespace(**{**vars(args), "overrides": kept})
        lines.append(f"to resume the run on disk as it was:  {_command(saved, as_saved)}")
    return "\n       ".join(lines)


def cmd_compare(args: argparse.Namespace) -> int:
    from papertrain.catalog import resolve_target
    from papertrain.compare import load_comparison, record, run_comparison, write_outputs
    from papertrain.rundir import default_run_dir

    _, recipe = resolve_target(args.target)
    if recipe is None:
        raise PapertrainError(f"compare needs a recipe name, not a file ({args.target})",
                              "e.g. papertrain compare optimizers")
    if args.record and (args.overrides or args.only):
        raise PapertrainError("--record stores the shipped comparison, so it takes no overrides and no --only",
                              f"drop --record, or run `papertrain compare {recipe.name} --record`")
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    comparison = load_comparison(recipe, args.overrides, only)
    run_dir = args.run_dir or default_run_dir(f"{recipe.name}-compare")
    if run_comparison(comparison, run_dir) == "interrupted":
        print(f"interrupted: run the same command again to continue ({run_dir})")
        return EXIT_INTERRUPTED
    outputs = write_outputs(comparison, run_dir, recipe.title)
    print((run_dir / "comparison.md").read_text(), end="")
    for path in outputs:
        print(f"  {path}")
    if args.record:
        for path in record(comparison, run_dir):
            print(f"  recorded: {path}")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from papertrain.launcher import launch

    for flag, value, least in (("--nproc", args.nproc, 1), ("--nnodes", args.nnodes, 1), ("--node-rank", args.node_rank, 0)):
        if value < least:
            raise PapertrainError(f"{flag} must be at least {least}, got {value}")
    if args.node_rank >= args.nnodes:
        raise PapertrainError(f"--node-rank {args.node_rank} with --nnodes {args.nnodes}",
                              f"number the machines 0 .. {args.nnodes - 1}")
    if args.nnodes > 1 and not args.master_addr:
        raise PapertrainError("--nnodes > 1 needs --master-addr: the address of node 0, where the ranks meet",
                              "e.g. --master-addr node0 --master-port 29500 on every machine")
    world = args.nproc * args.nnodes
    overrides = list(args.overrides)
    if not any(o.startswith("strategy.world_size=") for o in overrides):
        overrides.append(f"strategy.world_size={world}")
    args.overrides = overrides
    config, _ = _load(args)  # every config problem now, not N times from N processes
    if world > 1 and config.run.strategy.name == "single":
        raise PapertrainError(f"strategy=single trains one process, not {world}",
                              "add strategy=ddp, strategy=fsdp2 or strategy=deepspeed")
    worker_argv = [args.target, *overrides, *(f"--trust={t}" for t in args.trust)]
    if args.run_dir:
        worker_argv += ["--run-dir", str(args.run_dir)]
    where = f" on node {args.node_rank} of {args.nnodes}" if args.nnodes > 1 else ""
    print(f"launching {args.nproc} process(es){where}: papertrain.launch {' '.join(worker_argv)}", flush=True)
    return launch(worker_argv, args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port)


def cmd_export(args: argparse.Namespace) -> int:
    from papertrain.export import export

    folder, layout = export(args.run_dir, args.step, args.out, args.layout, trust=args.trust)
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    print(f"exported {args.run_dir} -> {folder} ({layout} layout: {files})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from papertrain.evaluate_run import evaluate_run

    if args.batch_size is not None and args.batch_size < 1:
        raise PapertrainError(f"--batch-size must be at least 1, got {args.batch_size}")
    measured, out, step = evaluate_run(args.run_dir, args.split, args.step, args.device, args.batch_size, args.trust)
    shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in measured.items())
    print(f"{args.run_dir} at step {step}: {shown}\n  written: {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from papertrain.plan import parse_bytes, render

    if args.gpus < 1:
        raise PapertrainError(f"--gpus must be at least 1, got {args.gpus}")
    config, _ = _load(args)
    print(render(config, args.gpus, parse_bytes(args.gpu_mem)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from papertrain.generation import generate_text, load_for_generation

    if args.max_new_tokens < 1:
        raise PapertrainError(f"--max-new-tokens {args.max_new_tokens}", "give a positive number of tokens")
    generator = load_for_generation(args.target, args.overrides, args.device, args.step, trust=args.trust)
    print(f"[{generator.source} on {generator.device}]", file=sys.stderr)
    figures = generate_text(generator, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                            args.seed)
    print(f"[{figures['tokens']} tokens in {figures['seconds']:.2f}s, {figures['tokens_per_s']:.1f} tokens/s after "
          "the first]", file=sys.stderr)
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    from papertrain.catalog import resolve_target

    source, _ = resolve_target(args.recipe)
    if args.dest.exists() and not args.force:
        raise PapertrainError(f"{args.dest} already exists", "choose another name, or pass --force to overwrite it")
    if args.dest.suffix not in (".yaml", ".yml"):
        raise PapertrainError(f"{args.dest} should end in .yaml", f"e.g. papertrain cp {args.recipe} ./my_config.yaml")
    text = source.read_text()
    # the copy gets its own name, so its runs go to runs/<copy name> and never resume the original's
    lines = text.splitlines(keepends=True)
    renamed = [f"name: {args.dest.stem}\n" if line.startswith("name:") else line for line in lines]
    if renamed == lines:
        renamed.insert(0, f"name: {args.dest.stem}\n")
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    args.dest.write_text("".join(renamed))
    print(f"copied {source} -> {args.dest}\n  edit it, then: papertrain run {args.dest}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from papertrain.rundir import flatten

    config, _ = _load(args)
    print(f"ok: {config.source} is valid ({len(flatten(config.tree))} settings)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from papertrain.config import dump_yaml
    from papertrain.rundir import flatten

    config, _ = _load(args)
    if args.origins:
        flat = flatten(config.tree)
        width = max(len(k) for k in flat)
        for key, value in flat.items():
            print(f"{key.ljust(width)}  {json.dumps(value)}  # {config.origin(key)}")
    else:
        print(f"# {config.source}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
        print(dump_yaml(config.tree), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
