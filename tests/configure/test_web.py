"""`turnout configure --serve`: the page, its progress, result and downloads (the estimate
runner fed from a recorded aiconfigurator answer), and headless Chromium rendering it, from a
fake runner and (where aiconfigurator is installed) from the real command."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import uvicorn
import yaml

from tests.configure.recorded import DISAGG, INFEASIBLE, sweep
from turnout.configure.deployment_files import REPO_ROOT, Base, render
from turnout.configure.layout import Request, choose, frontier
from turnout.configure.main import Outcome
from turnout.configure.web import DEFAULTS, ConfigureApp, page_url
from turnout.testing.deployment import free_port

BASE = Base.find(str(REPO_ROOT))
QUERY = {"model": DISAGG.model, "gpus": str(DISAGG.gpus), "system": DISAGG.system,
         "backend": DISAGG.backend, "isl": str(DISAGG.isl), "osl": str(DISAGG.osl),
         "ttft_ms": "300", "itl_ms": "20"}


class RecordedRunner:
    """The estimate, answered from recorded sweeps once released."""

    def __init__(self) -> None:
        self.calls: list[Request] = []
        self.release = asyncio.Event()

    async def __call__(self, request: Request, base: Base, ref: str, with_profile: bool,
                       progress: Callable[[str], None]) -> Outcome:
        self.calls.append(request)
        progress("Starting experiment: agg")
        await self.release.wait()
        recorded = sweep(request)
        choice = choose(request, recorded)  # NoLayout for the infeasible one
        return Outcome(choice, render(choice, frontier(recorded), base, ref, "0.12.0"),
                       "0.12.0")


@pytest_asyncio.fixture
async def app() -> AsyncIterator[tuple[ConfigureApp, RecordedRunner]]:
    runner = RecordedRunner()
    configure_app = ConfigureApp(BASE, dict(DEFAULTS), runner)
    yield configure_app, runner
    await configure_app.close()


def client(configure_app: ConfigureApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=configure_app),
                             base_url="http://configure")


async def finished(http: httpx.AsyncClient, url: str) -> str:
    for _ in range(200):
        page = (await http.get(url)).text
        if 'http-equiv="refresh"' not in page:
            return page
        await asyncio.sleep(0.02)
    raise AssertionError("the estimate never finished")


@pytest.mark.asyncio
async def test_the_page_shows_progress_then_the_layout_plot_and_files(
        app: tuple[ConfigureApp, RecordedRunner]) -> None:
    configure_app, runner = app
    async with client(configure_app) as http:
        form = (await http.get("/")).text
        assert 'action="/estimate"' in form and 'value="Qwen/Qwen3-32B-FP8"' in form
        url = page_url(QUERY)
        first = await http.get(url)
        assert first.status_code == 200
        assert 'http-equiv="refresh"' in first.text and 'id="progress"' in first.text
        for _ in range(100):  # the estimate's task reports once it runs
            if "Starting experiment: agg" in (await http.get(url)).text:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("no progress shown")
        runner.release.set()
        page = await finished(http, url)
        assert len(runner.calls) == 1, "the same inputs share one estimate"
        assert "disaggregated: 1 prefill worker (TP4, batch 1) + 3 decode workers (TP4, " \
            "batch 15)" in page
        assert '<svg id="pareto-plot"' in page and 'id="chosen-point"' in page
        assert page.count('class="point aggregated"') == 11
        assert page.count('class="point disaggregated"') == 3
        assert "turnout up --engine vllm --model Qwen/Qwen3-32B-FP8 --prefill-workers 1 " \
            "--decode-workers 3" in page
        links = re.findall(r'href="(/files/[^"]+)"', page)
        assert any(link.endswith("/k8s/kustomization.yaml") for link in links)
        kustomization = await http.get(next(x for x in links
                                            if x.endswith("/k8s/kustomization.yaml")))
        assert kustomization.status_code == 200
        assert "attachment" in kustomization.headers["content-disposition"]
        assert yaml.safe_load(kustomization.text)["resources"] == ["../.."]
        tar = await http.get(next(x for x in links if x.endswith(".tar.gz")))
        with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
            names = set(archive.getnames())
        assert {"turnout-configure/layout.json", "turnout-configure/compose.override.yaml",
                "turnout-configure/up.sh", "turnout-configure/k8s/worker-decode.yaml"} <= names
        assert (await http.get(links[0].rsplit("/", 1)[0] + "/nope")).status_code == 404


@pytest.mark.asyncio
async def test_one_estimate_runs_at_a_time(app: tuple[ConfigureApp, RecordedRunner]) -> None:
    configure_app, runner = app
    async with client(configure_app) as http:
        await http.get(page_url(QUERY))
        other = page_url({**QUERY, "itl_ms": "10"})
        for _ in range(100):
            if "waiting for another estimate" in (await http.get(other)).text:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the second estimate did not wait")
        assert len(runner.calls) == 1
        runner.release.set()
        assert 'id="error"' in await finished(http, other)  # ITL 10 ms: none meets it
        assert len(runner.calls) == 2


@pytest.mark.asyncio
async def test_bad_input_and_failed_estimates_show_one_line_errors(
        app: tuple[ConfigureApp, RecordedRunner]) -> None:
    configure_app, runner = app
    runner.release.set()
    async with client(configure_app) as http:
        bad = await http.get(page_url({**QUERY, "gpus": "many"}))
        assert bad.status_code == 400
        assert "GPUs: expected int, got &#x27;many&#x27;" in bad.text
        assert (await http.get(page_url({**QUERY, "backend": "tgi"}))).status_code == 400
        assert not runner.calls
        page = await finished(http, page_url({**QUERY, "itl_ms": f"{INFEASIBLE.itl_ms:g}"}))
        assert 'id="error"' in page and "no configuration of Qwen/Qwen3-32B-FP8" in page
        assert (await http.post("/estimate")).status_code == 405


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe is not None:
            return exe
    pytest.skip("chromium is not installed (apt-get install -y chromium; `make test` does)")


async def render_in_chromium(url: str, tmp_path: Path) -> str:
    """The page's DOM after Chromium loaded it, and a screenshot (tmp_path/configure.png)."""
    exe = chromium()
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1000,1500"]
    shot = tmp_path / "configure.png"
    for argv in ([*common, "--dump-dom", url], [*common, f"--screenshot={shot}", url]):
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 90)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()[-2000:]
        if "--dump-dom" in argv:
            dom = out.decode()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    return dom


