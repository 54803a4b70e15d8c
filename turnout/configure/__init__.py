"""`turnout configure`: a starting layout (aggregated or disaggregated, workers, tensor
parallelism, batch) for a model, GPU count and latency targets, from NVIDIA's aiconfigurator
estimates, and the deployment files that run it (k8s overlay, compose override, `turnout up`).

Modules: `estimate` (aiconfigurator, in a child process), `layout` (its result read, checked
against the targets, one layout chosen), `worker_flags`, `k8s_overlay`, `compose_override`,
`up_command`, `planner_profile` (the files), `plot` and `web` (the page), `main` (the command).
"""
