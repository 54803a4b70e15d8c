"""Kubernetes discovery: the live instances are the Ready pods that match a label selector.

Owns turning a pod into an `Instance`, following the namespace's pods through the API server
(one LIST, then a WATCH from its resourceVersion; a relist whenever the watch breaks or its
version expired, with the difference published as events), and a process's own registration.

A pod's record is:
- the JSON `Instance` in its annotation `turnout.dev/instance`, which `register()` writes by
  patching the process's own pod. The record carries the process's id, endpoints and metadata
  exactly as with the file backend, and appears only once the process has registered (after
  its engine started), as with the file backend. Loopback or wildcard hosts in its endpoints
  are replaced by the pod IP, since no other pod could use them.
- else, only for pods that opt in with the annotation `turnout.dev/registration: labels` (a
  process that cannot patch its pod, or a non-Turnout process speaking the protocol): one
  built from label `turnout.dev/role` (frontend | router | worker | planner), optional label
  `turnout.dev/mode` (a worker's disaggregation role), annotation `turnout.dev/model`, and port
  annotations `turnout.dev/request-port`, `turnout.dev/event-port`, `turnout.dev/metrics-port`,
  `turnout.dev/http-port` (endpoints on the pod IP); its id is the pod name.
A pod is live while it is Running, has an IP, its `Ready` condition is True, it is not being
deleted, and `unregister()` has not marked it (annotation `turnout.dev/state: unregistered`).
The pod's lifetime is the lease: there is no renewal, and `lease_ttl` does not apply.

Uses the asyncio client in the `kubernetes` package (`kubernetes.aio`, the `[kubernetes]`
extra), imported on first use. The process's pod is `$TURNOUT_POD_NAME` (set it from the
downward API), else `$HOSTNAME`. Does not own the record type (`common.messages.Instance`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

import msgspec

from common.discovery.base import Discovery, matches
from common.messages import Instance

log = logging.getLogger(__name__)

DEFAULT_SELECTOR = "app.kubernetes.io/part-of=turnout"
ANNOTATION_INSTANCE = "turnout.dev/instance"
ANNOTATION_STATE = "turnout.dev/state"
ANNOTATION_MODEL = "turnout.dev/model"
ANNOTATION_REGISTRATION = "turnout.dev/registration"
REGISTRATION_LABELS = "labels"  # the pod's labels and annotations are its record
LABEL_ROLE = "turnout.dev/role"
LABEL_MODE = "turnout.dev/mode"
STATE_UNREGISTERED = "unregistered"
# port annotation → (endpoint name, URL template)
PORT_ANNOTATIONS = {
    "turnout.dev/request-port": ("request", "tcp://{ip}:{port}"),
    "turnout.dev/event-port": ("events", "tcp://{ip}:{port}"),
    "turnout.dev/http-port": ("http", "http://{ip}:{port}"),
    "turnout.dev/metrics-port": ("metrics", "http://{ip}:{port}/metrics"),
}
_SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
_UNROUTABLE_HOSTS = ("127.0.0.1", "0.0.0.0", "localhost", "::1", "::", "[::1]", "[::]")

_decoder = msgspec.json.Decoder(Instance)


class _Expired(Exception):
    """The watch's resourceVersion is gone from the server's history: relist."""


def parse_spec(spec: str) -> tuple[str, str]:
    """(namespace, label selector) of `kubernetes[:NAMESPACE][?selector=SELECTOR]`.

    An empty namespace means the pod's own (service account) namespace, else the kubeconfig
    context's, else `default`. The selector's default is `app.kubernetes.io/part-of=turnout`.
    """
    head, _, query = spec.partition("?")
    scheme, colon, namespace = head.partition(":")
    if scheme.lower() != "kubernetes":
        raise ValueError(f"not a kubernetes discovery spec: {spec!r}")
    if colon and not namespace.strip():
        raise ValueError(f"discovery spec {spec!r} names no namespace; write 'kubernetes' "
                         "alone for the pod's own namespace")
    selector = DEFAULT_SELECTOR
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if key != "selector" or not eq:
            raise ValueError(f"discovery spec {spec!r}: unknown option {part!r}; "
                             "expected 'selector=LABEL_SELECTOR'")
        selector = unquote(value)
    namespace = unquote(namespace).strip()
    if namespace.startswith("/") or "/" in namespace:
        raise ValueError(f"discovery spec {spec!r}: {namespace!r} is not a namespace name")
    return namespace, selector


def pod_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or not status.get("podIP"):
        return False
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in status.get("conditions") or ())


def instance_from_pod(pod: dict[str, Any]) -> Instance | None:
    """The record `pod` stands for, or None if it is not a live Turnout instance."""
    meta = pod.get("metadata") or {}
    annotations: dict[str, str] = meta.get("annotations") or {}
    if not pod_ready(pod) or annotations.get(ANNOTATION_STATE) == STATE_UNREGISTERED:
        return None
    name = meta.get("name", "")
    ip = pod["status"]["podIP"]
    raw = annotations.get(ANNOTATION_INSTANCE)
    if raw:
        try:
            instance = _decoder.decode(raw)
        except msgspec.DecodeError as err:
            log.warning("skipping a malformed instance annotation", extra={"fields": {
                "pod": name, "annotation": ANNOTATION_INSTANCE, "error": str(err)}})
            return None
        instance.endpoints = {k: _on_pod_ip(v, ip) for k, v in instance.endpoints.items()}
        instance.metadata = {**instance.metadata, "pod": name}
        return instance
    role = (meta.get("labels") or {}).get(LABEL_ROLE)
    if not role or annotations.get(ANNOTATION_REGISTRATION) != REGISTRATION_LABELS:
        return None  # not a Turnout pod, or its process has not registered (yet)
    endpoints: dict[str, str] = {}
    host = f"[{ip}]" if ":" in ip else ip
    for key, (endpoint, template) in PORT_ANNOTATIONS.items():
        port = annotations.get(key, "").strip()
        if port.isdigit():
            endpoints[endpoint] = template.format(ip=host, port=int(port))
    if "http" in endpoints and "metrics" not in endpoints:
        endpoints["metrics"] = endpoints["http"] + "/metrics"
    metadata: dict[str, Any] = {"pod": name}
    mode = (meta.get("labels") or {}).get(LABEL_MODE)
    if mode:
        metadata["mode"] = mode
    return Instance(id=name, role=role, model=annotations.get(ANNOTATION_MODEL, ""),
                    endpoints=endpoints, metadata=metadata)


def _on_pod_ip(endpoint: str, ip: str) -> str:
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return endpoint
    authority, slash, path = rest.partition("/")
    host, colon, port = authority.rpartition(":")
    if not colon or host not in _UNROUTABLE_HOSTS:
        return endpoint
    host = f"[{ip}]" if ":" in ip else ip
    return f"{scheme}://{host}:{port}{slash}{path}"


class KubernetesDiscovery(Discovery):
    def __init__(self, namespace: str = "", selector: str = DEFAULT_SELECTOR,
                 pod_name: str | None = None, watch_timeout_s: int = 240,
                 request_timeout_s: float = 15.0) -> None:
        super().__init__()
        self.namespace = namespace
        self.selector = selector
        self.pod_name = pod_name or os.environ.get("TURNOUT_POD_NAME") \
            or os.environ.get("HOSTNAME") or socket.gethostname()
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self._api: Any = None  # kubernetes.aio.client.ApiClient
        self._core: Any = None  # kubernetes.aio.client.CoreV1Api
        self._connect_lock = asyncio.Lock()
        self._owned: dict[str, Instance] = {}
        self._pods: dict[str, Instance] = {}  # pod name → live record, as watchers have seen
        self._resource_version: str | None = None
        self._synced = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._last_error = ""

    @classmethod
    def from_spec(cls, spec: str) -> KubernetesDiscovery:
        namespace, selector = parse_spec(spec)
        return cls(namespace, selector)

    def __repr__(self) -> str:
        return f"KubernetesDiscovery({self.namespace or '<own namespace>'!r}, {self.selector!r})"

    # -- API access ----------------------------------------------------------------------------

    async def _core_api(self) -> Any:
        async with self._connect_lock:
            if self._core is None:
                from kubernetes.aio import client

                self._api, self.namespace = await kube_api_client(self.namespace)
                self._core = client.CoreV1Api(self._api)
            return self._core

    async def _list_pods(self) -> tuple[list[dict[str, Any]], str]:
        core = await self._core_api()
        resp = await core.list_namespaced_pod_without_preload_content(
            self.namespace, label_selector=self.selector,
            _request_timeout=self.request_timeout_s)
        body = await _json_body(resp)
        return body.get("items") or [], (body.get("metadata") or {}).get("resourceVersion", "")

    async def _patch_own_annotations(self, annotations: dict[str, str | None]) -> None:
        core = await self._core_api()
        resp = await core.patch_namespaced_pod_without_preload_content(
            self.pod_name, self.namespace, {"metadata": {"annotations": annotations}},
            _content_type="application/merge-patch+json",
            _request_timeout=self.request_timeout_s)
        try:
            pod = await _json_body(resp)
        except _ApiError as err:
            raise RuntimeError(f"{self!r}: cannot annotate this process's pod "
                               f"{self.namespace}/{self.pod_name} ({err}); set TURNOUT_POD_NAME "
                               "from the downward API and allow 'patch' on pods") from err
        if self._watch_task is not None and self._synced.is_set():
            self._apply(pod)  # our own watchers see it now, not one watch round trip later

    # -- writer side ---------------------------------------------------------------------------

    async def register(self, instance: Instance) -> None:
        self._check_open()
        await self._patch_own_annotations({
            ANNOTATION_INSTANCE: msgspec.json.encode(instance).decode(),
            ANNOTATION_STATE: None})
        self._owned[instance.id] = instance

    async def update(self, instance: Instance) -> None:
        self._check_open()
        if instance.id not in self._owned:
            raise KeyError(f"instance {instance.id!r} is not registered through {self!r}")
        await self.register(instance)

    async def unregister(self, instance_id: str) -> None:
        if self._owned.pop(instance_id, None) is None:
            return
        try:
            await self._patch_own_annotations({ANNOTATION_INSTANCE: None,
                                               ANNOTATION_STATE: STATE_UNREGISTERED})
        except Exception as err:  # shutting down: the pod's deletion or readiness still tells
            log.warning("cannot unregister from the pod's annotations", extra={"fields": {
                "id": instance_id, "pod": self.pod_name, "error": str(err)}})

    # -- reader side ---------------------------------------------------------------------------

    async def list(self, role: str | None = None, model: str | None = None) -> list[Instance]:
        if self._watch_task is not None and self._synced.is_set():
            live = list(self._pods.values())
        else:
            pods, _ = await self._list_pods()
            live = [i for i in map(instance_from_pod, pods) if i is not None]
        return sorted((i for i in live if matches(i, role, model)), key=lambda i: i.id)

    def _snapshot(self) -> Iterable[Instance]:
        return self._pods.values()

    async def _start_watching(self) -> None:
        if self._watch_task is None:
            self._watch_task = asyncio.create_task(self._follow(), name=f"discovery:{self!r}")
        await self._synced.wait()

    async def _follow(self) -> None:
        """LIST then WATCH, forever; relist after any break (events may have been missed)."""
        backoff = 0.2
        while True:
            try:
                if self._resource_version is None:
                    pods, version = await self._list_pods()
                    self._replace_all(pods)
                    self._resource_version = version
                    self._synced.set()
                await self._watch_once()
                backoff = 0.2
                if self._last_error:
                    log.info("kubernetes watch restored", extra={"fields": {"spec": repr(self)}})
                    self._last_error = ""
            except asyncio.CancelledError:
                raise
            except _Expired:
                self._resource_version = None
            except Exception as err:  # API errors, connection errors, malformed streams alike
                self._resource_version = None
                if str(err) != self._last_error:
                    self._last_error = str(err)
                    log.warning("kubernetes watch failed; retrying", extra={"fields": {
                        "spec": repr(self), "error": f"{type(err).__name__}: {err}"}})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _watch_once(self) -> None:
        core = await self._core_api()
        resp = await core.list_namespaced_pod_without_preload_content(
            self.namespace, label_selector=self.selector, watch=True,
            resource_version=self._resource_version, allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout_s,
            _request_timeout=self.watch_timeout_s + self.request_timeout_s)
        try:
            if resp.status == 410:
                raise _Expired
            if resp.status != 200:
                raise _ApiError(resp.status, (await resp.read()).decode(errors="replace")[:300])
            while line := await resp.content.readline():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Expired
                    raise _ApiError(obj.get("code", 0), obj.get("message", ""))
                if kind in ("ADDED", "MODIFIED"):
                    self._apply(obj)
                elif kind == "DELETED":
                    self._apply(obj, deleted=True)
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self._resource_version = version
        finally:
            resp.close()

    def _apply(self, pod: dict[str, Any], deleted: bool = False) -> None:
        name = (pod.get("metadata") or {}).get("name", "")
        self._set(name, None if deleted else instance_from_pod(pod))

    def _replace_all(self, pods: list[dict[str, Any]]) -> None:
        current = {(p.get("metadata") or {}).get("name", ""): p for p in pods}
        for name in self._pods.keys() - current.keys():
            self._set(name, None)
        for name, pod in current.items():
            self._set(name, instance_from_pod(pod))

    def _set(self, pod_name: str, new: Instance | None) -> None:
        old = self._pods.get(pod_name)
        if new is None:
            self._pods.pop(pod_name, None)
        else:
            self._pods[pod_name] = new
        if old is not None and new is not None and old.id != new.id:
            self._publish(old, None)  # a different process now: it left, another came
            old = None
        if old is not None or new is not None:
            self._publish(old, new)

    # -- lifecycle -----------------------------------------------------------------------------

    async def _stop_watching(self) -> None:
        self._synced.set()  # wakes watchers still waiting for the first list
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None
        if self._api is not None:
            await self._api.close()
            self._api = self._core = None


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


async def _json_body(resp: Any) -> dict[str, Any]:
    """The JSON object of a raw (aiohttp) API response; _ApiError if it is not a 2xx."""
    try:
        data = await resp.read()
    finally:
        resp.close()
    if not 200 <= resp.status < 300:
        raise _ApiError(resp.status, data.decode(errors="replace")[:300])
    body = json.loads(data)
    if not isinstance(body, dict):
        raise _ApiError(resp.status, "the response is not a JSON object")
    return body


async def kube_api_client(namespace: str) -> tuple[Any, str]:
    """An API client configured in-cluster (a pod's service account) or from $KUBECONFIG, and
    the namespace to work in: `namespace`, else the pod's own, else the kubeconfig context's,
    else "default". Raises ImportError without the kubernetes package."""
    from kubernetes.aio import client, config

    configuration = client.Configuration()
    # Read now, not at import: $KUBECONFIG may be a ':'-separated list.
    kubeconfig = os.environ.get("KUBECONFIG") or "~/.kube/config"
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration,
                                      persist_config=False)
    return client.ApiClient(configuration), namespace or _default_namespace(config, kubeconfig)


def _default_namespace(config: Any, kubeconfig: str) -> str:
    try:
        with open(_SERVICE_ACCOUNT_NAMESPACE) as f:
            namespace = f.read().strip()
        if namespace:
            return namespace
    except OSError:
        pass
    try:
        _, active = config.list_kube_config_contexts(os.path.expanduser(kubeconfig))
        return (active or {}).get("context", {}).get("namespace") or "default"
    except Exception:  # no kubeconfig: nothing says otherwise
        return "default"
