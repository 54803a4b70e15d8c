"""The router's encode stage over fakes: which encode worker gets an image, the hand-off to
placement once every embedding is back, cancels, errors and a lost encode worker."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from common.messages import (
    KIND_CANCEL,
    KIND_ENCODE,
    KIND_RESUME_ELSEWHERE,
    EncodeReply,
    GenerateRequest,
    ImageEmbedding,
    ImageInput,
    Instance,
    SamplingParams,
    encode_request_decoder,
    resume_elsewhere_decoder,
)
from services.router.accounting import Accounting
from services.router.encode_routing import EncodeRouting
from services.router.handback import HandBack
from services.router.metrics import RouterMetrics
from services.router.parking import ParkingLot
from services.router.worker_pool import WorkerHandle
from tests.router.fakes import (
    MODEL,
    FakeClock,
    FakeDealer,
    FakeSocket,
    counter,
    pool_of,
    sent,
    worker,
)


def encode_worker(worker_id: str) -> WorkerHandle:
    instance = Instance(id=worker_id, role="worker", model=MODEL,
                        endpoints={"request": f"tcp://{worker_id}:1"},
                        metadata={"mode": "encode", "block_size": 4, "started": 1.0})
    return WorkerHandle(instance, FakeDealer(instance.endpoints["request"]))  # type: ignore[arg-type]


def image(tag: str) -> ImageInput:
    return ImageInput(tag * 32, 0, 4, "image/png", b"png:" + tag.encode())


def chat(rid: str, *images: ImageInput) -> GenerateRequest:
    return GenerateRequest(rid, MODEL, list(range(10)), SamplingParams(max_tokens=4),
                           images=list(images))


class Stage:
    def __init__(self, *handles: WorkerHandle) -> None:
        self.pool = pool_of(*handles)
        self.placed: list[tuple[bytes, GenerateRequest]] = []
        self.failed: list[tuple[bytes, str, int, str]] = []
        self.clock = FakeClock()
        self.routing = EncodeRouting(self.pool, CollectorRegistry(),
                                     lambda f, r, p: self.placed.append((f, r)),
                                     lambda *a: self.failed.append(a), self.clock)

    def reply(self, worker: WorkerHandle, rid: str, cached: bool = False) -> None:
        """`worker` answers what it was last asked for `rid`."""
        asked = [encode_request_decoder.decode(f[1]) for f in sent(worker)
                 if f[0] == KIND_ENCODE]
        request = next(r for r in reversed(asked) if r.request_id == rid)
        self.routing.on_reply(worker, EncodeReply(rid, [
            ImageEmbedding(im.hash, b"emb:" + im.hash[:1].encode(), cached)
            for im in request.images]))

    def metric(self, name: str, *labels: str) -> float:
        return counter(getattr(self.routing.metrics, name), *labels)


def asked(worker: WorkerHandle) -> list[list[str]]:
    return [[im.hash[0] for im in encode_request_decoder.decode(f[1]).images]
            for f in sent(worker) if f[0] == KIND_ENCODE]


def test_no_encode_pool_places_at_once_for_in_line_encoding() -> None:
    stage = Stage()
    assert not stage.routing.takes(b"f", chat("r1", image("a")))
    assert stage.metric("images", "inline") == 1


def test_embeddings_replace_the_image_data_then_the_request_is_placed() -> None:
    e1 = encode_worker("e1")
    stage = Stage(e1)
    assert stage.routing.takes(b"f", chat("r1", image("a"), image("b"), image("a")))
    assert asked(e1) == [["a", "b"]]  # a repeated image is encoded once
    assert stage.placed == []
    stage.reply(e1, "r1")
    [(frontend, placed)] = stage.placed
    assert frontend == b"f"
    assert [(im.embedding, im.data) for im in placed.images] == [
        (b"emb:a", b""), (b"emb:b", b""), (b"emb:a", b"")]
    assert stage.metric("bytes") == 10
    assert stage.routing.pending == {}
    # The placed request needs no encoding any more.
    assert not stage.routing.takes(b"f", placed)


def test_an_image_goes_where_it_went_before_else_to_the_least_loaded() -> None:
    e1, e2 = encode_worker("e1"), encode_worker("e2")
    stage = Stage(e1, e2)
    stage.routing.takes(b"f", chat("r1", image("a")))
    stage.routing.takes(b"f", chat("r2", image("b")))
    first_a = "e1" if asked(e1) == [["a"]] else "e2"
    assert sorted(map(str, asked(e1) + asked(e2))) == ["['a']", "['b']"]  # one each
    stage.reply(e1, "r1" if first_a == "e1" else "r2")
    stage.reply(e2, "r2" if first_a == "e1" else "r1")
    stage.routing.takes(b"f", chat("r3", image("a")))
    target = e1 if first_a == "e1" else e2
    assert asked(target)[-1] == ["a"]
    assert stage.metric("routes", "affinity") == 1
    assert stage.metric("routes", "least_loaded") == 2


def test_a_lost_encode_worker_s_images_go_to_another() -> None:
    e1, e2 = encode_worker("e1"), encode_worker("e2")
    stage = Stage(e1, e2)
    stage.routing.takes(b"f", chat("r1", image("a"), image("b")))
    assert sorted(asked(e1) + asked(e2)) == [["a"], ["b"]]  # spread: one each
    [lost] = asked(e1)
    stage.pool.mark_dead(e1)
    stage.routing.worker_lost(e1)
    assert stage.metric("reencodes") == 1
    assert asked(e2)[-1] == lost
    stage.reply(e1, "r1")  # a late answer from the lost worker is ignored
    stage.reply(e2, "r1")
    assert stage.placed == []  # e2's first answer is still to come
    first = encode_request_decoder.decode(
        next(f for f in sent(e2) if f[0] == KIND_ENCODE)[1])
    stage.routing.on_reply(e2, EncodeReply("r1", [
        ImageEmbedding(im.hash, b"x", False) for im in first.images]))
    [(_, placed)] = stage.placed
    assert all(im.embedding for im in placed.images)


def test_with_no_encode_worker_left_the_request_goes_on_unencoded() -> None:
    e1 = encode_worker("e1")
    stage = Stage(e1)
    stage.routing.takes(b"f", chat("r1", image("a")))
    stage.pool.mark_dead(e1)
    stage.routing.worker_lost(e1)
    [(_, placed)] = stage.placed
    assert placed.images[0].data and not placed.images[0].embedding  # its worker encodes it


def test_cancel_reaches_the_encode_worker_and_an_error_fails_the_request() -> None:
    e1 = encode_worker("e1")
    stage = Stage(e1)
    stage.routing.takes(b"f", chat("r1", image("a")))
    assert stage.routing.cancel("r1")
    assert sent(e1)[-1][0] == KIND_CANCEL
    assert not stage.routing.cancel("r1")
    stage.routing.takes(b"f", chat("r2", image("b")))
    stage.routing.on_reply(e1, EncodeReply("r2", error_code=400, error_message="bad image"))
    assert stage.failed == [(b"f", "r2", 400, "bad image")]
    assert stage.placed == []


def test_duplicate_request_id_is_refused() -> None:
    stage = Stage(encode_worker("e1"))
    stage.routing.takes(b"f", chat("r1", image("a")))
    assert stage.routing.takes(b"g", chat("r1", image("b")))
    assert stage.failed == [(b"g", "r1", 400, "duplicate request id")]


def test_encode_workers_are_never_generation_candidates() -> None:
    stage = Stage(encode_worker("e1"), worker("w1"))
    assert [w.id for w in stage.pool.routable(MODEL)] == ["w1"]
    assert [w.id for w in stage.pool.encoders(MODEL)] == ["e1"]


def test_a_draining_router_gives_back_requests_waiting_for_embeddings() -> None:
    e1 = encode_worker("e1")
    stage = Stage(e1)
    stage.routing.takes(b"f", chat("r1", image("a")))
    frontends = FakeSocket()
    handback = HandBack(frontends, Accounting(stage.clock), ParkingLot(),
                        type("M", (), {"stranded": set()})(), RouterMetrics("r"))  # type: ignore[arg-type]
    handback.encoding = stage.routing
    assert handback.start() == 1
    [(frontend, kind, payload)] = frontends.sent
    assert (frontend, kind) == (b"f", KIND_RESUME_ELSEWHERE)
    assert resume_elsewhere_decoder.decode(payload).request_ids == ["r1"]
    assert stage.routing.pending == {} and sent(e1)[-1][0] == KIND_CANCEL
