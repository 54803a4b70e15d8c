"""Running a deployment file's `turnout` commands as real processes on this machine.

Owns what compose and Kubernetes tests share: taking a container's `turnout ...` arguments,
giving every fixed port in them a free port on 127.0.0.1 (each container has its own network
namespace; here they share one), starting them with `python -m turnout`, and always reaping
them, with their logs printed when a test fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from turnout.testing.deployment import ROOT, free_port


def is_port_flag(flag: str) -> bool:
    return flag.startswith("--") and (flag == "--port" or flag.endswith("-port"))


def remap_ports(argv: Sequence[str]) -> tuple[list[str], dict[int, int]]:
    """`argv` with each `--*-port N` (N > 0) given a free port, and the old → new map."""
    out: list[str] = []
    mapping: dict[int, int] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if is_port_flag(flag) and eq and value.isdigit() and int(value) > 0:
            mapping[int(value)] = mapping.get(int(value)) or free_port()
            out.append(f"{flag}={mapping[int(value)]}")
        elif is_port_flag(arg) and i + 1 < len(args) and args[i + 1].isdigit() \
                and int(args[i + 1]) > 0:
            old = int(args[i + 1])
            mapping[old] = mapping.get(old) or free_port()
            out += [arg, str(mapping[old])]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out, mapping


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


class HostRun:
    """Processes started from deployment files; `close()` stops every one of them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, turnout_args: Sequence[str], env: Mapping[str, str]) -> \
            subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TURNOUT_")}
        full_env.update(env)
        full_env["PYTHONUNBUFFERED"] = "1"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "turnout", *turnout_args],
                                    stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env)
        self.procs.append((name, proc, log))
        return proc

    def check_alive(self) -> None:
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n"
                                     f"{log.read_text(errors='replace')[-3000:]}")

    def logs(self) -> str:
        return "\n".join(f"----- {name} (exit {proc.returncode}) -----\n"
                         f"{log.read_text(errors='replace')[-3000:]}"
                         for name, proc, log in self.procs)

    def close(self) -> None:
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def chat(base_url: str, model: str = "mock", prompt: str = "hello there") -> dict:
    resp = httpx.post(f"{base_url}/v1/chat/completions", timeout=30, json={
        "model": model, "max_tokens": 8,
        "messages": [{"role": "user", "content": prompt}]})
    assert resp.status_code == 200, resp.text
    return resp.json()


__all__ = ["ROOT", "HostRun", "chat", "flag_value", "free_port", "get_ok", "remap_ports"]
