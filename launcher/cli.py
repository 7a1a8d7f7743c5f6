"""Command line: parse, call one function per subcommand, turn user errors into one line + exit 2."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .errors import EXIT_FAILURE, EXIT_OK, LauncherError


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

    check = sub.add_parser("check", help="validate a recipe and print it fully resolved")
    _add_recipe_args(check)

    schema = sub.add_parser("schema", help="print the recipe reference (every field, generated from the schema)")
    return parser


def cmd_train(args) -> int:
    from .engine.run import run_training
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run_training(recipe)
    return EXIT_OK


def cmd_check(args) -> int:
    from .recipe import load_recipe, recipe_to_yaml

    recipe = load_recipe(args.recipe, args.overrides)
    sys.stdout.write(recipe_to_yaml(recipe))
    return EXIT_OK


def cmd_schema(args) -> int:
    from .schema_doc import recipe_reference

    sys.stdout.write(recipe_reference())
    return EXIT_OK


COMMANDS = {"train": cmd_train, "check": cmd_check, "schema": cmd_schema}


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LauncherError as exc:
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
