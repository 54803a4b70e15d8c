"""The admission queue through HTTP: generations beyond --max-active-requests wait (bounded, timed)
and the rest get a 503 with Retry-After, through the real `openai` client."""

from __future__ import annotations

import threading
from typing import Any

import openai
import pytest

from services.frontend.app import FrontendApp
from services.frontend.limits import AdmissionQueue
from services.frontend.metrics import FrontendMetrics
from services.frontend.tokenizer import ByteTokenizer
from tests.frontend.fake_upstream import FakeUpstream, Script
from tests.frontend.live_server import LiveServer, wait_until

MESSAGES = [{"role": "user", "content": "Zen?"}]
REPLY = list(b"Now is better than never.")


def test_waiting_room_is_bounded_and_timed() -> None:
    # ~1.25 s per reply: long enough for everything below to happen while it runs.
    fake = FakeUpstream(models=["tiny"], script=Script(reply=REPLY, delay_s=0.05,
                                                       stop_token=ByteTokenizer.EOS))
    queue = AdmissionQueue(max_active=1, max_waiting=1, wait_timeout_s=5.0)
    app = FrontendApp(fake, ByteTokenizer(), None, 4096, FrontendMetrics(), admission=queue)
    server = LiveServer(app).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                               timeout=10)
        results: dict[str, Any] = {}

        def run(name: str) -> None:
            try:
                results[name] = client.chat.completions.create(model="tiny", messages=MESSAGES)
            except openai.APIStatusError as exc:
                results[name] = exc

        first = threading.Thread(target=run, args=("first",))
        first.start()
        wait_until(lambda: queue.active == 1, 5)
        second = threading.Thread(target=run, args=("second",))
        second.start()
        wait_until(lambda: queue.waiting == 1, 5)
        with pytest.raises(openai.InternalServerError) as full:
            client.chat.completions.create(model="tiny", messages=MESSAGES)
        assert full.value.status_code == 503
        assert full.value.response.headers["retry-after"] == "1"
        assert full.value.response.json()["error"]["code"] == "overloaded"
        first.join(10)
        second.join(10)
        assert results["first"].choices[0].message.content == bytes(REPLY).decode()
        assert results["second"].choices[0].message.content == bytes(REPLY).decode()
        # Each slot is released as its response ends on the server, just after the client has it.
        wait_until(lambda: queue.active == 0 and queue.waiting == 0, 5)
        # A wait longer than the queue's timeout is a 503 too.
        queue.wait_timeout_s = 0.2
        first = threading.Thread(target=run, args=("first",))
        first.start()
        wait_until(lambda: queue.active == 1, 5)
        with pytest.raises(openai.InternalServerError) as timed_out:
            client.chat.completions.create(model="tiny", messages=MESSAGES)
        assert "within 0.2 s" in timed_out.value.response.json()["error"]["message"]
        first.join(10)
        assert len(fake.opened) == 3  # the refused requests never went upstream
    finally:
        server.stop()
