"""A study's run, start to end: check and pin every input, plan, refuse what cannot fit, run the
grid on Ray, the steps after it, and write the table, the report and the trackers' records.
`farm run` parses its flags and calls `run_study`; everything else is here."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import ray

from farm import preflight, registry
from farm.config import StudyError
from farm.estimate import estimate_study, memory_fixes, memory_study
from farm.grid import distinct
from farm.plan import plan_study
from farm.process import start_ray
from farm.progress import Grid
from farm.report import write_report
from farm.results import ITEMS_FILE, finished, study_dir, table, write_table, write_trial
from farm.store import Store, library_versions, version_drift
from farm.track import log_trial, open_trackers
from farm.tune import INTERRUPTED, run_grid


def check_memory(trials, plans, store, where: str) -> None:
    """Refuse (StudyError) a stage or eval still to run on a GPU whose estimated peak memory exceeds
    its GPU's, naming what to change. Stages on CPUs are not checked."""
    for r in memory_study(trials, plans):
        m = r.memory
        if m is None or m.fits or store.done(r.kind, r.key):
            continue
        study = next(t.study for t in trials if t.id == r.users[0])
        parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in sorted(m.parts().items(), key=lambda kv: -kv[1]) if v >= 0.05 * 2**30)
        share = f"{m.share:g} of " if m.share < 1 else ""
        gpu = f"{share}{m.gpu}, {m.capacity / 2**30:g} GiB" + (" (assumed: no accelerator_type is set)" if m.assumed else "")
        field = "eval" if r.name == "eval" else f"stages.{r.name}"
        raise StudyError(
            f"{where}: {field}: needs an estimated {m.total / 2**30:.1f} GiB per GPU ({parts} GiB, +10% allocator slack and 1 GiB CUDA context), "
            f"more than its GPU holds: {gpu}. To fit, change in {field} one or more of:\n"
            + "\n".join(f"  - {fix}" for fix in memory_fixes(r.name, study, m))
            + "\n(farm plan shows every stage's estimate; --ignore-memory-estimate runs it anyway)"
        )


def run_study(
    trials,
    where: str,
    results: Path,
    storage: str,
    *,
    track: list[str] | None = None,
    hub_checks: bool = True,
    memory_check: bool = True,
    max_concurrent: int | None = None,
    address: str | None = None,
    verbose: bool = False,
    command_line: str = "",
) -> int:
    """Run the trials of one study file (`where`, as errors name it), validated whole; `results`:
    the results folder; `storage`: the artifact store's root. Returns the exit status: 0, 1 when a
    trial failed, 2 for a tracker that cannot start, 130 when interrupted (resumable)."""
    trials, unpinned = preflight.pin(trials)  # every hub input at a commit, before the keys that hold it
    plans = plan_study(trials)
    store = Store(storage)
    study = trials[0].study
    saved = {t.id: finished(results, t, plans[t.id]) for t in trials}  # read once: the plan's todo and the trackers'
    todo = [t for t in trials if not saved[t.id]]
    if todo:  # a misspelt or gated repository, an empty eval set, a revision the hub lacks: one line each, before Ray starts
        preflight.check(todo, where, hub_checks=hub_checks, unpinned=unpinned)
    if memory_check:
        check_memory(todo, plans, store, where)  # a stage that cannot fit its GPU, before Ray starts
    warn_version_drift(todo, plans, store)
    out = study_dir(results, study.name)
    chosen = track or [n for n in os.environ.get("FARM_TRACK", "").split(",") if n]  # FARM_TRACK=mlflow,tensorboard
    names = [n for n in dict.fromkeys(chosen) if n != "none"] if chosen else study.tracking
    try:
        trackers = open_trackers(names, study, out)
    except RuntimeError as e:
        print(f"farm: {where}: {e}", file=sys.stderr)
        return 2
    print(
        f"farm: study {study.name}, profile {trials[0].profile}: {len(trials)} trials ({len(trials) - len(todo)} already finished)"
        + (f"; tracking: {', '.join(names)} under {out}/" if names else "")
    )
    by_id = {t.id: t for t in trials}

    def stage_records(plan) -> dict:
        return {s.name: store.marker(s.kind, s.key) for s in plan.stages}

    for t in trials:  # finished before: a tracker that has them already skips them
        if saved[t.id] and trackers:
            log_trial(trackers, t, plans[t.id], saved[t.id]["metrics"], saved[t.id]["stages"], store.location)

    def on_complete(trial_id: str) -> None:
        plan = plans[trial_id]
        marker = store.marker("eval", plan.eval_key)
        items = json.loads((store.path("eval", plan.eval_key) / ITEMS_FILE).read_text(encoding="utf-8"))
        stages = stage_records(plan)
        write_trial(results, by_id[trial_id], plan, "ok", marker["metrics"], stages, eval_versions=marker.get("versions"), items=items)
        log_trial(trackers, by_id[trial_id], plan, marker["metrics"], stages, store.location)

    def on_error(trial_id: str, trial) -> None:
        t = by_id[trial_id]
        error = _error_text(trial)
        write_trial(results, t, plans[trial_id], "failed", {}, stage_records(plans[trial_id]), error)

    after = [s for s in map(registry.steps.get, registry.steps.names()) if s.wanted(study) and (todo or not s.done(out))]
    if todo or after:
        # Ctrl-C reaches the farm (not Tune's own handler): it stops Ray and says how to resume.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

        def interrupt(signum, frame):
            INTERRUPTED.set()
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, interrupt)
        start = time.time()
        logging.getLogger("ray.tune").setLevel(logging.INFO if verbose else logging.WARNING)
        start_ray(address or os.environ.get("RAY_ADDRESS"), verbose)
        print(
            f"farm: Ray ready in {time.time() - start:.1f}s: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs"
        )
        try:
            if todo:
                run_grid(
                    todo,
                    plans,
                    storage,
                    f"{study.name}-{trials[0].profile}",
                    study.max_failures,
                    on_complete,
                    on_error,
                    max_concurrent,
                    grid=_grid(todo, plans, store, len(trials) - len(todo)),
                )
            for step in after:
                step.run(trials, plans, store, out)
        except KeyboardInterrupt:
            print(
                f"\nfarm: interrupted. Finished trials and stages are saved; run the same command again to resume:\n  {command_line}",
                file=sys.stderr,
            )
            return 130
        finally:
            ray.shutdown()
        print(f"farm: grid finished in {time.time() - start:.0f}s")
    path, df = write_outputs(results, trials)
    failed = int((df["status"] != "ok").sum())
    print(f"farm: results in {study_dir(results, study.name)}/ (table.csv, table.parquet)")
    print(f"farm: report at {path} and {path.with_suffix('.html')}")
    for t in trackers:  # the table and the report beside the trials' runs
        t.study([path.parent / "table.csv", path, path.with_suffix(".html"), *sorted(path.parent.glob("*.png"))])
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        print(f"farm: MLflow runs: farm ui {study_dir(results, study.name)}")
    return 1 if failed else 0


