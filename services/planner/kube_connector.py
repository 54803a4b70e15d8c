"""The `kubernetes` connector: one role's workers are one Deployment, scaled through the API.

`observe()` reads the Deployment (`spec.replicas`: asked for; `status.readyReplicas`: serving);
`apply(n)` patches its `scale` subresource, which is all the planner's RBAC role allows
(k8s/20-rbac.yaml). Scaling down is a drain, not an abort: the ReplicaSet deletes pods (unready
and youngest first), each worker gets SIGTERM, leaves discovery and finishes its streams within
its grace period (the worker pod's terminationGracePeriodSeconds exceeds --drain-grace-s).

The Deployment is the source of truth, read before every decision: replicas changed by hand
(`kubectl scale`, a rollout, another controller) are noticed, counted and adopted as the new
current count, never reverted blindly and never a reason to stall (`changed_from`). Nothing here
waits for pods to become ready; the planner judges stuck starts from `ready` (`readiness`).

Uses `kubernetes.aio` (the [kubernetes] extra), configured like the discovery backend: in-cluster
service account, else $KUBECONFIG. Owns the API calls for one Deployment; does not own targets.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from common.discovery.kubernetes import kube_api_client
from services.planner.connectors import PoolState

log = logging.getLogger("turnout.planner")


class KubeApiError(RuntimeError):
    pass


class KubernetesConnector:
    def __init__(self, role: str, deployment: str, namespace: str = "",
                 request_timeout_s: float = 10.0) -> None:
        if not deployment:
            raise ValueError(f"kubernetes connector: no Deployment named for role {role!r}")
        self.role = role
        self.deployment = deployment
        self.namespace = namespace
        self.request_timeout_s = request_timeout_s
        self.desired = 0
        self.ready = 0
        self.external_changes = 0
        self._expected: int | None = None  # spec.replicas as this planner last saw or set it
        self._api: Any = None  # kubernetes.aio.client.ApiClient
        self._apps: Any = None  # kubernetes.aio.client.AppsV1Api
        self._connect_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"KubernetesConnector({self.role!r}, {self.namespace or '?'}/{self.deployment})"

    async def _apps_api(self) -> Any:
        async with self._connect_lock:
            if self._apps is None:
                try:
                    from kubernetes.aio import client
                except ImportError as exc:
                    raise KubeApiError("the kubernetes connector needs the [kubernetes] extra "
                                       "(pip install 'turnout[kubernetes]')") from exc
                self._api, self.namespace = await kube_api_client(self.namespace)
                self._apps = client.AppsV1Api(self._api)
            return self._apps

    async def observe(self) -> PoolState:
        apps = await self._apps_api()
        resp = await apps.read_namespaced_deployment_without_preload_content(
            self.deployment, self.namespace, _request_timeout=self.request_timeout_s)
        body = await self._json(resp, "read")
        desired = int((body.get("spec") or {}).get("replicas", 1))
        ready = int((body.get("status") or {}).get("readyReplicas") or 0)
        changed_from = None
        if self._expected is not None and desired != self._expected:
            changed_from = self._expected
            self.external_changes += 1
            log.warning("replicas changed outside the planner; adopting them", extra={"fields": {
                "role": self.role, "deployment": self.deployment, "was": self._expected,
                "now": desired}})
        self._expected = self.desired = desired
        self.ready = min(ready, desired)
        return PoolState(desired, self.ready, changed_from)

    def current(self) -> int:
        return self.desired

    async def apply(self, target: int) -> None:
        if target == self.desired:
            return
        apps = await self._apps_api()
        resp = await apps.patch_namespaced_deployment_scale_without_preload_content(
            self.deployment, self.namespace, {"spec": {"replicas": target}},
            _content_type="application/merge-patch+json",
            _request_timeout=self.request_timeout_s)
        await self._json(resp, "scale")
        log.info("scaled deployment", extra={"fields": {
            "role": self.role, "deployment": self.deployment, "from": self.desired,
            "to": target}})
        self._expected = self.desired = target

    async def close(self) -> None:
        """Leaves the Deployment as it is: workers outlive a planner restart on Kubernetes."""
        if self._api is not None:
            await self._api.close()
            self._api = self._apps = None

    async def _json(self, resp: Any, what: str) -> dict[str, Any]:
        try:
            data = await resp.read()
        finally:
            resp.close()
        if not 200 <= resp.status < 300:
            raise KubeApiError(f"{self!r}: {what} failed: HTTP {resp.status}: "
                               f"{data.decode(errors='replace')[:300]}")
        body = json.loads(data)
        if not isinstance(body, dict):
            raise KubeApiError(f"{self!r}: {what}: the response is not a JSON object")
        return body
