"""The callbacks a stage's HF trainer runs with besides its checkpoints: progress lines, and the
test-only injected faults. Apart from farm.worker so that a Tune trial, which only launches
stage groups, never imports transformers (~5 s of a trial's start on 2 cores)."""

from __future__ import annotations

import os
import signal

from transformers import TrainerCallback

from farm.store import Store


class ProgressReport(TrainerCallback):
    """Stream a stage's training logs to `report` (and so to Tune and the farm's progress lines),
    and keep the trainer's whole log history (`history`: loss, learning rate, gradient norm and the
    algorithm's own terms, each with its step) for the stage's record: the report's curves."""

    def __init__(self, stage: str, report):
        self.stage, self.report = stage, report
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.report({"stage": self.stage, "step": state.global_step, "max_steps": state.max_steps, "loss": float(logs["loss"])})

    def on_train_end(self, args, state, control, **kwargs):
        # The state's history, not the logs seen here: a resumed stage's history holds the steps
        # logged before the interruption too (the trainer restores it from the checkpoint).
        self.history = [{k: v for k, v in e.items() if isinstance(v, (int, float))} for e in state.log_history]


def fault_callbacks(fault, trial: str, store: Store, key: str, rank: int) -> list:
    """The fault-injection callback for this attempt, if the study asks for one here."""
    if fault is None or (fault.trial and fault.trial != trial):
        return []
    counter = f"faults/{key}-{trial}"  # in the store: a retry on another node reads it too
    try:
        attempt = int(store.read_text(counter)) + 1
    except FileNotFoundError:
        attempt = 1
    if fault.times is not None and attempt > fault.times:
        return []
    if rank == 0:
        store.write_text(counter, str(attempt))
    return [InjectFault(fault)]


class InjectFault(TrainerCallback):
    def __init__(self, fault):
        self.fault = fault

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.fault.at_step:
            if self.fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at step {state.global_step} (stage setting `fault`)")
