"""Run the model server: ``python -m serving --host 127.0.0.1 --port 8000``.

Settings come from the environment (see ``serving.config``); the flags only choose
where to listen.
"""

from __future__ import annotations

import argparse
import copy

import uvicorn
from uvicorn.config import LOGGING_CONFIG


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and run uvicorn with the ``serving.app:create_app`` factory.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="python -m serving", description="Serve the registry's model over HTTP.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    # uvicorn configures only its own loggers: without this the server's own lines (loads,
    # releases, the prediction log) below WARNING would go nowhere.
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["serving"] = {"handlers": ["default"], "level": args.log_level.upper(), "propagate": False}
    uvicorn.run(
        "serving.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=log_config,
    )


if __name__ == "__main__":
    main()
