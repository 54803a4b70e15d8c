"""Load accounting: a worker's in-flight count, active blocks and pending prefill blocks
through every transition a request makes, before and after its first token."""

from __future__ import annotations

from services.router.accounting import Accounting, RoutedRequest
from services.router.policies import Decision
from services.router.worker_pool import WorkerHandle
from tests.router.fakes import FakeClock, request, worker


def usage(w: WorkerHandle) -> tuple[int, int, int]:
    return w.inflight, w.usage.active_blocks, w.usage.pending_prefill_blocks


def placed(acc: Accounting, w: WorkerHandle, rid: str = "r1", blocks: int = 5,
           overlap: int = 2) -> RoutedRequest:
    entry = RoutedRequest(request(rid), b"fe")
    acc.place(entry, Decision(w, blocks, overlap, [1, 2]))
    return entry


def test_place_counts_the_request_its_blocks_and_its_prefill() -> None:
    acc, w = Accounting(), worker("a")
    entry = placed(acc, w)
    assert usage(w) == (1, 5, 3)
    assert (entry.worker, entry.blocks, entry.prefill_blocks, entry.hashes) == (w, 5, 3, [1, 2])
    assert "r1" in acc and len(acc) == 1 and acc.get("r1") is entry
    assert acc.on_worker(w) == [entry]


def test_first_token_ends_the_pending_prefill_once() -> None:
    acc, w = Accounting(), worker("a")
    entry = placed(acc, w)
    acc.first_token(entry)
    acc.first_token(entry)
    assert usage(w) == (1, 5, 0)


def test_finish_before_and_after_the_first_token_returns_to_zero() -> None:
    clock = FakeClock(50.0)
    acc, w = Accounting(clock), worker("a")
    before = placed(acc, w, "r1")
    after = placed(acc, w, "r2", blocks=4, overlap=4)
    acc.first_token(after)
    assert usage(w) == (2, 9, 3)
    assert acc.finish("r1") is before
    assert usage(w) == (1, 4, 0) and w.usage.released_at == 50.0
    clock.advance(1)
    acc.finish("r2")
    assert usage(w) == (0, 0, 0) and w.usage.released_at == 51.0
    assert len(acc) == 0 and before.worker is None


def test_a_release_discounts_load_reports_for_one_report_period() -> None:
    # A report taken while the request ran may arrive after its last token.
    clock = FakeClock(50.0)
    acc, w = Accounting(clock, report_period_s=0.1), worker("a")
    placed(acc, w, "r1")
    acc.finish("r1")
    assert w.usage.released_at == 50.1


def test_finish_twice_or_of_an_unknown_request_changes_nothing() -> None:
    acc, w = Accounting(), worker("a")
    placed(acc, w)
    acc.finish("r1")
    assert acc.finish("r1") is None and acc.finish("nope") is None
    assert usage(w) == (0, 0, 0)


def test_move_before_the_first_token_takes_the_prefill_along() -> None:
    acc, a, b = Accounting(), worker("a"), worker("b")
    entry = placed(acc, a)
    acc.move(entry, Decision(b, 6, 1, [9]))
    assert usage(a) == (0, 0, 0) and usage(b) == (1, 6, 5)
    assert (entry.worker, entry.hashes) == (b, [9])
    assert acc.on_worker(a) == [] and acc.on_worker(b) == [entry]


def test_move_after_the_first_token_charges_a_new_prefill_on_the_new_worker() -> None:
    acc, a, b = Accounting(), worker("a"), worker("b")
    entry = placed(acc, a)
    acc.first_token(entry)
    acc.move(entry, Decision(b, 6, 6))
    assert usage(a) == (0, 0, 0) and usage(b) == (1, 6, 0)
    acc.finish("r1")
    assert usage(b) == (0, 0, 0)


def test_stranded_request_is_on_no_worker_and_can_be_placed_again() -> None:
    acc, a, b = Accounting(), worker("a"), worker("b")
    entry = placed(acc, a)
    acc.strand(entry)
    acc.strand(entry)
    acc.first_token(entry)  # a late chunk changes nothing either
    assert usage(a) == (0, 0, 0) and entry.worker is None and "r1" in acc
    acc.move(entry, Decision(b, 5, 0))
    assert usage(b) == (1, 5, 5)
    acc.finish("r1")
    assert usage(a) == usage(b) == (0, 0, 0)


def test_many_requests_never_drive_counts_negative() -> None:
    acc, a, b = Accounting(), worker("a"), worker("b")
    entries = [placed(acc, a if i % 2 else b, f"r{i}", blocks=i + 1, overlap=i % 3)
               for i in range(10)]
    for i, e in enumerate(entries):
        if i % 3 == 0:
            acc.first_token(e)
        if i % 4 == 0:
            acc.move(e, Decision(b if e.worker is a else a, 2, 1))
        if i % 5 == 0:
            acc.strand(e)
    for e in entries:
        acc.finish(e.request_id)
        assert min(usage(a) + usage(b)) >= 0
    assert usage(a) == usage(b) == (0, 0, 0)
