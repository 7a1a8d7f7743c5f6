"""Command line: parse, call one function per subcommand, turn user errors into one line + exit 2."""

from __future__ import annotations

from . import timing  # noqa: F401  (first: marks the start for start-up accounting)

import argparse
import os
import sys
import traceback
from pathlib import Path

from .errors import EXIT_FAILURE, EXIT_OK, LauncherError, StopRequested, TrainingError
from .recipe import STRATEGIES


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe fields, e.g. training.learning_rate=3e-5")
    # SUPPRESS: a subcommand's default must not undo `launcher --verbose COMMAND`.
    parser.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launcher",
        description="Run a fine-tuning recipe (YAML) on one process, under accelerate launch / torchrun, or on SLURM.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="run the recipe on this rank (the per-rank entry point for accelerate launch / torchrun)",
    )
    _add_recipe_args(train)

    run = sub.add_parser(
        "run",
        help="plan, print and start the recipe under accelerate launch (topology detected or given)",
        description="Detect (or take) the topology, write the accelerate and DeepSpeed configs into the run "
        "directory, print the plan, then run `accelerate launch ... -m launcher train RECIPE`.",
    )
    _add_recipe_args(run)
    run.add_argument("--nproc", type=int, help="processes per node (default: GPUs visible, else 1)")
    run.add_argument("--nodes", type=int, default=1, help="number of machines (default 1)")
    run.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0..nodes-1")
    run.add_argument("--main-address", help="address of node 0 (multi-node)")
    run.add_argument("--main-port", type=int, help="port on node 0 (multi-node; default: a free port)")
    run.add_argument("--strategy", choices=[s for s in STRATEGIES if s != "auto"], help="override distributed.strategy")
    run.add_argument("--config-file", type=Path, help="use this accelerate config instead of generating one")
    run.add_argument("--dry-run", action="store_true", help="print the plan and the command, start nothing")

    debug = sub.add_parser("debug", help="one process, a few batches, anomaly detection, full tracebacks")
    _add_recipe_args(debug)

    slurm = sub.add_parser("slurm", help="render an sbatch script for the recipe (and submit it with --submit)")
    _add_recipe_args(slurm)
    slurm.add_argument("--nodes", type=int, required=True, help="number of nodes")
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0 for a CPU job)")
    slurm.add_argument("--nproc-per-node", type=int, default=1, help="CPU processes per node when --gpus-per-node 0")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--time", default="01:00:00", help="time limit (default 01:00:00)")
    slurm.add_argument("--account", help="Slurm account")
    slurm.add_argument("--cpus-per-task", type=int, help="CPUs per node task (default: processes per node)")
    slurm.add_argument("--signal-seconds", type=int, default=120, help="preemption warning before the time limit (default 120)")
    slurm.add_argument("--strategy", choices=[s for s in STRATEGIES if s != "auto"], help="override distributed.strategy")
    slurm.add_argument("--submit", action="store_true", help="submit with sbatch after rendering")

    evaluate = sub.add_parser(
        "eval",
        help="evaluate without training: an exported checkpoint, the recipe's model, or a prompted LM (recipe prompt:)",
    )
    _add_recipe_args(evaluate)
    evaluate.add_argument("--checkpoint", type=Path, help="a model directory exported by the launcher (any fine-tuning method)")
    evaluate.add_argument("--split", default="test", choices=["train", "validation", "test"], help="which split (default test)")
    evaluate.add_argument("--output", type=Path, help="where to write <split>.json and predictions (default <output.dir>/eval)")

    check = sub.add_parser("check", help="validate a recipe and print it fully resolved")
    _add_recipe_args(check)

    report = sub.add_parser(
        "report", help="write RUN/report/index.html: training curves, validation metrics, per-class results, "
        "sample predictions, recipe, plan, versions (several runs: overlaid and compared)",
    )
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories (output.dir of a run)")
    report.add_argument("--output", type=Path, help="directory for index.html (default: RUN/report; several runs: "
                        "their common parent/report)")

    sub.add_parser("schema", help="print the recipe reference (every field, generated from the schema)")
    return parser


