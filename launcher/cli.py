"""Command line: parse, call one function per subcommand, turn user errors into one line + exit 2."""

from __future__ import annotations

from . import timing  # noqa: F401  (first: marks the start for start-up accounting; see __init__)

import argparse
import os
import sys
import traceback
from pathlib import Path

from . import faults
from .engine.eval import run_evaluation
from .engine.ewc import run_fisher
from .engine.run import run_training
from .errors import EXIT_FAILURE, EXIT_OK, HubModelUnavailable, LauncherError, StopRequested, TrainingError
from .launch.continual import is_continual, run_continual
from .launch.debug import run_debug
from .launch.local import execute, print_plan
from .launch.plan import LaunchRequest, build_plan
from .launch.slurm import SlurmRequest, check_request, sbatch_path, submit, write_job
from .launch.sweep import make_sweep, parse_grid_args, read_sweep_file, run_local, run_slurm
from .launch.sweep_summary import markdown_table, summarize, write_summary
from .recipe import load_recipe, recipe_to_yaml
from .report import write_report
from .schema import STRATEGIES
from .schema_doc import recipe_reference
from .tasks import TASKS
from .timing import import_heavy_libraries


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe fields, e.g. training.learning_rate=3e-5")
    # SUPPRESS: a subcommand's default must not undo `launcher --verbose COMMAND`.
    parser.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")


def _add_slurm_args(parser: argparse.ArgumentParser) -> None:
    """The Slurm job options `launcher slurm` and `launcher sweep --slurm` share."""
    parser.add_argument("--nproc-per-node", type=int, default=1, help="CPU processes per node when --gpus-per-node 0")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--time", default="01:00:00", help="time limit (default 01:00:00)")
    parser.add_argument("--account", help="Slurm account")
    parser.add_argument("--cpus-per-task", type=int, help="CPUs per node task (default: processes per node)")
    parser.add_argument("--signal-seconds", type=int, default=120, help="preemption warning before the time limit (default 120)")
    parser.add_argument("--strategy", choices=[s for s in STRATEGIES if s != "auto"], help="override distributed.strategy")
    parser.add_argument("--mem", help="memory per node (sbatch --mem), e.g. 64G; 0 = all of it")
    parser.add_argument("--exclusive", action="store_true", help="whole nodes only (sbatch --exclusive)")
    parser.add_argument("--constraint", help="node features (sbatch --constraint), e.g. a100")
    parser.add_argument("--qos", help="quality of service (sbatch --qos)")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                        help="another #SBATCH option, repeatable: --sbatch-arg=--reservation=maint")
    parser.add_argument("--setup", action="append", default=[], metavar="LINE",
                        help="a shell line run on every node before the launch, repeatable: --setup 'module load cuda/12.4'")
    parser.add_argument("--container-image", help="run each node's task in this container (pyxis: srun --container-image)")
    parser.add_argument("--container-mounts", help="pyxis mounts (default: the working and run directories)")
    parser.add_argument("--container-python", default="python", help="the interpreter inside the container (default python)")
    parser.add_argument("--memory-per-rank", metavar="SIZE",
                        help="memory of each GPU (or CPU process) on the compute nodes, e.g. 80GiB; "
                             "distributed.strategy=auto picks from it (needed for auto with --gpus-per-node > 0)")
    parser.add_argument("--submit", action="store_true", help="submit with sbatch after rendering")


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
    run.add_argument("--memory-per-rank", metavar="SIZE",
                     help="memory each rank may use, e.g. 16GiB, 800MiB, 1.5TB (default: the GPU's total memory, or "
                          "host memory / processes per node); distributed.strategy=auto picks from it")
    run.add_argument("--dry-run", action="store_true", help="print the plan and the command, start nothing")

    debug = sub.add_parser("debug", help="one process, a few batches, anomaly detection, full tracebacks")
    _add_recipe_args(debug)

    slurm = sub.add_parser("slurm", help="render an sbatch script for the recipe (and submit it with --submit)")
    _add_recipe_args(slurm)
    slurm.add_argument("--nodes", type=int, required=True, help="number of nodes")
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0 for a CPU job)")
    _add_slurm_args(slurm)

    sweep = sub.add_parser(
        "sweep",
        help="run the recipe over a grid or list of overrides, one run directory per point (here, or as a Slurm job array)",
        description="Expand --grid KEY=V1,V2 (repeatable; the cartesian product) and/or a --sweep FILE (grid: and "
        "points:) into points, check every point's recipe and plan, then run them one after another here (finished "
        "points are skipped; run the same command again to resume) or, with --slurm, as one job array. "
        "`launcher sweep --summary DIR` tabulates the points' results.",
    )
    sweep.add_argument("recipe", nargs="?", help="recipe YAML file")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every point")
    sweep.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="values of one recipe key, repeatable: --grid training.learning_rate=1e-5,3e-5 --grid training.seed=1,2")
    sweep.add_argument("--sweep", type=Path, metavar="FILE", help="a sweep file: grid: {KEY: [values]} and/or points: [{KEY: value}, ...]")
    sweep.add_argument("--dir", type=Path, help="sweep directory (default runs/<recipe name>-sweep); each point runs in DIR/<point name>")
    sweep.add_argument("--summary", type=Path, metavar="DIR", help="print and write (DIR/summary.json, DIR/summary.md) the results of the sweep in DIR")
    sweep.add_argument("--dry-run", action="store_true", help="check and list the points, start and write nothing")
    sweep.add_argument("--nproc", type=int, help="here: processes per point (default: GPUs visible, else 1)")
    sweep.add_argument("--config-file", type=Path, help="here: use this accelerate config instead of generating one")
    sweep.add_argument("--slurm", action="store_true", help="render one Slurm job array (a task per point) instead of running here")
    sweep.add_argument("--array", type=int, metavar="CAP", help="--slurm: at most CAP points run at once (sbatch --array=...%%CAP)")
    sweep.add_argument("--nodes", type=int, help="--slurm: nodes per point")
    sweep.add_argument("--gpus-per-node", type=int, help="--slurm: GPUs per node (0 for a CPU job)")
    _add_slurm_args(sweep)

    evaluate = sub.add_parser(
        "eval",
        help="evaluate without training: an exported checkpoint, the recipe's model, or a prompted LM (recipe prompt:)",
    )
    _add_recipe_args(evaluate)
    evaluate.add_argument("--checkpoint", type=Path, help="a model directory exported by the launcher (any fine-tuning method)")
    evaluate.add_argument("--split", default="test", choices=["train", "validation", "test"], help="which split (default test)")
    evaluate.add_argument("--output", type=Path, help="where to write <split>.json and predictions (default <output.dir>/eval)")
    evaluate.add_argument("--jobs", type=Path, metavar="FILE", help='several evaluations of the same checkpoint in one '
                          'process: a JSON list of {"overrides": [KEY=VALUE, ...], "output": DIR} (each its own DIR; '
                          'the overrides apply after the command line\'s)')

    fisher = sub.add_parser(
        "fisher", help="the diagonal Fisher of an exported model on the recipe's training split, for an ewc: penalty "
        "(per rank under accelerate launch, all-reduced)",
    )
    _add_recipe_args(fisher)
    fisher.add_argument("--checkpoint", type=Path, required=True, help="a model directory exported by the launcher")
    fisher.add_argument("--output", type=Path, required=True, help="directory for fisher.safetensors (F and the anchor weights)")
    fisher.add_argument("--samples", type=int, default=200, help="training examples to average over (default 200)")

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
    import_heavy_libraries()
    recipe = load_recipe(args.recipe, args.overrides)
    run_training(recipe)
    return EXIT_OK


