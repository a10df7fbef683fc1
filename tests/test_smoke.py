"""`--smoke` (farm/smoke.py): every profile shrinks to a valid study that keeps its graph, sources
and metrics, runs on CPUs, and covers every value of every grid axis."""

import pytest
from conftest import ROOT

from farm.grid import load_study
from farm.schema import TrainingStage
from farm.smoke import HOLDOUT, ROWS, STEPS, cover, shrink

JOBS = sorted(p.name for p in (ROOT / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("job", JOBS)
def test_a_paper_profile_keeps_its_graph_and_covers_its_grid_small(job):
    trials = load_study(ROOT / "jobs" / job, "paper")
    small = shrink(trials)
    full = trials[0].study
    for t in small:
        s = t.study
        assert s.name == f"{full.name}-smoke" and t.profile == "paper"
        # Same stages and kinds, sources, metrics and models as the profile's trial of the same id.
        same = next(x.study for x in trials if x.id == t.id)
        assert {n: st.kind for n, st in s.stages.items()} == {n: st.kind for n, st in same.stages.items()}
        assert s.eval.metrics == same.eval.metrics and s.model.base == same.model.base
        datas = [s.data, s.eval.data, *(st.data for st in s.stages.values())]
        originals = [same.data, same.eval.data, *(st.data for st in same.stages.values())]
        for d, o in zip(datas, originals):
            if d is None:
                continue
            assert [(x.name, x.origin, x.subset, x.split) for x in d.sources] == [(x.name, x.origin, x.subset, x.split) for x in o.sources]
            assert all((x.sample or x.limit) <= ROWS for x in d.sources)
        for st in s.stages.values():
            assert st.resources.gpus_per_worker == 0 and st.resources.accelerator_type is None
            if isinstance(st, TrainingStage):
                assert st.max_steps == STEPS and st.batch_size <= 4
        assert s.eval.resources.num_gpus == 0
        if 0 < s.data.holdout and s.data.dev < 1:  # dev rows take their share beside the eval's, not out of it
            assert s.data.holdout * (1 - s.data.dev) >= HOLDOUT - 1e-12 or s.data.holdout == 0.5
    # Every value of every axis but the seed is covered, with one seed (before trials that became
    # the same run are merged).
    covering = cover(trials)
    for axis in trials[0].axes:
        values = {str(t.axes[axis]) for t in trials}
        kept = {str(t.axes[axis]) for t in covering}
        assert kept == ({str(trials[0].axes["seed"])} if axis == "seed" else values), axis
    # The smoke run covers every value each axis still has once shrunk (a value the shrink made equal
    # to another is one value).
    shrunk = {t.id: _shrunk_axes(t) for t in small}
    everything = [_shrunk_axes(t) for t in shrink_each(trials)]
    for axis in trials[0].axes:
        if axis != "seed" and not any(b.startswith(axis + ".") for b in trials[0].axes):
            assert {v[axis] for v in shrunk.values()} == {v[axis] for v in everything}, axis


def _shrunk_axes(t) -> dict:
    from farm.smoke import _get

    return {a: repr(_get(t.study.model_dump(mode="json"), a)) for a in t.axes}


def shrink_each(trials):
    """Every first-seed trial shrunk, none merged: what a smoke run covers."""
    from farm.smoke import first_seed

    return [x for t in first_seed(trials) for x in shrink([t])]


def test_trials_that_became_one_run_are_run_once():
    # Study D's prompt budgets differ only in a size that the smoke run caps: they count as one value,
    # so every objective and every k is run in max(2, 3) = 3 trials, not one per (objective, k, N).
    small = shrink(load_study(ROOT / "jobs" / "diversity.yaml", "paper"))
    assert len(small) == 3
    assert {t.axes["stages.policy.objective"] for t in small} == {"pro", "sft"}
    assert {t.axes["stages.policy.data.transforms.0.ranking_length"] for t in small} == {2, 3, 4}
    assert len({t.study.stages["policy"].data.transforms[0].num_prompts for t in small}) == 1
