"""The `turnout` command: one subcommand per service, plus `up` for a whole local deployment.

Each subcommand imports only its own service, so `turnout router` never loads tokenizers and
`turnout frontend` never loads an engine.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

USAGE = """usage: turnout {frontend,router,worker,planner,profile,configure,up,status,keys} [flags]

  frontend   OpenAI-compatible HTTP API (validation, templates, tokenization, SSE)
  router     picks a worker per request, relays streams, migrates on failure
  worker     one engine (mocker, vllm, ...) behind the request plane
  planner    predicts load and scales workers against TTFT/ITL targets
  profile    sweeps one worker and writes the performance file `planner --profile` reads
  configure  a layout for a model on N GPUs under TTFT/ITL targets, and its deployment files
             (aiconfigurator estimates; the `configure` extra; --serve: a web page)
  up         frontend + router + N workers on this machine (file discovery, loopback)
  status     the fleet now: workers' health, load and KV; routers; frontends (--watch, --json)
  keys       the fleet's CURVE keys for the planes (generate DIR, secret DIR, show DIR)

`turnout SUBCOMMAND --help` lists that subcommand's flags; every flag also reads TURNOUT_<NAME>.
"""


def _entry(name: str) -> Callable[[Sequence[str]], None]:
    if name == "frontend":
        from services.frontend.main import main as frontend
        return frontend
    if name == "router":
        from services.router.main import main as router
        return router
    if name == "worker":
        from services.worker.main import main as worker
        return worker
    if name == "planner":
        from services.planner.main import main as planner
        return planner
    if name == "profile":
        from turnout.profile import main as profile
        return profile
    if name == "configure":
        from turnout.configure.main import main as configure
        return configure
    if name == "up":
        from turnout.up import main as up
        return up
    if name == "status":
        from turnout.status import main as status
        return status
    if name == "keys":
        from turnout.keys import main as keys
        return keys
    raise KeyError(name)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    from turnout.package_origin import check_packages

    check_packages()
    try:
        entry = _entry(args[0])
    except KeyError:
        print(f"turnout: unknown subcommand {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    entry(args[1:])
