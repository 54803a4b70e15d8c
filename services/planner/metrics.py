"""The planner's Prometheus series (prefix `turnout_planner_`), in their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class PlannerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.predicted_rate = Gauge("turnout_planner_predicted_request_rate",
                                    "Requests/s predicted for the next interval", registry=r)
        self.predicted_input = Gauge("turnout_planner_predicted_input_tokens",
                                     "Mean uncached prompt tokens per request predicted",
                                     registry=r)
        self.predicted_output = Gauge("turnout_planner_predicted_output_tokens",
                                      "Mean generated tokens per request predicted", registry=r)
        self.live_rate = Gauge("turnout_planner_live_request_rate",
                               "Requests/s reaching the routers over the reactive loop's last "
                               "four checks, or its last two when higher (NaN until it has two "
                               "readings)", registry=r)
        self.observed_rate = Gauge("turnout_planner_observed_request_rate",
                                   "Requests/s ended in the last interval (routers)",
                                   registry=r)
        self.observed_input = Gauge("turnout_planner_observed_input_tokens",
                                    "Uncached prompt tokens per request, last interval",
                                    registry=r)
        self.observed_output = Gauge("turnout_planner_observed_output_tokens",
                                     "Generated tokens per request, last interval", registry=r)
        self.observed_ttft = Gauge("turnout_planner_observed_ttft_seconds",
                                   "Mean time to first token at the frontends, last interval",
                                   registry=r)
        self.observed_itl = Gauge("turnout_planner_observed_itl_seconds",
                                  "Mean inter-token latency at the frontends, last interval",
                                  registry=r)
        self.needed = Gauge("turnout_planner_needed_replicas",
                            "Fractional replicas the model says the predicted load needs",
                            ["role"], registry=r)
        self.target = Gauge("turnout_planner_target_replicas",
                            "Replicas the planner applies (after clamping and cooldown)",
                            ["role"], registry=r)
        self.current = Gauge("turnout_planner_current_replicas",
                             "Workers running or starting, before this interval's action",
                             ["role"], registry=r)
        self.actions = Counter("turnout_planner_scaling_actions",
                               "Scaling decisions (with --dry-run: not carried out)",
                               ["role", "direction"], registry=r)
        self.slo_attainable = Gauge("turnout_planner_slo_attainable",
                                    "0 when even one replica's smallest step misses the SLO",
                                    ["phase"], registry=r)
        self.correction = Gauge("turnout_planner_latency_correction",
                                "Observed / model latency factor applied to step times",
                                ["slo"], registry=r)
        self.model_r2 = Gauge("turnout_planner_model_fit_r2",
                              "R² of the step-time fit (NaN before a fit)", registry=r)
        self.model_rmse = Gauge("turnout_planner_model_fit_rmse_ms",
                                "RMS error of the step-time fit", registry=r)
        self.model_samples = Gauge("turnout_planner_model_samples",
                                   "Engine steps in the fit, by phase", ["phase"], registry=r)
        self.model_source = Gauge("turnout_planner_model_source",
                                  "1 for where each phase's coefficients come from",
                                  ["phase", "source"], registry=r)
        self.adjustments = Counter("turnout_planner_adjustments", "Adjustment intervals run",
                                   registry=r)
        self.scrape_errors = Counter("turnout_planner_scrape_errors",
                                     "Failed /metrics scrapes, by the target's role", ["target"],
                                     registry=r)
        self.predictor = Gauge("turnout_planner_load_predictor",
                               "1 for the load predictor in use", ["predictor"], registry=r)
        self.prediction_abs_error = Gauge(
            "turnout_planner_prediction_abs_error",
            "|predicted - observed| of the last interval, in the series' unit (req/s, tokens)",
            ["series"], registry=r)
        self.prediction_error_ratio = Gauge(
            "turnout_planner_prediction_error_ratio",
            "Sum |predicted - observed| / sum |observed| over the last 12 scored intervals",
            ["series"], registry=r)
        self.ready = Gauge("turnout_planner_ready_replicas",
                           "Workers of the role serving (registered; Ready pods)", ["role"],
                           registry=r)
        self.start_timeouts = Counter("turnout_planner_start_timeouts",
                                      "Times a role had workers not ready for --ready-timeout-s "
                                      "with none becoming ready", ["role"], registry=r)
        self.scale_up_held = Gauge("turnout_planner_scale_up_held",
                                   "1 while scale-ups wait for stuck workers to become ready",
                                   ["role"], registry=r)
        self.external_changes = Counter("turnout_planner_external_replica_changes",
                                        "Replica counts changed outside the planner (adopted)",
                                        ["role"], registry=r)
        self.budget_gpus = Gauge("turnout_planner_gpu_budget",
                                 "--max-gpus (0: no budget)", registry=r)
        self.gpus_targeted = Gauge("turnout_planner_target_gpus",
                                   "GPUs the applied targets use, over all roles", registry=r)
        self.budget_limited = Counter("turnout_planner_budget_limited",
                                      "Targets the GPU budget lowered", ["role"], registry=r)
        self.reactive_actions = Counter("turnout_planner_reactive_actions",
                                        "Workers added or removed by the reactive loop (also "
                                        "in scaling_actions)", ["role", "direction"],
                                        registry=r)
        self.worker_pressure = Gauge("turnout_planner_least_worker_pressure",
                                     "Least predicted latency / SLO over the role's workers "
                                     "(above 1: every worker is over target)", ["role"],
                                     registry=r)
        self.waiting = Gauge("turnout_planner_waiting_requests",
                             "Requests waiting for a first token at the frontends, last probe",
                             registry=r)
        self.scale_from_zero = Counter("turnout_planner_scale_from_zero",
                                       "Roles started from zero workers because requests "
                                       "waited", ["role"], registry=r)
        self.connector_errors = Counter("turnout_planner_connector_errors",
                                        "Failed observe/scale calls of a connector", ["role"],
                                        registry=r)
        self.model_r2.set(float("nan"))
        self.model_rmse.set(float("nan"))
