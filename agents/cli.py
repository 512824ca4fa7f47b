"""`migrator-agent`: the host agent's command line.

    migrator-agent serve --listen 127.0.0.1:8421 --token-file FILE --docker-host URL --state-dir DIR

Exit codes: 0 clean stop, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from agents.app import create_app
from agents.settings import DEFAULT_LISTEN, SettingsError, load_settings

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migrator-agent", description="volume-migrator host agent (one per Docker host)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the agent's HTTP API")
    serve.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT (default %(default)s)")
    serve.add_argument(
        "--token-file", required=True, help="file whose first line is the coordinator's token"
    )
    serve.add_argument(
        "--docker-host",
        default=None,
        help="Docker Engine URL (default $DOCKER_HOST or the local socket)",
    )
    serve.add_argument(
        "--state-dir", required=True, help="directory for transfer journals (outside any volume)"
    )
    serve.add_argument("--allow-devices", action="store_true", help="let pulls create device nodes")
    serve.add_argument(
        "--pull-retries",
        type=int,
        default=8,
        help="reconnects without progress before a pull fails (default %(default)s)",
    )
    serve.add_argument(
        "--pull-retry-max-delay",
        type=float,
        default=30.0,
        help="longest wait between reconnects, seconds (default %(default)s)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings(
            listen=args.listen,
            token_file=args.token_file,
            docker_host=args.docker_host,
            state_dir=args.state_dir,
            allow_devices=args.allow_devices,
            pull_retries=args.pull_retries,
            pull_retry_max_delay_s=args.pull_retry_max_delay,
        )
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except (SettingsError, OSError) as e:
        print(f"migrator-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    app = create_app(settings)
    logging.getLogger("migrator_agent").info(
        "listening on %s:%d, docker %s", settings.host, settings.port, settings.docker_host
    )
    web.run_app(app, host=settings.host, port=settings.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
