"""The frontend's reading of the gateway headers into `GenerateRequest.target_worker`."""

from __future__ import annotations

import pytest

from services.frontend.app import _target_worker
from services.frontend.errors import ApiError


def scope(*headers: tuple[bytes, bytes]) -> dict[str, object]:
    return {"headers": list(headers)}


def test_no_header_no_target() -> None:
    assert _target_worker(scope((b"content-type", b"application/json"))) is None


def test_instance_id_wins_over_endpoint() -> None:
    assert _target_worker(scope((b"x-gateway-destination-endpoint", b"10.0.0.1:8000"),
                                (b"x-worker-instance-id", b"w1"))) == "w1"


@pytest.mark.parametrize(("value", "target"), [
    (b"10.0.0.1:8000", "10.0.0.1:8000"),
    (b"10.0.0.1:8000, 10.0.0.2:8000", "10.0.0.1:8000,10.0.0.2:8000"),
    (b"[fd00::1]:8000", "[fd00::1]:8000"),
    (b"pod.example:80", "pod.example:80"),
])
def test_endpoint_header(value: bytes, target: str) -> None:
    assert _target_worker(scope((b"x-gateway-destination-endpoint", value))) == target


@pytest.mark.parametrize("value", [b"", b"10.0.0.1", b"10.0.0.1:", b":8000", b"10.0.0.1:0",
                                   b"10.0.0.1:70000", b"10.0.0.1:80a", b"10.0.0.1:8000,",
                                   b"a b:80", "10.0.0.1:\u0668".encode()])
def test_malformed_endpoint_is_a_400(value: bytes) -> None:
    with pytest.raises(ApiError) as err:
        _target_worker(scope((b"x-gateway-destination-endpoint", value)))
    assert err.value.status == 400 and err.value.param == "x-gateway-destination-endpoint"
