"""Checkpoint selection on dev rows (a training stage's `select`): the dev split beside the eval
rows, the study checks, and the stage saving the state that scored best, in-process on a tiny
model (no Ray)."""

import pytest
import torch

from farm.config import StudyError
from farm.data.prepare import dev_records, eval_records, load_split, part_of
from farm.grid import expand
from farm.plan import plan_trial
from farm.store import Store
from farm.train.select import SelectBest


@pytest.fixture
def doc(tiny_doc):
    tiny_doc.pop("grid")
    tiny_doc["data"]["dev"] = 0.5
    tiny_doc["stages"].pop("dpo")
    tiny_doc["stages"]["sft"].update(max_steps=6, select={"metric": "perplexity", "mode": "min", "every": 2, "limit": 8})
    return tiny_doc


def study_of(doc):
    return expand(doc, "s.yaml")[0].study


# ---------------------------------------------------------------- dev rows


def test_dev_rows_are_a_share_of_the_held_out_rows_that_the_eval_never_scores(doc):
    study = study_of(doc)
    data = study.data
    dev, ev, train = (load_split(data, part) for part in ("dev", "eval", "train"))
    ids = {part: {r.id for r in rows} for part, rows in (("dev", dev), ("eval", ev), ("train", train))}
    assert ids["dev"] and ids["eval"] and not ids["dev"] & ids["eval"] and not (ids["dev"] | ids["eval"]) & ids["train"]
    # Without dev rows the eval reads every held-out row: dev rows only move rows from eval to dev.
    no_dev = {r.id for r in load_split(data.model_copy(update={"dev": 0.0}), "eval")}
    assert no_dev == ids["dev"] | ids["eval"]
    assert {r.id for r in load_split(data, "heldout")} == no_dev
    assert {r.id for r in eval_records(study.model_copy(update={"eval": study.eval.model_copy(update={"limit": None})}))} == ids["eval"]
    assert [r.id for r in dev_records(study, "comparison", 3)] == [r.id for r in dev][:3]
    assert all(part_of(i, data) == "dev" for i in ids["dev"])


def test_a_dev_run_scores_the_dev_rows_under_its_own_eval_key(doc):
    """`eval.rows: dev` (a `dev` profile choosing a setting) scores the dev rows, never the eval
    rows a study reports, and its evaluation is another artifact than the reported one's."""
    study = study_of(doc)
    doc["eval"] = {**doc.get("eval", {}), "rows": "dev"}
    dev_run = study_of(doc)
    unlimited = {"limit": None}
    scored = {r.id for r in eval_records(dev_run.model_copy(update={"eval": dev_run.eval.model_copy(update=unlimited)}))}
    assert scored == {r.id for r in load_split(study.data, "dev")}
    assert not scored & {r.id for r in eval_records(study.model_copy(update={"eval": study.eval.model_copy(update=unlimited)}))}
    assert plan_trial(dev_run).eval_key != plan_trial(study).eval_key
    assert [s.key for s in plan_trial(dev_run).stages] == [s.key for s in plan_trial(study).stages]  # the same trained models
    doc["data"]["dev"] = 0.0
    doc["stages"]["sft"].pop("select")
    with pytest.raises(StudyError, match="eval.rows: dev scores the study's dev rows: set data.dev"):
        study_of(doc)


def test_dev_rows_key_the_eval_and_the_selecting_stage_and_retrain_nothing_else(doc):
    """Dev rows are held-out rows: giving a study some (or another share) changes no training row,
    so only what scores them moves: the eval (it scores the rest) and a stage that selects on them,
    even one that trains on other data than the study's."""
    doc["stages"]["pretrain"]["data"] = {"sources": [{"name": "hh_rlhf", "limit": 60}], "holdout": 0.2}  # its own rows
    doc["stages"]["sft"]["data"] = {"sources": [{"name": "hh_rlhf", "limit": 80}], "holdout": 0.2}
    half = plan_trial(study_of(doc))
    doc["data"]["dev"] = 0.25
    quarter = plan_trial(study_of(doc))
    assert half.stage("pretrain").key == quarter.stage("pretrain").key
    assert half.stage("sft").key != quarter.stage("sft").key  # it chose its checkpoint on other rows
    assert half.eval_key != quarter.eval_key
    doc["stages"]["sft"].pop("select")
    without = plan_trial(study_of(doc))
    doc["data"]["dev"] = 0.0
    none = plan_trial(study_of(doc))
    assert [s.key for s in without.stages] == [s.key for s in none.stages]  # no stage reads dev rows
    assert without.eval_key != none.eval_key


# ---------------------------------------------------------------- the study's checks


def test_select_needs_dev_rows_and_a_metric_that_scores_a_checkpoint(doc):
    doc["data"]["dev"] = 0.0
    with pytest.raises(StudyError, match=r"stages.sft.select: .*set data.dev"):
        study_of(doc)
    doc["data"]["dev"] = 0.5
    doc["stages"]["sft"]["select"]["metric"] = "preference_accuracy"
    with pytest.raises(StudyError, match="reads the reference model"):
        study_of(doc)
    doc["stages"]["sft"]["select"] = {"metric": "reward_score", "every": 2}
    with pytest.raises(StudyError, match="reward_model: reward_score needs a judge"):
        study_of(doc)
    doc["stages"]["sft"]["select"]["reward_model"] = "pretrain"  # a stage, but no reward model
    with pytest.raises(StudyError, match="select.reward_model: stage 'pretrain' builds model, not a reward model"):
        study_of(doc)
    doc["stages"]["sft"]["select"].pop("reward_model")
    doc["stages"]["sft"].update(select={"metric": "perplexity", "every": 2}, deepspeed="zero3")
    with pytest.raises(StudyError, match="select: checkpoint selection under ZeRO-3"):
        study_of(doc)


