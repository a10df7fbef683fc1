"""What a Ray Train `TorchTrainer.fit()` costs per stage, and what running a trial's
unshared stages in one fit saves.

Runs the tiny study's SFT -> DPO chain (after a shared pretrain) twice on a local Ray, in
fresh stores: once with one fit per stage (the baseline), once as one grouped fit (what
the farm does), and prints both wall times, the fixed cost per fit, and the ratio.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import ray

from farm.cache import Store, plan_trial
from farm.spec import load_study
from farm.train.runner import run_group

TINY = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny.yaml"


def timed_chain(study, grouped: bool) -> tuple[float, float]:
    """(wall seconds of the SFT and DPO fits, seconds spent inside the training loops)."""
    plan = plan_trial(study)
    with tempfile.TemporaryDirectory() as storage:
        payload = study.model_dump(mode="json")
        run_group(payload, "bench", [plan.stages[0]], storage, in_tune=False)  # pretrain, not timed
        rest = list(plan.stages[1:])
        start = time.perf_counter()
        for group in [rest] if grouped else [[s] for s in rest]:
            run_group(payload, "bench", group, storage, in_tune=False)
        wall = time.perf_counter() - start
        store = Store(storage)
        inside = sum(store.marker(s.kind, s.key)["metrics"]["train_seconds"] for s in rest)
    return wall, inside


def main() -> int:
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    study = load_study(TINY)[0].study
    ray.init(log_to_driver=False, include_dashboard=False)
    try:
        per_stage, inside_a = timed_chain(study, grouped=False)
        grouped, inside_b = timed_chain(study, grouped=True)
    finally:
        ray.shutdown()
    n = len(study.stages) - 1
    print(f"stages timed: {n} (sft, dpo of the tiny study)")
    print(f"one fit per stage (baseline): {per_stage:6.1f} s wall, {per_stage - inside_a:5.1f} s outside training ({n} fits)")
    print(f"one fit for the group (farm): {grouped:6.1f} s wall, {grouped - inside_b:5.1f} s outside training (1 fit)")
    print(f"ratio baseline / farm: {per_stage / grouped:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