def cmd_run(args) -> int:
    request = LaunchRequest(nproc=args.nproc, nodes=args.nodes, node_rank=args.node_rank,
                            main_address=args.main_address, main_port=args.main_port,
                            strategy=args.strategy, config_file=args.config_file, dry_run=args.dry_run,
                            memory_per_rank=args.memory_per_rank)
    if is_continual(args.recipe, args.overrides):
        return run_continual(args.recipe, args.overrides, request, dry_run=args.dry_run)
    plan = build_plan(args.recipe, args.overrides, request)
    return execute(plan, dry_run=args.dry_run)


def cmd_debug(args) -> int:
    args.verbose = True  # debug mode always shows the full traceback
    run_debug(args.recipe, args.overrides)
    return EXIT_OK


def _slurm_requests(args) -> tuple[SlurmRequest, LaunchRequest]:
    slurm = SlurmRequest(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpu_procs_per_node=args.nproc_per_node,
                         partition=args.partition, time=args.time, account=args.account,
                         cpus_per_task=args.cpus_per_task, signal_seconds=args.signal_seconds, mem=args.mem,
                         exclusive=args.exclusive, constraint=args.constraint, qos=args.qos,
                         sbatch_args=tuple(args.sbatch_arg), setup=tuple(args.setup),
                         container_image=args.container_image, container_mounts=args.container_mounts,
                         container_python=args.container_python)
    procs = args.gpus_per_node or args.nproc_per_node
    # The compute nodes have the GPUs, whatever this login node has.
    request = LaunchRequest(nproc=procs, nodes=args.nodes, strategy=args.strategy, rendezvous_at_runtime=True,
                            device="cuda" if args.gpus_per_node else None,
                            memory_per_rank=args.memory_per_rank)
    return slurm, request


