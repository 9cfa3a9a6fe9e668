"""``edge-agent``: the device daemon's command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.config import ConfigError
from agent.config_overrides import load_effective_config
from agent.config_paths import check_files
from agent.protocol import json_schemas

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_INVALID = 2


def _cmd_check(args: argparse.Namespace) -> int:
    # Loaded exactly as `run` loads it, so saved overrides that `run` would drop are
    # reported here (as warnings: they do not stop the agent).
    try:
        effective = load_effective_config(args.config)
    except ConfigError as err:
        for line in err.problems:
            print(line, file=sys.stderr)
        return EXIT_INVALID
    config = effective.config
    if not args.offline:
        from agent.ops.check import format_table, run_checks

        results = run_checks(
            config,
            Path(args.config),
            warnings=effective.warnings,
            source_timeout_s=args.timeout,
            broker_timeout_s=args.timeout,
        )
        print(format_table(results))
        return EXIT_CHECK_FAILED if any(r.failed for r in results) else EXIT_OK
    for line in effective.warnings:
        print(f"warning: {line}", file=sys.stderr)
    problems = check_files(config)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return EXIT_INVALID
    print(f"{args.config}: ok (device {config.device.id}, {len(config.pipelines)} pipeline(s))")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.service import run_agent

    try:
        return run_agent(Path(args.config))
    except ConfigError as err:
        for line in err.problems:
            print(line, file=sys.stderr)
        return EXIT_INVALID


def _cmd_schema(args: argparse.Namespace) -> int:
    schemas = json_schemas()
    if args.message:
        if args.message not in schemas:
            print(f"unknown message {args.message!r}; known: {', '.join(schemas)}", file=sys.stderr)
            return EXIT_INVALID
        schemas = {args.message: schemas[args.message]}
    json.dump(schemas, sys.stdout, indent=2, sort_keys=True)
    print()
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent (systemd starts it so)")
    run.add_argument("config", help="path to the YAML config")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser(
        "check",
        help="check a config and what it names (sources, models, broker): a PASS/FAIL table",
        description="Exit status: 0 all pass, 1 a check failed, 2 the config is invalid.",
    )
    check.add_argument("config", help="path to the YAML config")
    check.add_argument(
        "--offline",
        action="store_true",
        help="check the file and the files it names only; touch no network or hardware",
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for each source's first frame and for the broker (default 10)",
    )
    check.set_defaults(func=_cmd_check)

    schema = sub.add_parser("schema", help="print the JSON Schema of every wire message")
    schema.add_argument("--message", help="only this message (Command, Reply, State, ...)")
    schema.set_defaults(func=_cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
