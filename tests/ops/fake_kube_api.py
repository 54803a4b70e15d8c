"""A small stand-in for the Kubernetes API server: the pod endpoints discovery uses, over HTTP.

No runnable kube-apiserver is packaged for this machine (Debian ships kubectl only; PyPI has
clients, not servers), so this speaks the part of the REST API that `KubernetesDiscovery` and
the `kubernetes` client use, on 127.0.0.1, with the API server's semantics:

- `GET /api/v1/namespaces/NS/pods?labelSelector=...`: a PodList with a resourceVersion;
- the same with `watch=true`: a chunked stream of `{"type", "object"}` lines for every change
  after `resourceVersion` (all current pods as ADDED when it is empty or "0"); a pod that stops
  or starts matching the selector arrives as DELETED or ADDED; a version older than the retained
  history gets a 410 ERROR event, as a compacted etcd does; `timeoutSeconds` ends the stream;
- `GET` / `PATCH` (JSON merge patch, or strategic merge, the same for maps) of one pod;
- `GET /apis/apps/v1/namespaces/NS/deployments/NAME` and `GET` / `PATCH` (merge) of its `scale`
  subresource, the part the planner's kubernetes connector uses; scaling down drops
  `status.readyReplicas` to the new count at once (those pods are terminating, so not ready);
- a bearer token checked on every request (401 otherwise).
The test drives the rest the way kubelet and controllers would: it creates pods, flips their
readiness, deletes them, compacts history and cuts watch connections, creates Deployments and
says how many of their pods are ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit


def make_pod(name: str, labels: dict[str, str] | None = None,
             annotations: dict[str, str] | None = None, ip: str = "127.0.0.1",
             ready: bool = True, phase: str = "Running") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": dict(labels or {}),
                     "annotations": dict(annotations or {})},
        "spec": {"containers": [{"name": "main", "image": "turnout"}]},
        "status": {"phase": phase, "podIP": ip if phase == "Running" else "",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-joined."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif " " in term:
            raise ValueError(f"unsupported selector term {term!r}")
        elif term not in labels:
            return False
    return True


@dataclass
class _Change:
    version: int
    namespace: str
    old: dict[str, Any] | None
    new: dict[str, Any] | None  # None: deleted (then `old` is the last state)


class FakeKubeApi:
    def __init__(self, token: str = "test-token") -> None:
        self.token = token
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.deployments: dict[tuple[str, str], dict[str, Any]] = {}
        self.version = 100
        self.history: list[_Change] = []
        self.oldest = 0  # versions below this are compacted away
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.port = 0
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._watch_writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # ends every handler's read, keep-alive or watch
        async with self._changed:
            self._changed.notify_all()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)

    def kubeconfig(self, namespace: str = "default") -> str:
        """A kubeconfig (YAML is a superset of JSON) that points the client here."""
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester",
                                                      "namespace": namespace}}],
        })

    # -- what kubelet and controllers do -------------------------------------------------------

    async def put_pod(self, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
        """Create or replace a pod (a new resourceVersion either way)."""
        key = (namespace, pod["metadata"]["name"])
        return await self._commit(namespace, self.pods.get(key), copy.deepcopy(pod))

    async def set_ready(self, namespace: str, name: str, ready: bool) -> dict[str, Any]:
        pod = copy.deepcopy(self.pods[(namespace, name)])
        pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
        return await self._commit(namespace, self.pods[(namespace, name)], pod)

    async def delete_pod(self, namespace: str, name: str) -> None:
        await self._commit(namespace, self.pods[(namespace, name)], None)

    def put_deployment(self, namespace: str, name: str, replicas: int,
                       ready: int | None = None) -> None:
        """Create or replace a Deployment with `ready` (default: all) of its pods ready."""
        self.version += 1
        self.deployments[(namespace, name)] = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace,
                         "resourceVersion": str(self.version)},
            "spec": {"replicas": replicas,
                     "selector": {"matchLabels": {"app.kubernetes.io/name": name}}},
            "status": {"replicas": replicas,
                       "readyReplicas": replicas if ready is None else ready}}

    def set_ready_replicas(self, namespace: str, name: str, ready: int) -> None:
        """What the ReplicaSet controller reports as the Deployment's pods pass readiness."""
        dep = self.deployments[(namespace, name)]
        self.version += 1
        dep["metadata"]["resourceVersion"] = str(self.version)
        dep["status"]["readyReplicas"] = min(ready, dep["spec"]["replicas"])

    def scale_by_hand(self, namespace: str, name: str, replicas: int) -> None:
        """`kubectl scale` by someone else."""
        self._scale(self.deployments[(namespace, name)], replicas)

    def _scale(self, dep: dict[str, Any], replicas: int) -> None:
        self.version += 1
        dep["metadata"]["resourceVersion"] = str(self.version)
        dep["spec"]["replicas"] = replicas
        dep["status"]["replicas"] = replicas
        dep["status"]["readyReplicas"] = min(dep["status"].get("readyReplicas", 0), replicas)

    def compact(self) -> None:
        """Forget the history so far: a watch from any older version gets 410 Gone."""
        self.oldest = self.version + 1
        self.history.clear()

    def cut_watches(self) -> None:
        """Drop every open watch connection mid-stream (an API server restart, a proxy hiccup)."""
        for writer in list(self._watch_writers):
            writer.transport.abort()
        self._watch_writers.clear()

    def watch_count(self) -> int:
        return len(self._watch_writers)

    async def _commit(self, namespace: str, old: dict[str, Any] | None,
                      new: dict[str, Any] | None) -> dict[str, Any]:
        self.version += 1
        name = (new or old or {})["metadata"]["name"]
        if new is None:
            del self.pods[(namespace, name)]
        else:
            new["metadata"]["resourceVersion"] = str(self.version)
            new["metadata"]["namespace"] = namespace
            self.pods[(namespace, name)] = new
        self.history.append(_Change(self.version, namespace, copy.deepcopy(old),
                                    copy.deepcopy(new)))
        async with self._changed:
            self._changed.notify_all()
        return copy.deepcopy(new or old or {})

    # -- HTTP ----------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                url = urlsplit(target)
                query = parse_qs(url.query)
                self.requests.append((method, url.path, query))
                if headers.get("authorization") != f"Bearer {self.token}":
                    await self._reply(writer, 401, _status(401, "Unauthorized", "no token"))
                    continue
                parts = url.path.strip("/").split("/")
                if parts[:4] == ["apis", "apps", "v1", "namespaces"] and len(parts) >= 7 \
                        and parts[5] == "deployments":
                    await self._deployment(writer, method, parts, headers, body)
                    continue
                if parts[:3] != ["api", "v1", "namespaces"] or len(parts) < 5 \
                        or parts[4] != "pods":
                    await self._reply(writer, 404, _status(404, "NotFound", url.path))
                    continue
                namespace = parts[3]
                if len(parts) == 5 and method == "GET":
                    selector = query.get("labelSelector", [""])[0]
                    if query.get("watch", ["false"])[0].lower() in ("true", "1"):
                        await self._watch(reader, writer, namespace, selector, query)
                        return
                    await self._list(writer, namespace, selector)
                elif len(parts) == 6 and method in ("GET", "PATCH"):
                    await self._one(writer, method, namespace, parts[5], headers, body)
                else:
                    await self._reply(writer, 405, _status(405, "MethodNotAllowed", method))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._watch_writers.discard(writer)
            self._writers.discard(writer)
            self._handlers.discard(task)
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()

    async def _list(self, writer: asyncio.StreamWriter, namespace: str, selector: str) -> None:
        try:
            items = [copy.deepcopy(p) for (ns, _), p in sorted(self.pods.items())
                     if ns == namespace and selector_matches(selector, _labels(p))]
        except ValueError as err:
            await self._reply(writer, 400, _status(400, "BadRequest", str(err)))
            return
        await self._reply(writer, 200, {"apiVersion": "v1", "kind": "PodList",
                                        "metadata": {"resourceVersion": str(self.version)},
                                        "items": items})

    async def _one(self, writer: asyncio.StreamWriter, method: str, namespace: str, name: str,
                   headers: dict[str, str], body: bytes) -> None:
        pod = self.pods.get((namespace, name))
        if pod is None:
            await self._reply(writer, 404, _status(404, "NotFound", f'pods "{name}" not found'))
            return
        if method == "GET":
            await self._reply(writer, 200, pod)
            return
        ctype = headers.get("content-type", "").split(";")[0]
        if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            await self._reply(writer, 415, _status(415, "UnsupportedMediaType", ctype))
            return
        patched = merge_patch(pod, json.loads(body))
        await self._reply(writer, 200, await self._commit(namespace, pod, patched))

    async def _deployment(self, writer: asyncio.StreamWriter, method: str, parts: list[str],
                          headers: dict[str, str], body: bytes) -> None:
        namespace, name, sub = parts[4], parts[6], parts[7:]
        dep = self.deployments.get((namespace, name))
        if dep is None:
            await self._reply(writer, 404, _status(
                404, "NotFound", f'deployments.apps "{name}" not found'))
        elif not sub and method == "GET":
            await self._reply(writer, 200, dep)
        elif sub == ["scale"] and method in ("GET", "PATCH"):
            if method == "PATCH":
                ctype = headers.get("content-type", "").split(";")[0]
                if ctype not in ("application/merge-patch+json",
                                 "application/strategic-merge-patch+json"):
                    await self._reply(writer, 415, _status(415, "UnsupportedMediaType", ctype))
                    return
                replicas = (json.loads(body).get("spec") or {}).get("replicas")
                if not isinstance(replicas, int) or replicas < 0:
                    await self._reply(writer, 422, _status(422, "Invalid", "spec.replicas"))
                    return
                self._scale(dep, replicas)
            await self._reply(writer, 200, {
                "apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": name, "namespace": namespace,
                             "resourceVersion": dep["metadata"]["resourceVersion"]},
                "spec": {"replicas": dep["spec"]["replicas"]},
                "status": {"replicas": dep["status"]["replicas"],
                           "selector": f"app.kubernetes.io/name={name}"}})
        else:
            await self._reply(writer, 405, _status(405, "MethodNotAllowed", method))

    async def _watch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     namespace: str, selector: str, query: dict[str, list[str]]) -> None:
        self._watch_writers.add(writer)
        gone = asyncio.Event()

        async def notice_client_leaving() -> None:
            with contextlib.suppress(Exception):
                await reader.read()  # a watch client sends nothing more: EOF means it left
            gone.set()
            async with self._changed:
                self._changed.notify_all()

        eof = asyncio.create_task(notice_client_leaving())
        try:
            await self._stream_changes(writer, namespace, selector, query, gone)
        finally:
            eof.cancel()

    async def _stream_changes(self, writer: asyncio.StreamWriter, namespace: str, selector: str,
                              query: dict[str, list[str]], gone: asyncio.Event) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        timeout = float(query.get("timeoutSeconds", ["1800"])[0])
        deadline = asyncio.get_running_loop().time() + timeout
        since = query.get("resourceVersion", [""])[0]
        if since in ("", "0"):
            for (ns, _), pod in sorted(self.pods.items()):
                if ns == namespace and selector_matches(selector, _labels(pod)):
                    await _send_chunk(writer, {"type": "ADDED", "object": pod})
            seen = self.version
        else:
            seen = int(since)
            if seen < self.oldest - 1:
                await _send_chunk(writer, {"type": "ERROR", "object": _status(
                    410, "Expired", f"too old resource version: {seen} ({self.oldest})")})
                await _end_chunks(writer)
                return
        while True:
            for change in [c for c in self.history if c.version > seen]:
                seen = change.version
                if change.namespace != namespace:
                    continue
                event = _event_for(change, selector)
                if event is not None:
                    await _send_chunk(writer, event)
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or self._closing or gone.is_set():
                break
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._changed.wait_for(
                            lambda s=seen: self.version > s or self._closing or gone.is_set()),
                        left)
        await _end_chunks(writer)


def _labels(pod: dict[str, Any]) -> dict[str, str]:
    return pod["metadata"].get("labels") or {}


def _event_for(change: _Change, selector: str) -> dict[str, Any] | None:
    was = change.old is not None and selector_matches(selector, _labels(change.old))
    now = change.new is not None and selector_matches(selector, _labels(change.new))
    if change.new is None:
        return {"type": "DELETED", "object": change.old} if was else None
    if was and now:
        return {"type": "MODIFIED", "object": change.new}
    if now:
        return {"type": "ADDED", "object": change.new}
    if was:
        return {"type": "DELETED", "object": change.new}
    return None


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": message}


async def _send_chunk(writer: asyncio.StreamWriter, obj: Any) -> None:
    data = json.dumps(obj).encode() + b"\n"
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


async def _end_chunks(writer: asyncio.StreamWriter) -> None:
    writer.write(b"0\r\n\r\n")
    await writer.drain()
