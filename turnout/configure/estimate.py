"""aiconfigurator, run in a child process: the layout sweep and per-step estimates.

`python -m turnout.configure.estimate` reads one JSON request on stdin and writes one JSON answer
on stdout; `run()` starts it from asyncio and reports its progress. A child process keeps the
sweep (seconds of CPU, holding the GIL) off the caller's event loop, keeps aiconfigurator's
prints and logging out of the caller's output, and survives its `sys.exit()` on bad input.

Requests:

    {"kind": "sweep", "model", "gpus", "system", "backend", "isl", "osl", "ttft_ms", "itl_ms"}
        aiconfigurator's `cli_default` (aggregated vs disaggregated) with its strict-SLA option;
        the answer holds every experiment's ranked best rows and SLA-filtered Pareto frontier.
    {"kind": "steps", "model", "system", "backend", "prefill": {"tp", "pp", "tokens": [...]},
     "decode": {"tp", "pp", "batches": [...], "context"}}
        one prefill step (batch 1) per prompt length and one decode step per batch size
        (`cli_estimate` static_ctx / static_gen), in ms.

Answers: {"ok": true, "aiconfigurator": VERSION, "result": {...}} or {"ok": false, "error": ONE
LINE}. Owns talking to aiconfigurator; does not judge its figures (`layout`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

AICONFIGURATOR_VERSION = "0.12.0"  # the version the extra pins and the fixtures come from
NOT_INSTALLED = ("aiconfigurator is not installed: pip install 'turnout[configure]' (NVIDIA's "
                 f"aiconfigurator=={AICONFIGURATOR_VERSION})")
PROGRESS = "@progress "  # a child's stderr line that is progress, not noise
# Columns of aiconfigurator's rows not kept (per-op provenance, fallbacks: not figures).
_DROPPED = ("_per_ops_source", "_moe_comm_fallbacks")
_IMPORT_ROOT = str(Path(__file__).resolve().parents[2])  # where `turnout` is importable from


class EstimateError(RuntimeError):
    """aiconfigurator is missing or refused the request; the message is one line."""


# -- the parent side -----------------------------------------------------------------------------


def installed() -> bool:
    try:
        return importlib.util.find_spec("aiconfigurator") is not None
    except (ImportError, ValueError):
        return False


async def run(request: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    """The child's `result` for `request`; EstimateError with its one-line reason otherwise.
    Cancelling kills the child."""
    if not installed():
        raise EstimateError(NOT_INSTALLED)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (_IMPORT_ROOT, os.environ.get("PYTHONPATH", "")) if p))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "turnout.configure.estimate", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    tail: collections.deque[str] = collections.deque(maxlen=20)

    async def follow_stderr() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line.startswith(PROGRESS):
                progress(line[len(PROGRESS):])
            elif line:
                tail.append(line)

    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(request).encode())
        await proc.stdin.drain()
        proc.stdin.close()
        follower = asyncio.create_task(follow_stderr())
        out = await proc.stdout.read()
        await follower
        code = await proc.wait()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    try:
        answer = json.loads(out)
    except ValueError:
        last = tail[-1] if tail else "no output"
        raise EstimateError(f"aiconfigurator failed (exit code {code}): {last}") from None
    if not answer.get("ok"):
        error = str(answer.get("error", "aiconfigurator failed"))
        if answer.get("log") and tail:  # its reason went to its log
            error += f": {tail[-1]}"
        raise EstimateError(error)
    result: dict[str, Any] = answer["result"]
    result["aiconfigurator"] = answer.get("aiconfigurator", "")
    return result


# -- the child side ------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(PROGRESS + text, file=sys.stderr, flush=True)


class _ProgressLog(logging.Handler):
    """aiconfigurator's own experiment messages, passed on as progress."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("Starting experiment", "Experiment ")):
            _say(message)


def _check_target(system: str, backend: str) -> None:
    from aiconfigurator_core.sdk.perf_database import get_supported_databases

    supported = get_supported_databases()
    if system not in supported:
        raise ValueError(f"aiconfigurator has no data for system {system!r}; systems: "
                         f"{', '.join(sorted(supported))}")
    if backend not in supported[system]:
        raise ValueError(f"aiconfigurator has no {backend} data for {system}; backends there: "
                         f"{', '.join(sorted(supported[system]))}")