def _grid(todo, plans, store, finished_before: int):
    """The live view's grid: each trial's stages still to run, with `farm plan`'s estimate of each."""
    seconds = {e.key: e.seconds for e in estimate_study(todo, plans)[0]}
    return Grid(
        {t.id: [(s.name, s.key, seconds.get(s.key)) for s in plans[t.id].stages if not store.done(s.kind, s.key)] for t in todo},
        finished_before=finished_before,
    )


def warn_version_drift(trials, plans, store) -> None:
    """One warning per finished artifact the trials reuse that was made under another major.minor
    version of torch, transformers, trl, peft or the farm: versions are not in the keys
    (docs/ARCHITECTURE.md), so the artifact is reused, and the user decides whether to rebuild it."""
    now, seen = library_versions(), set()
    for t in trials:
        p = plans[t.id]
        for name, kind, key in [*((s.name, s.kind, s.key) for s in (*p.labels, *p.stages)), ("eval", "eval", p.eval_key)]:
            if (kind, key) in seen:
                continue
            seen.add((kind, key))
            drift = version_drift((store.marker(kind, key) or {}).get("versions"), now)
            if drift:
                print(
                    f"farm: warning: reusing {name} ({kind}-{key}), made with {', '.join(drift)}; library versions are not in the "
                    f"keys: remove {store.root}/artifacts/{kind}-{key} to rebuild it under these",
                    file=sys.stderr,
                )


def write_outputs(results: Path, trials) -> tuple:
    """Write table and report; (report.md path, the table)."""
    study = trials[0].study
    df = table(results, trials)
    write_table(results, study.name, df)
    axes = list(trials[0].axes)
    config = {
        "profile": trials[0].profile,
        "grid": {a: distinct(t.axes[a] for t in trials) for a in axes},
        "study (first trial)": trials[0].study.model_dump(mode="json", exclude_defaults=True, exclude={"description", "reference"}),
    }
    return write_report(study_dir(results, study.name), study, df, axes, config), df


def _error_text(trial) -> str:
    try:
        return Path(trial.error_file).read_text().strip().splitlines()[-1]
    except (OSError, TypeError, IndexError):
        return "failed (see Ray logs)"
