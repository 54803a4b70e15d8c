"""Every flag of `turnout planner`, with its TURNOUT_* fallback and default."""

from __future__ import annotations

import dataclasses

from common.config import ProcessConfig, opt
from services.planner.load_predictor import PREDICTORS

CONNECTORS = ["local", "kubernetes", "noop"]


@dataclasses.dataclass
class PlannerConfig(ProcessConfig):
    """Planner process."""

    planner_id: str = opt("", help="unique instance id (default: planner-<pid>-<random>)")
    planner_metrics_port: int = opt(0, help="/metrics and /health port (0: any free port)")
    adjustment_interval_s: float = opt(10.0, help="how often load is measured and replicas set")
    planner_mode: str = opt("aggregated", choices=["aggregated", "disaggregated"],
                            help="plan aggregated workers, or prefill and decode workers apart")
    load_predictor: str = opt("kalman", choices=PREDICTORS,
                              help="how the next interval's rate and lengths are predicted")
    predictor_window: int = opt(6, help="moving-average: intervals averaged")
    kalman_process_noise: float = opt(0.5, help="kalman: drift variance of the load per "
                                                "interval, relative to the measurement noise")
    kalman_measurement_noise: float = opt(1.0, help="kalman: measurement noise variance")
    arima_order: str = opt("1,1,1", help="arima: p,d,q of the model refitted each interval")
    arima_window: int = opt(60, help="arima: most recent intervals each fit uses")
    ttft_slo_ms: float = opt(500.0, help="time-to-first-token target")
    itl_slo_ms: float = opt(50.0, help="inter-token latency target")
    min_replicas: int = opt(1, help="fewest workers of each planned role (0: scale to zero "
                                    "when idle for a cooldown, and up again on demand)")
    max_replicas: int = opt(8, help="most workers of each planned role")
    max_gpus: int = opt(0, help="GPU budget over all planned roles (0: none); a worker costs "
                                "--gpus-per-worker")
    gpus_per_worker: int = opt(1, help="GPUs one worker uses, against --max-gpus")
    reactive_interval_s: float = opt(2.0, help="how often the reactive loop checks each "
                                               "worker's predicted latency (0: off)")
    reactive_scale_down_margin: float = opt(0.5, help="reactive: remove a worker only when the "
                                                      "rest would stay under this fraction of "
                                                      "both SLOs")
    ready_timeout_s: float = opt(300.0, help="started workers not ready for this long, with no "
                                             "other becoming ready, hold scale-ups (counted)")
    scale_down_cooldown_s: float = opt(60.0, help="scale down only this long after the last "
                                                  "scaling action, to the highest target seen "
                                                  "in that window")
    max_step_tokens: int = opt(8192, help="prefill tokens a worker computes in one step")
    max_batch: int = opt(256, help="sequences a worker decodes in one step")
    kv_usage_limit: float = opt(0.9, help="plan decode batches up to this KV usage fraction")
    profile: str = opt("", help="profile JSON seeding the performance model (`turnout profile` "
                                "writes one; format: services/planner/performance_model.py)")
    model_window: int = opt(4096, help="most recent engine steps the performance model fits")
    connector: str = opt("local", choices=CONNECTORS,
                         help="local: start/stop worker processes here; kubernetes: scale the "
                              "workers' Deployments; noop: observe only")
    dry_run: bool = opt(False, help="observe and log what would be scaled (the noop connector)")
    kube_namespace: str = opt("", help="kubernetes: namespace of the worker Deployments "
                                       "(default: the pod's own, else the kubeconfig context's)")
    kube_deployment: str = opt("turnout-worker", help="kubernetes: Deployment of the "
                                                      "aggregated workers")
    kube_prefill_deployment: str = opt("turnout-worker-prefill", help="kubernetes, "
                                       "disaggregated: Deployment of the prefill workers")
    kube_decode_deployment: str = opt("turnout-worker-decode", help="kubernetes, "
                                      "disaggregated: Deployment of the decode workers")
    worker_args: str = opt("", help="local: flags of the workers it starts (shell syntax), "
                                    "e.g. '--speedup-ratio 10 --drain-grace-s 5'")
    prefill_worker_args: str = opt("", help="local, disaggregated: flags of prefill workers "
                                            "(default: --worker-args)")
    decode_worker_args: str = opt("", help="local, disaggregated: flags of decode workers "
                                           "(default: --worker-args)")
    encode_max_replicas: int = opt(0, help="most encode workers (--worker-mode encode) the "
                                           "planner runs; 0: it leaves the encode pool alone")
    encode_min_replicas: int = opt(0, help="fewest encode workers (0: none when no image came "
                                           "for a cooldown; LLM workers then encode in-line)")
    encode_latency_slo_ms: float = opt(200.0, help="encode pool: add an encode worker when a "
                                                   "request's images take longer than this to "
                                                   "be embedded (mean over an interval)")
    encode_worker_args: str = opt("", help="local: flags of encode workers (default: "
                                           "--worker-args)")
    kube_encode_deployment: str = opt("turnout-worker-encode", help="kubernetes: Deployment "
                                                                    "of the encode workers")
    stop_workers_on_exit: bool = opt(True, help="local: on SIGTERM, drain and stop the workers "
                                                "this planner started")
    worker_stop_timeout_s: float = opt(40.0, help="local: how long to wait for stopped workers "
                                                  "to drain and exit (they are never killed)")
