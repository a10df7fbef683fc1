"""The processes the farm runs: the Ray it starts or joins on the driver (`start_ray`, with
`WORKER_ENV` for every process Ray starts), and the first call of every farm task on a worker
(`quiet`)."""

from __future__ import annotations

import logging
import os
import sys

from farm.hub import runtime_env

# Quiet, offline-friendly defaults for every process Ray starts from this driver.
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
    # Ray Train's controller collects a worker's report every 2 s by default, and a worker's
    # `ray.train.report` blocks until the previous one is collected: ~1.7 s per progress line,
    # more than a tiny stage's training. Collect every 0.25 s (a hung worker is still only
    # declared dead after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # TRL imports mlflow at import time wherever it is installed (~1 s a process on 2 cores); the
    # farm's trainers report to no tracker (report_to=[]: the driver logs, farm/track.py).
    "DISABLE_MLFLOW_INTEGRATION": "TRUE",
}


def start_ray(address: str | None, verbose: bool = False) -> None:
    """Join the Ray cluster at `address` (or the one `ray start` runs on this machine), else start a
    local one. WORKER_ENV and the hub settings (HF_TOKEN among them) must reach every worker: a local
    Ray is this process's child and inherits its environment; a running cluster's nodes do not, so
    there they go in the job's runtime env. (Not for a local Ray: a runtime env makes Ray start
    fresh workers instead of its prestarted ones, ~5 s per run.)"""
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    os.environ.update({k: os.environ.get(k, v) for k, v in WORKER_ENV.items()})
    # Ray's own lookup of what ray.init(address=None) joins: $RAY_ADDRESS, else a `ray start` cluster.
    joins = bool(address) or canonicalize_bootstrap_address(None) is not None
    env = None
    if joins:
        env = runtime_env({k: os.environ[k] for k in WORKER_ENV})
    ray.init(
        address=address,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        include_dashboard=None if joins else False,
        runtime_env=env,
    )


def quiet() -> None:
    """Keep worker output to the farm's own progress lines (on a cluster the driver's
    environment does not reach the workers, so this is set in each worker)."""
    import datasets
    import ray
    import transformers

    # TRL imports wandb at import wherever it is installed (~1 s a process on 2 cores) and no setting
    # stops it. A worker never logs to a tracker (the driver does: farm/track.py), so to a Ray worker
    # wandb is not there (import machinery reads a None in sys.modules as "no such module").
    if ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        sys.modules.setdefault("wandb", None)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
