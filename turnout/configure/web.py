"""`turnout configure --serve`: the same estimate as a web page (raw ASGI under uvicorn, as the
frontend; no script, nothing loaded from outside).

`GET /` is the form. `GET /estimate?model=..&gpus=..&system=..&backend=..&isl=..&osl=..&ttft_ms=..
&itl_ms=..[&profile=1]` starts that estimate (once per distinct input; the last few are kept)
as a task whose aiconfigurator runs in a child process, so the loop keeps serving; the page
reloads itself every two seconds showing progress until the layout, the Pareto frontier (inline
SVG), the `turnout up` line and links to the files (`GET /files/ID/PATH`) are there, or the
one-line error. The k8s overlay it offers names its base `../..`: it belongs in
`k8s/overlays/NAME/` of a Turnout checkout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import sys
import tarfile
import time
from collections.abc import Awaitable, Callable
from html import escape
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from turnout.configure.deployment_files import Base
from turnout.configure.estimate import EstimateError
from turnout.configure.layout import FrontierPoint, NoLayout, Request
from turnout.configure.plot import svg
from turnout.configure.run import BACKENDS, ConfigureConfig, Outcome, configure

MAX_JOBS = 16
K8S_BASE_REF = "../.."  # the overlay placed at k8s/overlays/NAME/ of a checkout
DEFAULTS = {"model": "Qwen/Qwen3-32B-FP8", "gpus": "8", "system": "h200_sxm",
            "backend": "vllm", "isl": "4000", "osl": "500", "ttft_ms": "300", "itl_ms": "20"}
FIELDS = {"model": str, "gpus": int, "system": str, "backend": str, "isl": int, "osl": int,
          "ttft_ms": float, "itl_ms": float}
LABELS = {"model": "model", "gpus": "GPUs", "system": "system", "backend": "engine",
          "isl": "input tokens (ISL)", "osl": "output tokens (OSL)",
          "ttft_ms": "TTFT target (ms)", "itl_ms": "ITL target (ms)"}
TARBALL = "turnout-configure.tar.gz"

Runner = Callable[[Request, Base | None, str, bool, Callable[[str], None]],
                  Awaitable[Outcome]]


@dataclasses.dataclass
class Job:
    id: str
    query: dict[str, str]
    started: float
    progress: list[str] = dataclasses.field(default_factory=list)
    task: asyncio.Task[None] | None = None
    outcome: Outcome | None = None
    error: str | None = None


def parse_request(query: dict[str, str]) -> Request:
    """The estimate a query asks for; ValueError (one line) when it is not one."""
    values: dict[str, Any] = {}
    for name, kind in FIELDS.items():
        raw = query.get(name, "").strip()
        try:
            values[name] = kind(raw)
        except ValueError:
            raise ValueError(f"{LABELS[name]}: expected {kind.__name__}, got {raw!r}") from None
    if values["backend"] not in BACKENDS:
        raise ValueError(f"engine: one of {', '.join(BACKENDS)}, got {values['backend']!r}")
    request = Request(**values)
    request.validate()
    return request


class ConfigureApp:
    def __init__(self, base: Base | None, defaults: dict[str, str],
                 runner: Runner = configure) -> None:
        self.base = base
        # One estimate at a time: each is a CPU-bound child process of ~300 MB.
        self.running = asyncio.Semaphore(1)
        self.defaults = defaults
        self.runner = runner
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            status, ctype, body, extra = 405, "text/plain", b"GET only\n", []
        else:
            query = {k: v[-1] for k, v in
                     parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
            status, ctype, body, extra = self.route(scope["path"], query)
        headers = [(b"content-type", ctype.encode()),
                   (b"content-length", str(len(body)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})

    def route(self, path: str, query: dict[str, str]) -> tuple[int, str, bytes,
                                                                list[tuple[bytes, bytes]]]:
        html = "text/html; charset=utf-8"
        if path == "/":
            return 200, html, self.page({**self.defaults, **query}).encode(), []
        if path == "/health":
            return 200, "application/json", b'{"status":"ok"}', []
        if path == "/estimate":
            form = {**self.defaults, **query}
            try:
                request = parse_request(form)
            except ValueError as exc:
                return 400, html, self.page(form, error=str(exc)).encode(), []
            job = self.start(request, form)
            return 200, html, self.page(form, job=job).encode(), []
        if path.startswith("/files/"):
            job_id, _, name = path[len("/files/"):].partition("/")
            job = self.jobs.get(job_id)
            if job is None or job.outcome is None:
                return 404, "text/plain", b"no such estimate (finished estimates are kept "\
                    b"a while)\n", []
            if name == TARBALL:
                body = tarball(job.outcome.files)
                ctype = "application/gzip"
            elif name in job.outcome.files:
                body = job.outcome.files[name].encode()
                ctype = "application/json" if name.endswith(".json") else "text/plain; " \
                    "charset=utf-8"
            else:
                return 404, "text/plain", b"no such file\n", []
            disposition = f'attachment; filename="{name.replace("/", "-")}"'.encode()
            return 200, ctype, body, [(b"content-disposition", disposition)]
        return 404, "text/plain", b"not found\n", []

    # -- jobs ------------------------------------------------------------------------------------

    def start(self, request: Request, form: dict[str, str]) -> Job:
        with_profile = form.get("profile") == "1"
        key = json.dumps([dataclasses.asdict(request), with_profile])
        job_id = hashlib.sha256(key.encode()).hexdigest()[:16]
        job = self.jobs.get(job_id)
        if job is not None:
            self.jobs.move_to_end(job_id)
            return job
        query = {k: form[k] for k in FIELDS} | ({"profile": "1"} if with_profile else {})
        job = Job(job_id, query, time.monotonic())
        job.task = asyncio.create_task(self._run(job, request, with_profile))
        self.jobs[job_id] = job
        while len(self.jobs) > MAX_JOBS:
            oldest = next(iter(self.jobs.values()))
            if oldest.task is not None:
                oldest.task.cancel()
            del self.jobs[oldest.id]
        return job

    async def _run(self, job: Job, request: Request, with_profile: bool) -> None:
        try:
            if self.running.locked():
                job.progress.append("waiting for another estimate to finish")
            async with self.running:
                job.outcome = await self.runner(request, self.base, K8S_BASE_REF, with_profile,
                                                job.progress.append)
        except (EstimateError, NoLayout, ValueError, OSError) as exc:
            job.error = str(exc)
        except Exception as exc:  # a failed estimate is shown, never takes the page down
            job.error = f"failed: {type(exc).__name__}: {exc}"

    async def close(self) -> None:
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    # -- the page --------------------------------------------------------------------------------

    def page(self, form: dict[str, str], job: Job | None = None, error: str | None = None) -> str:
        running = job is not None and job.outcome is None and job.error is None
        head = ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
                '<title>turnout configure</title>'
                + ('<meta http-equiv="refresh" content="2">' if running else "")
                + f"<style>{STYLE}</style></head><body><h1>turnout configure</h1>")
        parts = [head, self.form_html(form)]
        if error is not None:
            parts.append(f'<p class="error" id="error">{escape(error)}</p>')
        if job is not None and job.error is not None:
            parts.append(f'<p class="error" id="error">{escape(job.error)}</p>')
        if running:
            assert job is not None
            lines = "".join(f"<li>{escape(p)}</li>" for p in job.progress[-8:])
            parts.append(f'<section id="progress"><h2>Estimating '
                         f'({time.monotonic() - job.started:.0f} s)</h2>'
                         "<p>aiconfigurator is sweeping aggregated and disaggregated layouts "
                         f"(10-30 s); this page reloads itself.</p><ul>{lines}</ul></section>")
        if job is not None and job.outcome is not None:
            parts.append(result_html(job))
        parts.append("</body></html>")
        return "".join(parts)

    def form_html(self, form: dict[str, str]) -> str:
        rows = []
        for name in FIELDS:
            value = escape(form.get(name, ""))
            if name == "backend":
                options = "".join(f'<option{" selected" if b == form.get(name) else ""}>{b}'
                                  "</option>" for b in BACKENDS)
                field = f'<select name="backend" id="backend">{options}</select>'
            else:
                field = f'<input name="{name}" id="{name}" value="{value}">'
            rows.append(f'<label for="{name}">{LABELS[name]}</label>{field}')
        checked = " checked" if form.get("profile") == "1" else ""
        rows.append('<label for="profile">planner seed profile</label>'
                    f'<input type="checkbox" name="profile" id="profile" value="1"{checked}>')
        return (f'<form id="inputs" method="get" action="/estimate">{"".join(rows)}'
                '<button type="submit">estimate</button></form>')


def result_html(job: Job) -> str:
    assert job.outcome is not None
    layout = job.outcome.choice.layout
    doc = json.loads(job.outcome.files["layout.json"])
    r = layout.request
    pools = "".join(f"<tr><td>{p.role}</td><td>{p.workers}</td><td>TP{p.tp}"
                    f"{f' PP{p.pp}' if p.pp > 1 else ''}</td><td>{p.batch}</td>"
                    f"<td>{p.gpus_per_worker}</td></tr>" for p in layout.pools)
    others = "".join(f"<li>best {escape(mode)}: {other['tokens_per_s_per_gpu']:.1f} tokens/s "
                     f"per GPU ({escape(other['layout'])})</li>"
                     for mode, other in sorted(doc["best_by_mode"].items())
                     if mode != layout.mode)
    files = "".join(f'<li><a href="/files/{job.id}/{quote(name)}">{escape(name)}</a></li>'
                    for name in sorted(job.outcome.files))
    commands = "\n".join(doc["commands"])
    notes = "".join(f"<li>{escape(n)}</li>" for n in doc["notes"])
    return (
        '<section id="layout">'
        f"<h2>Layout: {escape(layout.mode)}</h2>"
        f'<p id="summary">{escape(layout.summary())} — {layout.gpus_used} of {r.gpus} '
        f"{escape(r.system)} GPUs, {escape(r.backend)} {escape(layout.backend_version)} "
        f"(aiconfigurator {escape(job.outcome.aiconfigurator)})</p>"
        "<table><tr><th>workers</th><th>count</th><th>parallelism</th><th>batch</th>"
        f"<th>GPUs each</th></tr>{pools}</table>"
        '<table id="predicted"><tr><th>predicted</th><th>estimate</th><th>target</th></tr>'
        f"<tr><td>TTFT</td><td>{layout.ttft_ms:.0f} ms</td><td>{r.ttft_ms:g} ms</td></tr>"
        f"<tr><td>ITL</td><td>{layout.itl_ms:.1f} ms</td><td>{r.itl_ms:g} ms</td></tr>"
        f"<tr><td>throughput</td><td>{layout.tokens_per_s_per_gpu:.1f} tokens/s per GPU"
        f"</td><td></td></tr><tr><td>per user</td><td>{layout.tokens_per_s_per_user:.1f} "
        f"tokens/s</td><td></td></tr><tr><td>requests</td><td>{layout.requests_per_s:.2f}/s "
        f"at {layout.concurrency} in flight</td><td></td></tr></table>"
        f"<ul>{others}</ul></section>"
        f'<section id="plot"><h2>Pareto frontier (meeting the targets)</h2>'
        f"{svg(_frontier(doc), layout)}</section>"
        f'<section id="run"><h2>Run it</h2><pre id="commands">{escape(commands)}</pre>'
        f"<ul>{notes}</ul></section>"
        f'<section id="files"><h2>Files</h2><ul>{files}'
        f'<li><a href="/files/{job.id}/{TARBALL}">{TARBALL}</a> (all of them)</li></ul>'
        + ("<p>The k8s overlay names its base <code>../..</code>: put its files in "
           "<code>k8s/overlays/NAME/</code> of a Turnout checkout, then <code>kubectl apply -k "
           "k8s/overlays/NAME</code>. The compose override: <code>docker compose -f "
           "docker-compose.yml -f compose.override.yaml up</code>.</p>"
           if "compose.override.yaml" in job.outcome.files else
           "<p>No k8s overlay or compose override: this turnout runs from an installed package "
           "without Turnout's k8s/ and docker-compose.yml (start it with "
           "<code>--base-dir CHECKOUT</code>).</p>")
        + "</section>")


def _frontier(doc: dict[str, Any]) -> list[FrontierPoint]:
    return [FrontierPoint(p["mode"], p["itl_ms"], p["ttft_ms"], p["tokens_per_s_per_gpu"],
                          p["tokens_per_s_per_user"], p["gpus"]) for p in doc["frontier"]]


def tarball(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"turnout-configure/{name}")
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:60em}"
         "form{display:grid;grid-template-columns:14em 22em;gap:.3em .8em;align-items:center}"
         "form button{grid-column:2;justify-self:start;margin-top:.4em}"
         "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;"
         "padding:.2em .6em;text-align:left}.error{color:#b00;font-weight:bold}"
         "pre{background:#f4f4f4;padding:.6em;white-space:pre-wrap}")


def defaults_of(cfg: ConfigureConfig) -> dict[str, str]:
    """The form's first values: the flags given, else examples."""
    given = {"model": cfg.model, "gpus": cfg.gpus, "system": cfg.system, "backend": cfg.backend,
             "isl": cfg.isl, "osl": cfg.osl, "ttft_ms": cfg.ttft_ms, "itl_ms": cfg.itl_ms}
    return {k: (f"{v:g}" if isinstance(v, float) else str(v)) if v else DEFAULTS[k]
            for k, v in given.items()}


def serve(cfg: ConfigureConfig, base: Base | None) -> None:
    import uvicorn

    app = ConfigureApp(base, defaults_of(cfg))
    print(f"turnout configure: serving http://{cfg.host}:{cfg.port}/ (Ctrl-C stops it)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", lifespan="on")


def page_url(query: dict[str, str]) -> str:
    """The estimate page's path for a query (tests, docs)."""
    return "/estimate?" + urlencode(query)