def assert_rendered(dom: str) -> None:
    assert '<svg id="pareto-plot"' in dom and 'id="chosen-point"' in dom
    assert len(re.findall(r'<circle class="point (aggregated|disaggregated)"', dom)) >= 2
    assert 'id="summary"' in dom and 'id="commands"' in dom and "turnout up --engine" in dom


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_chromium_renders_the_plot_and_the_layout(tmp_path: Path) -> None:
    chromium()
    runner = RecordedRunner()
    runner.release.set()
    configure_app = ConfigureApp(BASE, dict(DEFAULTS), runner)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(configure_app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base) as http:
            for _ in range(200):
                if server.started:
                    break
                await asyncio.sleep(0.05)
            await finished(http, page_url(QUERY))  # computed before Chromium looks
        dom = await render_in_chromium(base + page_url(QUERY), tmp_path)
        assert_rendered(dom)
        assert "disaggregated: 1 prefill worker (TP4, batch 1)" in dom
    finally:
        server.should_exit = True
        await serving


@pytest.mark.e2e
@pytest.mark.asyncio
@pytest.mark.timeout(300)
@pytest.mark.skipif(importlib.util.find_spec("aiconfigurator") is None,
                    reason="aiconfigurator is not installed (pip install '.[configure]'; "
                           "`make test` does)")
async def test_the_real_command_serves_a_real_estimate(tmp_path: Path) -> None:
    chromium()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNOUT_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    log = (tmp_path / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "turnout", "configure", "--serve", "--port", str(port), env=env,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        query = {**QUERY, "model": "Qwen/Qwen3-8B", "gpus": "4", "isl": "2000", "osl": "200",
                 "ttft_ms": "500", "itl_ms": "20"}
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            for _ in range(300):
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.returncode is None, (tmp_path / "serve.log").read_text()
                await asyncio.sleep(0.1)
            first = await http.get(page_url(query))
            assert 'id="progress"' in first.text
            for _ in range(1200):  # the loop serves while aiconfigurator sweeps
                page = (await http.get(page_url(query))).text
                if 'http-equiv="refresh"' not in page:
                    break
                assert (await http.get("/health")).status_code == 200
                await asyncio.sleep(0.25)
            assert 'id="error"' not in page, page
        dom = await render_in_chromium(base + page_url(query), tmp_path)
        assert_rendered(dom)
        assert "aggregated: " in dom
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        log.close()
