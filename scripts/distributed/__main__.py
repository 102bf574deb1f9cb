"""``python -m scripts.distributed up|down|status|env|test``: the distributed mode's CLI (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from scripts.distributed import backends, stack
from scripts.distributed.config import Config, DistError, environment
from scripts.services import PROJECT_ROOT
from tasks.supervisor import SupervisorError


def run_tests(config: Config, keep: bool, pytest_args: list[str]) -> int:
    """``tests/distributed`` with pytest (it starts a fresh stack and stops it at the end unless ``keep``)."""
    problem = backends.preflight(config)
    if problem:
        print(f"distributed test: {problem}", file=sys.stderr)
        return 2
    alive = stack.running(config)
    if alive:
        print(
            f"distributed test: services are running under {config.paths.state_dir} ({', '.join(alive)}); the test "
            "starts a fresh stack there: run `python -m scripts.distributed down` first",
            file=sys.stderr,
        )
        return 2
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(PROJECT_ROOT / "tests" / "distributed"),
        "-m",
        "distributed",
        "-p",
        "no:cacheprovider",
        "-v",
        *pytest_args,
    ]
    env = {
        **os.environ,
        "NS_DIST_KEEP": "1" if keep else "",
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "plugins")]),
    }
    started = time.monotonic()
    code = subprocess.call(command, cwd=PROJECT_ROOT, env=env)
    elapsed = time.monotonic() - started
    print(f"distributed test: {'passed' if code == 0 else 'FAILED'} in {elapsed:.0f}s (wall time)", flush=True)
    if code != 0:
        print(f"distributed test: {config.where_logs()}", flush=True)
    return code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Distributed mode (CeleryExecutor, Postgres, Redis) on loopback.")
    sub = parser.add_subparsers(dest="action", required=True)
    up_parser = sub.add_parser("up", help="start the stack (healthy services are left alone)")
    up_parser.add_argument("--fresh", action="store_true", help="drop/recreate its databases and state dir first")
    down_parser = sub.add_parser("down", help="stop what up started (by pid)")
    down_parser.add_argument("--drop", action="store_true", help="also drop its databases and flush its Redis db")
    sub.add_parser("status", help="show the services")
    sub.add_parser("env", help="print the environment as shell exports")
    test_parser = sub.add_parser("test", help="run tests/distributed on a fresh stack")
    test_parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    args, rest = parser.parse_known_args(argv)
    if rest and args.action != "test":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    config = Config.from_env()
    try:
        if args.action == "up":
            started = time.monotonic()
            stack.up(config, fresh=args.fresh)
            print(f"  up in {time.monotonic() - started:.0f}s", flush=True)
        elif args.action == "down":
            stack.down(config, drop=args.drop)
        elif args.action == "status":
            sys.exit(0 if stack.status(config) else 1)
        elif args.action == "env":
            for key, value in sorted(environment(config).items()):
                print(f"export {key}={value!r}")
        else:
            sys.exit(run_tests(config, args.keep, rest))
    except (DistError, SupervisorError) as err:
        sys.exit(f"distributed: {err}")


if __name__ == "__main__":
    main()
