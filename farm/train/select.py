"""Checkpoint selection (a training stage's `select`): score the model on the study's dev rows
every few steps and keep the best state as the stage's artifact, as ScalingAlignment trains
(`training/utils/process_manager.py`: the dev reward every 500 of 4,000 steps; the checkpoint
with the highest is evaluated). Training for a fixed number of steps and choosing on dev rows
makes stages of different data sizes comparable without tuning each one's length."""

from __future__ import annotations

from transformers import TrainerCallback

from farm.data.prepare import dev_records
from farm.registry import metrics


class SelectBest(TrainerCallback):
    """Scores the model with `score(model, tokenizer) -> {value name: number}` (on rank 0) before
    training (logged, not a candidate, as in the reference), every `select.every` optimizer steps
    and at the last step; keeps a CPU copy of the trainable weights of the best state and puts them
    back when training ends, so the stage saves the chosen state. A stage resumed after its worker
    died chooses among the states scored since the resume (the kept copy is not checkpointed)."""

    def __init__(self, select, score, report=None, stage: str = ""):
        self.select, self.score, self.report, self.stage = select, score, report, stage
        self.value = select.value or select.metric
        self.history: list[tuple[int, float]] = []
        self.best: tuple[int, float, dict] | None = None  # (step, value, trainable weights)

    def _measure(self, state, model, tokenizer) -> float:
        """The dev score, on rank 0, shared with every rank: each reports it, since a report under
        Ray Train is a collective that every worker must join."""
        value = None
        if state.is_world_process_zero:
            training = model.training
            values = self.score(model, tokenizer)
            model.train(training)
            if self.value not in values:
                raise ValueError(
                    f"select.value: {self.value!r} is not a value of metric {self.select.metric}; "
                    f"its values: {', '.join(k for k, v in values.items() if isinstance(v, (int, float)))}"
                )
            value = float(values[self.value])
            self.history.append((state.global_step, value))
        value = _from_rank_zero(value)
        if self.report:
            self.report({"stage": self.stage, "step": state.global_step, "max_steps": state.max_steps, f"dev_{self.value}": value})
        return value

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._measure(state, model, processing_class)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        step = state.global_step
        if not (step % self.select.every == 0 or step == state.max_steps):
            return
        value = self._measure(state, model, processing_class)
        better = self.best is None or (value > self.best[1] if self.select.mode == "max" else value < self.best[1])
        if better and state.is_world_process_zero:  # rank 0 saves the artifact: only it keeps the state
            weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
            self.best = (step, value, weights)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.best is None or self.best[0] == state.global_step:
            return
        import torch

        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, saved in self.best[2].items():
                params[name].copy_(saved)

    def summary(self) -> dict:
        if self.best is None:  # a rank that does not score
            return {}
        return {
            "selected_step": self.best[0],
            f"selected_dev_{self.value}": self.best[1],
            "select_history": [[step, value] for step, value in self.history],
        }


def _from_rank_zero(value):
    """`value` as rank 0 has it, on every rank of a process group (as it is without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def select_callback(study, stage, name: str, inputs: dict, report=None) -> SelectBest:
    """The stage's `select` as a callback: its metric, on the study's dev rows, with the eval's
    settings (generation, lengths, batch size) and the judge it names read from its artifact."""
    select = stage.select
    metric = metrics.get(select.metric)
    records = dev_records(study, metric.shape, select.limit)
    judge = select.reward_model
    # A hub judge is read at the commit the stage pins (the eval's own revisions stay for the eval's judge).
    spec = study.eval.model_copy(
        update={
            "reward_model": str(inputs.get(judge, judge)) if judge else study.eval.reward_model,
            "limit": None,
            "revisions": {**study.eval.revisions, **stage.revisions},
        }
    )

    def score(model, tok) -> dict:
        return metric.fn(model, None, tok, records, spec)

    return SelectBest(select, score, report, name)