def cmd_train(args) -> int:
    from .timing import import_heavy_libraries

    import_heavy_libraries()
    from .engine.run import run_training
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run_training(recipe)
    return EXIT_OK


def cmd_run(args) -> int:
    from .launch.local import execute
    from .launch.plan import LaunchRequest, build_plan

    request = LaunchRequest(nproc=args.nproc, nodes=args.nodes, node_rank=args.node_rank,
                            main_address=args.main_address, main_port=args.main_port,
                            strategy=args.strategy, config_file=args.config_file)
    plan = build_plan(args.recipe, args.overrides, request)
    return execute(plan, dry_run=args.dry_run)


def cmd_debug(args) -> int:
    from .launch.debug import run_debug

    args.verbose = True  # debug mode always shows the full traceback
    run_debug(args.recipe, args.overrides)
    return EXIT_OK


def cmd_slurm(args) -> int:
    from .launch.local import print_plan
    from .launch.plan import LaunchRequest, build_plan
    from .launch.slurm import SlurmRequest, check_request, sbatch_path, submit, write_job

    slurm = SlurmRequest(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpu_procs_per_node=args.nproc_per_node,
                         partition=args.partition, time=args.time, account=args.account,
                         cpus_per_task=args.cpus_per_task, signal_seconds=args.signal_seconds)
    check_request(slurm)
    if args.submit:
        sbatch_path()  # fail before writing anything if it cannot be submitted
    procs = args.gpus_per_node or args.nproc_per_node
    request = LaunchRequest(nproc=procs, nodes=args.nodes, strategy=args.strategy, rendezvous_at_runtime=True)
    plan = build_plan(args.recipe, args.overrides, request)
    if args.gpus_per_node:
        plan.device = "cuda"  # the compute nodes have the GPUs, whatever this login node has
    print_plan(plan, show_command=False)
    script = write_job(plan, slurm)
    print(f"sbatch script: {script}")
    if args.submit:
        print(f"submitted job {submit(script)}")
    else:
        print(f"submit with: sbatch {script}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from .timing import import_heavy_libraries

    import_heavy_libraries()
    from .engine.eval import run_evaluation

    run_evaluation(args.recipe, args.overrides, args.split, args.checkpoint, args.output)
    return EXIT_OK


def cmd_check(args) -> int:
    from .recipe import load_recipe, recipe_to_yaml

    from .tasks import TASKS

    recipe = load_recipe(args.recipe, args.overrides)
    TASKS[recipe.task](recipe)  # a task checks its own settings when it is created
    sys.stdout.write(recipe_to_yaml(recipe))
    return EXIT_OK


def cmd_report(args) -> int:
    from .report import write_report

    print(f"report: {write_report(args.runs, args.output)}")
    return EXIT_OK


def cmd_schema(args) -> int:
    from .schema_doc import recipe_reference

    sys.stdout.write(recipe_reference())
    return EXIT_OK


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "run": cmd_run, "debug": cmd_debug, "slurm": cmd_slurm, "check": cmd_check,
            "schema": cmd_schema, "report": cmd_report}


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


def parse_args(argv: list[str] | None = None):
    """Overrides (KEY=VALUE) may come before, between or after the options."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    stray = [a for a in unknown if a.startswith("-") or "=" not in a]
    if stray or (unknown and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or unknown)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LauncherError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {_rank_prefix()}{exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except StopRequested as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank stops together; one of them says so
            print(f"stopped: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except TrainingError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {_rank_prefix()}{exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        # Not the user's input: keep the traceback, and say which rank it came from.
        print(f"error: {_rank_prefix()}unexpected failure (traceback follows)", file=sys.stderr, flush=True)
        traceback.print_exc()
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
