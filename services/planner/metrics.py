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
        self.model_r2.set(float("nan"))
        self.model_rmse.set(float("nan"))
