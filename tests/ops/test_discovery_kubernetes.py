"""The `kubernetes` discovery backend, through the real `kubernetes` client, against
`FakeKubeApi` (the pod list/watch/patch part of the API server's REST API on 127.0.0.1).

Exercised for real: kubeconfig loading (server URL, bearer token, context namespace), the
client's HTTP requests, chunked watch streams, resourceVersion bookkeeping, 410 Gone and
dropped connections (relist), merge-patching the process's own pod. Not exercised: a real
kube-apiserver's admission, RBAC, TLS and watch bookmarks (none can run here).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

pytest.importorskip("kubernetes.aio", reason="needs the [kubernetes] extra (kubernetes>=37)")

from common.discovery import open_discovery
from common.discovery.base import DiscoveryEvent
from common.discovery.kubernetes import (
    ANNOTATION_INSTANCE,
    ANNOTATION_REGISTRATION,
    ANNOTATION_STATE,
    DEFAULT_SELECTOR,
    KubernetesDiscovery,
    instance_from_pod,
    parse_spec,
)
from common.messages import Instance
from tests.ops.fake_kube_api import FakeKubeApi, make_pod

NS = "turnout-test"
PART_OF = {"app.kubernetes.io/part-of": "turnout"}


def worker_pod(name: str, ip: str = "10.1.0.7", ready: bool = True,
               labels_record: bool = True) -> dict:
    """A worker pod; `labels_record`: its labels and annotations are its record (else it is
    live only once its process registers)."""
    annotations = {"turnout.dev/request-port": "7100", "turnout.dev/event-port": "7101",
                   "turnout.dev/metrics-port": "9100", "turnout.dev/model": "org/model-a"}
    if labels_record:
        annotations[ANNOTATION_REGISTRATION] = "labels"
    return make_pod(name, {**PART_OF, "turnout.dev/role": "worker"}, annotations, ip=ip,
                    ready=ready)


class Watcher:
    """A watch() consumed by a task, so a test can wait for "no event" without cancelling it."""

    def __init__(self, disc: KubernetesDiscovery, role: str | None = None) -> None:
        self.queue: asyncio.Queue[DiscoveryEvent | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(disc.watch(role)))

    async def _run(self, events: AsyncIterator[DiscoveryEvent]) -> None:
        async for event in events:
            self.queue.put_nowait(event)
        self.queue.put_nowait(None)  # the watch ended

    async def next(self, within: float = 5.0) -> DiscoveryEvent:
        event = await asyncio.wait_for(self.queue.get(), within)
        assert event is not None, "the watch ended"
        return event

    async def none(self, within: float = 0.5) -> None:
        await asyncio.sleep(within)
        assert self.queue.empty(), f"unexpected event {self.queue.get_nowait()}"

    async def ended(self, within: float = 2.0) -> bool:
        await asyncio.wait_for(self.task, within)
        return self.queue.get_nowait() is None if self.queue.qsize() == 1 else False


async def until(predicate: Callable[[], object], within: float = 5.0,
                what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)


# -- pure parts --------------------------------------------------------------------------------


def test_spec_forms() -> None:
    assert parse_spec("kubernetes") == ("", DEFAULT_SELECTOR)
    assert parse_spec("kubernetes:prod") == ("prod", DEFAULT_SELECTOR)
    assert parse_spec("kubernetes:prod?selector=app%3Dx,tier!=db") == ("prod", "app=x,tier!=db")
    assert parse_spec("kubernetes?selector=a=b") == ("", "a=b")
    d = open_discovery("kubernetes:prod?selector=team=ml")
    assert isinstance(d, KubernetesDiscovery)
    assert (d.namespace, d.selector) == ("prod", "team=ml")
    for bad in ("kubernetes:", "kubernetes:a/b", "kubernetes:ns?label=x", "kubernetes:ns?selector"):
        with pytest.raises(ValueError, match="discovery spec"):
            open_discovery(bad)


def test_record_from_labels_and_port_annotations() -> None:
    inst = instance_from_pod(worker_pod("w-1"))
    assert inst == Instance(
        id="w-1", role="worker", model="org/model-a",
        endpoints={"request": "tcp://10.1.0.7:7100", "events": "tcp://10.1.0.7:7101",
                   "metrics": "http://10.1.0.7:9100/metrics"},
        metadata={"pod": "w-1"})
    pod = make_pod("w-2", {"turnout.dev/role": "worker", "turnout.dev/mode": "decode"},
                   {"turnout.dev/request-port": "7100", ANNOTATION_REGISTRATION: "labels"},
                   ip="fd00::5")
    inst = instance_from_pod(pod)
    assert inst is not None
    assert inst.endpoints == {"request": "tcp://[fd00::5]:7100"}
    assert inst.metadata == {"pod": "w-2", "mode": "decode"}
    front = make_pod("f", {"turnout.dev/role": "frontend"},
                     {"turnout.dev/http-port": "8000", ANNOTATION_REGISTRATION: "labels"})
    assert instance_from_pod(front).endpoints == {  # type: ignore[union-attr]
        "http": "http://127.0.0.1:8000", "metrics": "http://127.0.0.1:8000/metrics"}


def test_record_from_the_processes_own_annotation_wins_and_gets_the_pod_ip() -> None:
    own = Instance(id="worker-abc", role="worker", model="m",
                   endpoints={"request": "tcp://0.0.0.0:7100", "events": "tcp://127.0.0.1:7101",
                              "metrics": "http://0.0.0.0:9100/metrics",
                              "other": "tcp://10.9.9.9:1"},
                   metadata={"block_size": 16, "started": 12.5})
    pod = worker_pod("w-1", labels_record=False)
    pod["metadata"]["annotations"][ANNOTATION_INSTANCE] = json.dumps(
        {"id": own.id, "role": own.role, "model": own.model, "endpoints": own.endpoints,
         "metadata": own.metadata})
    inst = instance_from_pod(pod)
    assert inst == Instance(
        id="worker-abc", role="worker", model="m",
        endpoints={"request": "tcp://10.1.0.7:7100", "events": "tcp://10.1.0.7:7101",
                   "metrics": "http://10.1.0.7:9100/metrics", "other": "tcp://10.9.9.9:1"},
        metadata={"block_size": 16, "started": 12.5, "pod": "w-1"})


@pytest.mark.parametrize("change", ["not-ready", "pending", "deleting", "unregistered",
                                    "no-role", "malformed-record", "not-registered-yet"])
def test_pods_that_are_not_live_instances(change: str) -> None:
    pod = worker_pod("w-1", ready=change != "not-ready",
                     labels_record=change != "not-registered-yet")
    if change == "pending":
        pod = make_pod("w-1", {"turnout.dev/role": "worker"}, phase="Pending")
    elif change == "deleting":
        pod["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    elif change == "unregistered":
        pod["metadata"]["annotations"][ANNOTATION_STATE] = "unregistered"
    elif change == "no-role":
        del pod["metadata"]["labels"]["turnout.dev/role"]
    elif change == "malformed-record":
        pod["metadata"]["annotations"][ANNOTATION_INSTANCE] = '{"id": 5}'
    assert instance_from_pod(pod) is None
    assert instance_from_pod(worker_pod("w-1")) is not None  # the control: live as made


# -- against the API -----------------------------------------------------------------------------


@pytest_asyncio.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeKubeApi]:
    server = FakeKubeApi(token="s3cret")
    await server.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(server.kubeconfig(namespace=NS))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    try:
        yield server
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_list_and_watch_follow_readiness_deletion_and_labels(api: FakeKubeApi) -> None:
    await api.put_pod(NS, worker_pod("w-1"))
    await api.put_pod(NS, worker_pod("w-2", ready=False))
    await api.put_pod(NS, make_pod("router-1", {**PART_OF, "turnout.dev/role": "router"},
                                   {"turnout.dev/request-port": "7000",
                                    ANNOTATION_REGISTRATION: "labels"}))
    await api.put_pod(NS, make_pod("db", {"turnout.dev/role": "worker"},  # not part-of turnout
                                   {ANNOTATION_REGISTRATION: "labels"}))
    await api.put_pod("elsewhere", worker_pod("w-x"))  # another namespace
    disc = KubernetesDiscovery()  # namespace from the kubeconfig context
    try:
        assert [i.id for i in await disc.list()] == ["router-1", "w-1"]
        assert disc.namespace == NS
        assert [i.id for i in await disc.list(role="worker", model="org/model-a")] == ["w-1"]

        events = Watcher(disc, role="worker")
        first = await events.next()
        assert (first.kind, first.instance.id) == ("added", "w-1")
        await events.none()

        await api.set_ready(NS, "w-2", True)  # kubelet: readiness probe passed
        ev = await events.next()
        assert (ev.kind, ev.instance.id) == ("added", "w-2")
        await api.set_ready(NS, "w-1", False)
        ev = await events.next()
        assert (ev.kind, ev.instance.id) == ("removed", "w-1")
        await api.set_ready(NS, "w-1", True)
        assert (await events.next()).kind == "added"

        # A label change that leaves the selector: the API says DELETED for this watch.
        pod = dict(api.pods[(NS, "w-2")])
        pod["metadata"] = {**pod["metadata"], "labels": {"turnout.dev/role": "worker"}}
        await api.put_pod(NS, pod)
        ev = await events.next()
        assert (ev.kind, ev.instance.id) == ("removed", "w-2")

        # Termination: deletionTimestamp first (removed at once), then the object goes.
        pod = dict(api.pods[(NS, "w-1")])
        pod["metadata"] = {**pod["metadata"], "deletionTimestamp": "2030-01-01T00:00:00Z"}
        await api.put_pod(NS, pod)
        ev = await events.next()
        assert (ev.kind, ev.instance.id) == ("removed", "w-1")
        await api.delete_pod(NS, "w-1")
        await events.none()  # already gone: no second removal
        assert await disc.list(role="worker") == []
        # Changes in another namespace are never seen.
        await api.put_pod("elsewhere", worker_pod("w-y"))
        await events.none()
    finally:
        await disc.close()
    assert await events.ended()  # close ends watchers
    await until(lambda: api.watch_count() == 0, what="the watch connection to close")


@pytest.mark.asyncio
async def test_register_update_unregister_patch_the_own_pod(api: FakeKubeApi) -> None:
    await api.put_pod(NS, worker_pod("turnout-worker-abc12", ip="10.1.0.9",
                                     labels_record=False))
    mine = KubernetesDiscovery(NS, pod_name="turnout-worker-abc12")
    other = KubernetesDiscovery(NS, pod_name="someone-else")
    try:
        events = Watcher(other, role="worker")
        await events.none()  # Ready, but its process has not registered yet: not live

        record = Instance(id="turnout-worker-abc12", role="worker", model="org/model-a",
                          endpoints={"request": "tcp://10.1.0.9:7100",
                                     "events": "tcp://10.1.0.9:7101",
                                     "metrics": "http://10.1.0.9:9100/metrics"},
                          metadata={"block_size": 16, "started": 99.5, "mode": "aggregated"})
        await mine.register(record)
        stored = api.pods[(NS, "turnout-worker-abc12")]["metadata"]["annotations"]
        assert json.loads(stored[ANNOTATION_INSTANCE])["metadata"]["block_size"] == 16
        ev = await events.next()
        assert (ev.kind, ev.instance.id) == ("added", "turnout-worker-abc12")
        assert ev.instance.metadata == {**record.metadata, "pod": "turnout-worker-abc12"}
        assert ev.instance.endpoints == record.endpoints

        record.metadata = {**record.metadata, "started": 100.0}
        await mine.update(record)
        ev = await events.next()
        assert (ev.kind, ev.instance.metadata["started"]) == ("updated", 100.0)
        with pytest.raises(KeyError):
            await mine.update(Instance(id="not-mine", role="worker"))

        # A record whose id differs from the pod name: the old identity leaves first.
        await mine.register(Instance(id="worker-renamed", role="worker",
                                     endpoints={"request": "tcp://10.1.0.9:7100"}))
        removed, added = await events.next(), await events.next()
        assert (removed.kind, removed.instance.id) == ("removed", "turnout-worker-abc12")
        assert (added.kind, added.instance.id) == ("added", "worker-renamed")

        await mine.unregister("worker-renamed")
        ev = await events.next()
        assert (ev.kind, ev.instance.id) == ("removed", "worker-renamed")
        annotations = api.pods[(NS, "turnout-worker-abc12")]["metadata"]["annotations"]
        assert ANNOTATION_INSTANCE not in annotations
        assert annotations[ANNOTATION_STATE] == "unregistered"
        await mine.unregister("worker-renamed")  # again: not an error, no request
        patches = [r for r in api.requests if r[0] == "PATCH"]
        assert len(patches) == 4

        # A process restarted in the same pod registers again: live again.
        await mine.register(record)
        ev = await events.next()
        assert (ev.kind, ev.instance.id) == ("added", "turnout-worker-abc12")
    finally:
        await mine.close()
        await other.close()


@pytest.mark.asyncio
async def test_register_without_a_pod_is_a_clear_error(api: FakeKubeApi) -> None:
    disc = KubernetesDiscovery(NS, pod_name="no-such-pod")
    try:
        with pytest.raises(RuntimeError, match="TURNOUT_POD_NAME"):
            await disc.register(Instance(id="x", role="worker"))
    finally:
        await disc.close()


@pytest.mark.asyncio
async def test_dropped_watch_relists_and_publishes_only_the_difference(
        api: FakeKubeApi) -> None:
    for name in ("w-1", "w-2", "w-3"):
        await api.put_pod(NS, worker_pod(name))
    disc = KubernetesDiscovery(NS)
    try:
        events = Watcher(disc)
        assert sorted([(await events.next()).instance.id for _ in range(3)]) == \
            ["w-1", "w-2", "w-3"]
        await until(lambda: api.watch_count() == 1, what="the watch")
        lists_before = sum(1 for m, _, q in api.requests if m == "GET" and "watch" not in q)

        # Cut the stream, then change things before the client can reconnect; the history
        # it would resume from is compacted away too.
        api.cut_watches()
        await api.delete_pod(NS, "w-1")
        await api.set_ready(NS, "w-2", False)
        await api.put_pod(NS, worker_pod("w-4"))
        api.compact()

        got = sorted([(ev.kind, ev.instance.id) for ev in
                      [await events.next() for _ in range(3)]])
        assert got == [("added", "w-4"), ("removed", "w-1"), ("removed", "w-2")]
        await events.none()  # w-3 unchanged: no event for it
        lists_after = sum(1 for m, _, q in api.requests if m == "GET" and "watch" not in q)
        assert lists_after > lists_before
        assert [i.id for i in await disc.list()] == ["w-3", "w-4"]

        # And the new watch works.
        await until(lambda: api.watch_count() == 1, what="the watch to be re-established")
        await api.set_ready(NS, "w-2", True)
        ev = await events.next()
        assert (ev.kind, ev.instance.id) == ("added", "w-2")
    finally:
        await disc.close()


@pytest.mark.asyncio
async def test_expired_resource_version_gets_410_and_a_relist(api: FakeKubeApi) -> None:
    await api.put_pod(NS, worker_pod("w-1"))
    disc = KubernetesDiscovery(NS, watch_timeout_s=1)  # the server ends each watch after 1 s
    try:
        events = Watcher(disc)
        assert (await events.next()).instance.id == "w-1"
        # Changes the watch never sees (another namespace) move the server's version past the
        # client's; compacting them away makes the client's next watch too old: 410 Gone.
        for i in range(3):
            await api.put_pod("elsewhere", worker_pod(f"x-{i}"))
        api.compact()
        def expired_watch() -> int | None:
            for i, (method, _, q) in enumerate(api.requests):
                since = int(q.get("resourceVersion", ["0"])[0])
                if method == "GET" and q.get("watch") and since < api.oldest - 1:
                    return i + 1
            return None

        await until(expired_watch, what="a watch from the expired version")
        n = expired_watch()
        await until(lambda: any(m == "GET" and "watch" not in q
                                for m, _, q in api.requests[n:]), what="the relist after 410")
        await api.put_pod(NS, worker_pod("w-2"))
        ev = await events.next()
        assert (ev.kind, ev.instance.id) == ("added", "w-2")
        await events.none()  # the relist re-announced nothing
    finally:
        await disc.close()


@pytest.mark.asyncio
async def test_a_wrong_token_is_an_error_not_an_empty_fleet(
        api: FakeKubeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await api.put_pod(NS, worker_pod("w-1"))
    config = json.loads(api.kubeconfig(NS))
    config["users"][0]["user"]["token"] = "wrong"
    (tmp_path / "bad").write_text(json.dumps(config))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "bad"))
    disc = KubernetesDiscovery(NS)
    try:
        with pytest.raises(Exception, match="401"):
            await disc.list()
        # A watcher waits (and retries) rather than reporting an empty fleet.
        events = Watcher(disc)
        await events.none(within=1.0)
    finally:
        await disc.close()