def _rows(frame: Any) -> list[dict[str, Any]]:
    if frame is None or len(frame) == 0:
        return []
    kept = frame.drop(columns=[c for c in _DROPPED if c in frame.columns])
    rows: list[dict[str, Any]] = json.loads(kept.to_json(orient="records"))
    return rows


def _sweep(req: dict[str, Any]) -> dict[str, Any]:
    from aiconfigurator.cli.api import cli_default
    from aiconfigurator_core.sdk.errors import NoFeasibleConfigError

    _check_target(req["system"], req["backend"])
    _say(f"sweeping {req['model']} on {req['gpus']} x {req['system']} ({req['backend']}), "
         "aggregated and disaggregated")
    try:
        result = cli_default(
            model_path=req["model"], total_gpus=int(req["gpus"]), system=req["system"],
            backend=req["backend"], isl=int(req["isl"]), osl=int(req["osl"]),
            ttft=float(req["ttft_ms"]), tpot=float(req["itl_ms"]), strict_sla=True, top_n=5)
    except NoFeasibleConfigError:
        return {"chosen_exp": "", "experiments": {}}
    experiments = {}
    for name in result.tasks:
        experiments[name] = {"best": _rows(result.best_configs.get(name)),
                             "pareto": _rows(result.pareto_fronts.get(name))}
    return {"chosen_exp": result.chosen_exp, "experiments": experiments}


def _steps(req: dict[str, Any]) -> dict[str, Any]:
    from aiconfigurator.cli.api import cli_estimate

    _check_target(req["system"], req["backend"])
    common = {"backend_name": req["backend"]}
    prefill, decode = req["prefill"], req["decode"]
    out: dict[str, list[list[float]]] = {"prefill": [], "decode": []}
    for tokens in prefill["tokens"]:
        _say(f"prefill step of {tokens} tokens (TP{prefill['tp']})")
        r = cli_estimate(req["model"], req["system"], mode="static_ctx", isl=int(tokens), osl=2,
                         batch_size=1, tp_size=int(prefill["tp"]),
                         pp_size=int(prefill.get("pp", 1)), **common)
        out["prefill"].append([tokens, float(r.ttft)])
    for batch in decode["batches"]:
        _say(f"decode step of batch {batch} (TP{decode['tp']})")
        r = cli_estimate(req["model"], req["system"], mode="static_gen",
                         isl=int(decode["context"]), osl=8, batch_size=int(batch),
                         tp_size=int(decode["tp"]), pp_size=int(decode.get("pp", 1)),
                         **common)
        out["decode"].append([batch, float(r.tpot)])
    return out


def _answer(req: dict[str, Any]) -> dict[str, Any]:
    from aiconfigurator_core.sdk.utils import HuggingFaceDownloadError

    try:
        result = _sweep(req) if req.get("kind") == "sweep" else _steps(req)
    except HuggingFaceDownloadError as exc:
        return {"ok": False, "error": (
            f"model {req['model']!r} is not bundled with aiconfigurator and its config.json "
            f"could not be fetched from the Hugging Face Hub ({exc}); a bundled model (e.g. "
            "Qwen/Qwen3-32B-FP8) or a local directory holding config.json works offline")}
    except SystemExit:  # aiconfigurator exits on some bad input, after logging why
        return {"ok": False, "error": "aiconfigurator refused the request", "log": True}
    except (ValueError, KeyError, RuntimeError) as exc:
        return {"ok": False, "error": " ".join(str(exc).split()) or type(exc).__name__}
    return {"ok": True, "result": result}


def child_main() -> None:
    from importlib.metadata import version

    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # aiconfigurator's prints go to stderr; stdout carries the answer alone
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    main_log = logging.getLogger("aiconfigurator.cli.main")
    main_log.setLevel(logging.INFO)
    main_log.addHandler(_ProgressLog())
    with contextlib.suppress(ValueError):
        logging.getLogger("aiconfigurator.cli.report_and_save").setLevel(logging.WARNING)
    request = json.loads(sys.stdin.read())
    answer = _answer(request)
    answer["aiconfigurator"] = version("aiconfigurator")
    reply.write(json.dumps(answer))
    reply.flush()


if __name__ == "__main__":
    child_main()
