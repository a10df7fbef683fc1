"""What a Ray Train `TorchTrainer.fit()` costs per stage, and what running a trial's
unshared stages in one fit saves.

Runs the tiny study's SFT -> DPO chain (its pretrain stage left out: SFT starts from the base
model) twice on a local Ray, each in a fresh store: once with one fit per stage (the
baseline), once as one grouped fit (what the farm does). The tiny stages train in a few seconds, so the
wall is mostly the fits' fixed cost. Prints both wall times, the time outside the training
loops, and the ratio baseline / farm (above 1: grouping saves that much); writes
`bench/results/stage_overhead.json`. No target: it shows why the farm groups stages.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.train.torch  # noqa: F401  (the driver's import of Ray Train, outside the timings)
import yaml

from farm.cache import Store, plan_trial
from farm.spec import expand
from farm.train.runner import run_group

from _results import write_result

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny.yaml"


def timed_chain(study, grouped: bool) -> tuple[float, float]:
    """(wall seconds of the SFT and DPO fits, seconds spent inside the training loops)."""
    stages = list(plan_trial(study).stages)
    with tempfile.TemporaryDirectory() as storage:
        payload = study.model_dump(mode="json")
        start = time.perf_counter()
        for group in [stages] if grouped else [[s] for s in stages]:
            run_group(payload, "bench", group, storage, in_tune=False)
        wall = time.perf_counter() - start
        store = Store(storage)
        inside = sum(store.marker(s.kind, s.key)["metrics"]["train_seconds"] for s in stages)
    return wall, inside


def main() -> int:
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    doc = yaml.safe_load(TINY.read_text())
    doc["stages"].pop("pretrain")
    study = expand(doc, str(TINY))[0].study
    ray.init(log_to_driver=False, include_dashboard=False)
    try:
        per_stage, inside_a = timed_chain(study, grouped=False)
        grouped, inside_b = timed_chain(study, grouped=True)
    finally:
        ray.shutdown()
    n = len(study.stages)
    result = {
        "stages": n,
        "per_stage_fits": {"wall_seconds": round(per_stage, 2), "outside_training_seconds": round(per_stage - inside_a, 2), "fits": n},
        "grouped_fit": {"wall_seconds": round(grouped, 2), "outside_training_seconds": round(grouped - inside_b, 2), "fits": 1},
        "ratio": round(per_stage / grouped, 2),
    }
    print(f"stage overhead: {n} stages timed (sft, dpo of the tiny study), load average {os.getloadavg()[0]:.2f}")
    print(f"  one fit per stage (baseline): {per_stage:6.1f} s wall, {per_stage - inside_a:5.1f} s outside training ({n} fits)")
    print(f"  one fit for the group (farm): {grouped:6.1f} s wall, {grouped - inside_b:5.1f} s outside training (1 fit)")
    print(f"ratio: {per_stage / grouped:.2f}x baseline / farm (no target: above 1, grouping saves that much)")
    write_result("stage_overhead", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