def test_the_judge_of_select_is_a_stage_the_key_depends_on(doc):
    doc["stages"]["judge"] = {"kind": "reward", "input": "pretrain", "max_steps": 2, "batch_size": 4, "max_length": 32, "max_prompt_length": 16}
    doc["stages"]["sft"] = doc["stages"].pop("sft")  # after the judge
    doc["stages"]["sft"]["select"] = {"metric": "reward_score", "value": "reward", "every": 2, "reward_model": "judge"}
    plan = plan_trial(study_of(doc))
    judge = plan.stage("judge")
    assert ("judge", "reward", judge.key) in plan.stage("sft").refs
    doc["stages"]["judge"]["lr"] = 1e-2  # another judge: another selection, another artifact
    assert plan_trial(study_of(doc)).stage("sft").key != plan.stage("sft").key


# ---------------------------------------------------------------- the stage keeps the best state


def trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_stage_saves_the_state_that_scored_best_not_the_last(doc, tmp_path):
    """A scripted dev score peaks at step 2 of 6: the artifact holds the weights of step 2."""
    from farm.data.prepare import training_records
    from farm.models import load_artifact
    from farm.train.base import StageContext

    study = study_of(doc)
    stage = study.stages["sft"]
    scripted = {0: 5.0, 2: 1.0, 4: 3.0, 6: 2.0}  # perplexity, lower is better: step 2 wins
    seen = {}

    def score(model, tok):
        step = len(seen) * 2
        seen[step] = trainable(model)
        return {"perplexity": scripted[step]}

    select = SelectBest(stage.select, score)
    records, _ = training_records(stage.data or study.data, study.seed, stage.shape)
    out = tmp_path / "sft"
    out.mkdir()
    ctx = StageContext("sft", stage, study.model, study.seed, None, records, out, tmp_path / "work", [select])
    metrics = ctx.stage.run(ctx)
    assert metrics["train_steps"] == 6 and sorted(seen) == [0, 2, 4, 6]
    assert select.summary() == {"selected_step": 2, "selected_dev_perplexity": 1.0, "select_history": [[0, 5.0], [2, 1.0], [4, 3.0], [6, 2.0]]}
    saved = load_artifact(out)[0].state_dict()
    assert all(torch.equal(saved[n], w) for n, w in seen[2].items() if n in saved)
    assert any(not torch.equal(saved[n], w) for n, w in seen[6].items() if n in saved)  # not the last state


def test_run_stage_scores_real_dev_rows_and_records_the_choice(doc, tmp_path):
    """Through the runner: the metric on the study's dev rows, the choice in the artifact's record;
    a value the metric does not give is refused before the first step."""
    from farm.worker import run_stage

    study = study_of(doc)
    store = Store(tmp_path / "store")
    lines = []
    for planned in plan_trial(study).stages:
        run_stage(study, store, planned, "t", rank=0, report=lines.append)
    sft = plan_trial(study).stage("sft")
    metrics = store.marker("sft", sft.key)["metrics"]
    history = metrics["select_history"]
    assert [s for s, _ in history] == [0, 2, 4, 6] and all(v > 1 for _, v in history)
    assert metrics["selected_dev_perplexity"] == min(v for s, v in history if s > 0)
    assert history[[s for s, _ in history].index(metrics["selected_step"])][1] == metrics["selected_dev_perplexity"]
    assert [line["dev_perplexity"] for line in lines if "dev_perplexity" in line] == [v for _, v in history]

    doc["stages"]["sft"]["select"]["value"] = "accuracy"
    study = study_of(doc)
    with pytest.raises(ValueError, match="select.value: 'accuracy' is not a value of metric perplexity; its values: perplexity"):
        run_stage(study, store, plan_trial(study).stage("sft"), "t", rank=0)  # a new key: the pretrained model is reused


def _two_ranks(rank: int, port: int, out) -> None:
    """One rank of a gloo group: rank 0 scores, both report the score (as Ray Train's collective
    report needs), only rank 0 keeps the best state."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from farm.schema import Select

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        scored, lines = [], []

        def score(model, tok):
            scored.append(rank)
            return {"perplexity": 3.0}

        def report(line):
            dist.barrier()  # a collective: a rank that did not report would leave the other waiting
            lines.append(line["dev_perplexity"])

        sel = SelectBest(Select(metric="perplexity", mode="min", every=1), score, report, "sft")
        state = SimpleNamespace(is_world_process_zero=rank == 0, global_step=1, max_steps=1)
        sel.on_step_end(None, state, None, model=torch.nn.Linear(2, 2), processing_class=None)
        out.put((rank, scored, lines, sel.best is not None))
    finally:
        dist.destroy_process_group()


def test_rank_zero_scores_and_every_rank_reports_the_score():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_two_ranks, args=(r, port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == [(0, [0], [3.0], True), (1, [], [3.0], False)]
