"""The frontend's security and limit flags: values it cannot use are one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.frontend.args import FrontendConfig
from turnout.testing.deployment import ROOT


@pytest.mark.parametrize(("fields", "needle"), [
    ({"max_body_bytes": 0}, "--max-body-bytes must be at least 1"),
    ({"max_headers": 0}, "--max-headers"),
    ({"header_timeout_s": 0.0}, "--header-timeout-s must be positive"),
    ({"body_timeout_s": -1.0}, "--body-timeout-s"),
    ({"max_output_tokens": -1}, "--max-output-tokens must not be negative"),
    ({"max_queued_requests": 5}, "--max-queued-requests needs --max-active-requests"),
    ({"queue_timeout_s": 5.0}, "--queue-timeout-s needs --max-active-requests"),
    ({"ssl_certfile": "cert.pem"}, "--ssl-certfile and --ssl-keyfile go together"),
    ({"ssl_certfile": "/nonexistent/c.pem", "ssl_keyfile": "/nonexistent/k.pem"},
     "no such file"),
    ({"api_keys_file": "/nonexistent/keys.yaml"}, "--api-keys-file: no such file"),
    ({"tool_call_parser": "mistral"},
     "--tool-call-parser must be one of deepseek_v31, glm45, glm47, hermes, "
     "kimi_k2, llama3_json, pythonic, qwen3_coder, got"),
    ({"reasoning_parser": "r1"},
     "--reasoning-parser must be one of deepseek_r1, deepseek_v3, glm45, glm47, kimi_k2, "
     "qwen3, got"),
])
def test_refused_values(fields: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        FrontendConfig(**fields)  # type: ignore[arg-type]


def test_queue_flags_with_an_active_limit_are_fine() -> None:
    config = FrontendConfig(max_active_requests=8, max_queued_requests=5, queue_timeout_s=5.0)
    assert config.max_queued_requests == 5


def test_a_bad_keys_file_stops_the_frontend_before_it_starts(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("- id: a\n  key: k\n  requests_per_minute: 5\n")
    done = subprocess.run([sys.executable, "-m", "turnout", "frontend", "--api-keys-file",
                           str(keys)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown field `requests_per_minute`" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
