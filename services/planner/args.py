"""Every flag of `turnout planner`, with its TURNOUT_* fallback and default."""

from __future__ import annotations

import dataclasses

from common.config import ProcessConfig, opt
from services.planner.load_predictor import PREDICTORS

CONNECTORS = ["local", "noop"]


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
    ttft_slo_ms: float = opt(500.0, help="time-to-first-token target")
    itl_slo_ms: float = opt(50.0, help="inter-token latency target")
    min_replicas: int = opt(1, help="fewest workers of each planned role")
    max_replicas: int = opt(8, help="most workers of each planned role")
    scale_down_cooldown_s: float = opt(60.0, help="scale down only this long after the last "
                                                  "scaling action, to the highest target seen "
                                                  "in that window")
    max_step_tokens: int = opt(8192, help="prefill tokens a worker computes in one step")
    max_batch: int = opt(256, help="sequences a worker decodes in one step")
    kv_usage_limit: float = opt(0.9, help="plan decode batches up to this KV usage fraction")
    profile: str = opt("", help="profile JSON seeding the performance model (see "
                                "services/planner/performance_model.py)")
    model_window: int = opt(4096, help="most recent engine steps the performance model fits")
    connector: str = opt("local", choices=CONNECTORS,
                         help="local: start/stop worker processes here; noop: observe only")
    dry_run: bool = opt(False, help="observe and log what would be scaled (the noop connector)")
    worker_args: str = opt("", help="local: flags of the workers it starts (shell syntax), "
                                    "e.g. '--speedup-ratio 10 --drain-grace-s 5'")
    prefill_worker_args: str = opt("", help="local, disaggregated: flags of prefill workers "
                                            "(default: --worker-args)")
    decode_worker_args: str = opt("", help="local, disaggregated: flags of decode workers "
                                           "(default: --worker-args)")
    stop_workers_on_exit: bool = opt(True, help="local: on SIGTERM, drain and stop the workers "
                                                "this planner started")
    worker_stop_timeout_s: float = opt(40.0, help="local: how long to wait for stopped workers "
                                                  "to drain and exit (they are never killed)")

    def __post_init__(self) -> None:
        # Workers refuse --worker-mode prefill/decode until disaggregation lands, so a planner
        # that would start them could only start workers that exit.
        if self.planner_mode == "disaggregated" and self.connector == "local" \
                and not self.dry_run:
            raise ValueError("--planner-mode disaggregated: prefill/decode workers are not "
                             "available yet, so the local connector cannot start them; "
                             "observe with --dry-run or --connector noop")