def cmd_slurm(args) -> int:
    slurm, request = _slurm_requests(args)
    check_request(slurm)
    if args.submit:
        sbatch_path()  # fail before writing anything if it cannot be submitted
    plan = build_plan(args.recipe, args.overrides, request)
    print_plan(plan, show_command=False)
    script = write_job(plan, slurm)
    print(f"sbatch script: {script}")
    if args.submit:
        print(f"submitted job {submit(script)}")
    else:
        print(f"submit with: sbatch {script}")
    return EXIT_OK


# Options of `launcher sweep` that belong to one of its modes (name, attribute, its default).
_SLURM_ONLY = [("--nodes", "nodes", None), ("--gpus-per-node", "gpus_per_node", None), ("--array", "array", None),
               ("--submit", "submit", False), ("--partition", "partition", None), ("--account", "account", None),
               ("--qos", "qos", None), ("--constraint", "constraint", None), ("--mem", "mem", None),
               ("--exclusive", "exclusive", False), ("--sbatch-arg", "sbatch_arg", []), ("--setup", "setup", []),
               ("--container-image", "container_image", None), ("--nproc-per-node", "nproc_per_node", 1),
               ("--time", "time", "01:00:00"), ("--signal-seconds", "signal_seconds", 120),
               ("--cpus-per-task", "cpus_per_task", None)]
_LOCAL_ONLY = [("--nproc", "nproc", None), ("--config-file", "config_file", None), ("--dry-run", "dry_run", False)]


def cmd_sweep(args) -> int:
    if args.summary is not None:
        if args.recipe or args.grid or args.sweep or args.slurm:
            raise LauncherError("launcher sweep --summary DIR takes no recipe, --grid, --sweep or --slurm")
        summary = summarize(args.summary)
        sys.stdout.write(markdown_table(summary))
        for path in write_summary(summary):
            print(f"wrote {path}")
        return EXIT_OK
    if not args.recipe:
        raise LauncherError("launcher sweep: give a recipe (launcher sweep RECIPE --grid KEY=V1,V2) or --summary DIR")
    given = [flag for flag, name, default in (_LOCAL_ONLY if args.slurm else _SLURM_ONLY) if getattr(args, name) != default]
    if given:
        mode = "a Slurm sweep (--slurm)" if args.slurm else "a local sweep (add --slurm for a job array)"
        raise LauncherError(f"launcher sweep: {given[0]} does not apply to {mode}")
    grid, points = read_sweep_file(args.sweep) if args.sweep else ({}, None)
    grid.update(parse_grid_args(args.grid))
    sweep = make_sweep(args.recipe, args.overrides, grid, points, args.dir)
    if args.slurm:
        if args.nodes is None or args.gpus_per_node is None:
            raise LauncherError("launcher sweep --slurm: give --nodes and --gpus-per-node (per point), as for launcher slurm")
        slurm, request = _slurm_requests(args)
        return run_slurm(sweep, request, slurm, limit=args.array, submit_now=args.submit)
    request = LaunchRequest(nproc=args.nproc, strategy=args.strategy, config_file=args.config_file, dry_run=args.dry_run,
                            memory_per_rank=args.memory_per_rank)
    return run_local(sweep, request, dry_run=args.dry_run)


def cmd_eval(args) -> int:
    import_heavy_libraries()
    run_evaluation(args.recipe, args.overrides, args.split, args.checkpoint, args.output, args.jobs)
    return EXIT_OK


def cmd_fisher(args) -> int:
    import_heavy_libraries()
    if args.samples < 1:
        raise LauncherError(f"--samples {args.samples}: give at least 1")
    run_fisher(args.recipe, args.overrides, args.checkpoint, args.output, args.samples)
    return EXIT_OK


def cmd_check(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        task = TASKS[recipe.task](recipe)  # a task checks its own settings when it is created
        task.check_limits()  # (an unreachable Hub: the note at once, load_pretrained_config probes it first)
    except HubModelUnavailable as exc:
        # The recipe is valid; its model is fetched where it runs (run/slurm/train refuse it there if not).
        print(f"note: lengths not checked against the model's position limit: {exc}", file=sys.stderr)
    sys.stdout.write(recipe_to_yaml(recipe))
    return EXIT_OK


def cmd_report(args) -> int:
    print(f"report: {write_report(args.runs, args.output)}")
    return EXIT_OK


def cmd_schema(args) -> int:
    sys.stdout.write(recipe_reference())
    return EXIT_OK


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "run": cmd_run, "debug": cmd_debug, "slurm": cmd_slurm, "sweep": cmd_sweep,
            "check": cmd_check, "fisher": cmd_fisher, "schema": cmd_schema, "report": cmd_report}


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
    for warning in faults.active_test_settings():
        if os.environ.get("RANK", "0") == "0":
            print(f"warning: {warning}", file=sys.stderr, flush=True)
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
