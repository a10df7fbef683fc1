"""The `farm` command: run, plan and report studies."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from farm.spec import DEFAULT_PROFILE, LabelSpec, StudyError, load_study
from farm.track import TRACKERS

LISTED = ("sources", "transforms", "stages", "metrics", "scorers")  # `farm ls`: farm.registry's registries

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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.command_line = shlex.join(["farm", *argv])  # to tell how to resume
    try:
        return args.func(args)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="farm", description=__doc__)
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    def study_args(q):
        q.add_argument("study", help="the study file, e.g. jobs/quickstart.yaml")
        q.add_argument("--profile", default=DEFAULT_PROFILE, help="profile of the study file to apply (default: embedded)")
        q.add_argument("--results", default=os.environ.get("FARM_RESULTS", "results"), help="results folder (default: results/)")
        q.add_argument(
            "--storage",
            default=os.environ.get("FARM_STORAGE"),
            help="artifact store (default: <results>/.store); on a cluster a shared path or a URI (s3://bucket/prefix, gs://...)",
        )
        q.add_argument("--max-trials", type=int, default=1000, help="refuse grids larger than this")
        q.add_argument(
            "--smoke",
            action="store_true",
            help="rehearse the profile small: the same stages, sources, metrics and judges, with a few rows, "
            "2 steps a stage, short lengths, CPU only, each grid value once (farm/smoke.py); results under <study>-smoke",
        )

    run = sub.add_parser("run", help="run every trial of a study and write its results and report")
    study_args(run)
    run.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    run.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        metavar="N",
        help="trials at once (default: as many as the cluster's resources now fit the largest stage; "
        "set it on an autoscaling cluster whose GPU workers start at zero)",
    )
    run.add_argument("--verbose", action="store_true", help="show Ray worker logs")
    run.add_argument(
        "--track",
        action="append",
        choices=[*TRACKERS, "none"],
        metavar="TRACKER",
        help="log trials to this tracker (mlflow, tensorboard, wandb; repeat for several; none: no tracker); "
        "default: $FARM_TRACK (comma-separated), else the study's `tracking` (mlflow and tensorboard under results/<study>/)",
    )
    run.add_argument(
        "--ignore-memory-estimate",
        action="store_true",
        help="run stages whose estimated peak GPU memory (farm plan) exceeds their GPU's; by default they stop the run",
    )
    run.add_argument(
        "--no-preflight",
        action="store_true",
        help="skip the check, before Ray starts, that every hub repository the study reads (models, datasets, "
        "scorers, lm-eval task data) exists and this environment's token may read it (farm/preflight.py)",
    )
    run.set_defaults(func=cmd_run)

    ls = sub.add_parser("ls", help="list what a study file can name: dataset sources, transforms, stage kinds, metrics, scorers")
    ls.add_argument("what", nargs="*", metavar="WHAT", help=f"some of: {', '.join(LISTED)} (default: all)")
    ls.set_defaults(func=cmd_ls)

    ui = sub.add_parser("ui", help="serve the MLflow UI on a study's local tracking store, on 127.0.0.1 only")
    ui.add_argument("study_dir", help="a study's results folder, e.g. results/quickstart (it holds mlflow.db)")
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    ui.set_defaults(func=cmd_ui)

    plan = sub.add_parser("plan", help="list the trials and their stages, marking cached ones, and estimate their GPU-hours")
    study_args(plan)
    # The cost model (farm/estimate.py): time = tokens x cost / throughput, scaled by model size;
    # full fine-tuning costs 1.5x LoRA, forward-only passes 0.5x; eval and labelling not estimated.
    plan.add_argument(
        "--throughput",
        type=float,
        default=3000,
        metavar="TOKENS_PER_S",
        help="training tokens/s per GPU with LoRA for a model of --throughput-params parameters (default: 3000, "
        "a 7B model in bf16 on an A100); a model of P parameters is taken as P/PARAMS times slower, full "
        "fine-tuning as 1.5x and forward-only passes (reference, reward models) as 0.5x its cost",
    )
    plan.add_argument(
        "--throughput-params", type=float, default=7e9, metavar="PARAMS", help="the model size both throughput figures are for (default: 7e9)"
    )
    plan.add_argument(
        "--gen-throughput",
        type=float,
        default=1500,
        metavar="TOKENS_PER_S",
        help="generated tokens/s per GPU at --throughput-params (default: 1500, batched HF generate of a 7B model)",
    )
    plan.add_argument(
        "--why",
        metavar="STAGE",
        help="print only the full key document of STAGE (a stage name, eval, label, or a key) as JSON: "
        "what its key hashes, local inputs by sha256; one entry per distinct key across the trials",
    )
    plan.add_argument(
        "--power",
        nargs="*",
        type=float,
        metavar="DELTA",
        help="from this study's finished (or pilot) run in --results: the seeds and items needed to detect a "
        "difference of each DELTA in --metric between values of the main axis with 80%% power, from the "
        "variance between seeds and between items the run measured (default DELTAs: 0.02 0.05)",
    )
    plan.add_argument("--metric", default=None, help="the metric --power is for (default: the study's report.main_metric)")
    plan.set_defaults(func=cmd_plan)

    report = sub.add_parser("report", help="rebuild the table and report of a study from its results")
    study_args(report)
    report.set_defaults(func=cmd_report)
    report.epilog = "STUDY may also be a results folder, e.g. results/quickstart"

    doctor = sub.add_parser(
        "doctor",
        help="check this environment and what the given studies need: for each, every hub "
        "repository it reads (as `farm run`'s preflight), its GPUs and extras",
    )
    doctor.add_argument("studies", nargs="*", help="study files to check (default: every jobs/*.yaml here)")
    doctor.add_argument("--profile", default=DEFAULT_PROFILE, help="the profile to check them in, e.g. paper (default: embedded)")
    doctor.add_argument("--storage", default=os.environ.get("FARM_STORAGE", "results/.store"))
    doctor.set_defaults(func=cmd_doctor)

    compare = sub.add_parser("compare", help="two runs of the same study side by side, with the differences")
    compare.add_argument("a", help="a results folder, e.g. results/quickstart")
    compare.add_argument("b", help="another results folder of the same study")
    compare.set_defaults(func=cmd_compare)

    safety = sub.add_parser(
        "safety-score",
        help="the SafeNLP safety score per demographic group, from per-statement perplexities",
        description="The SafeNLP safety score (Hosseini et al. 2023) of each group from precomputed perplexities. "
        'Prints one JSON object to stdout: {group: score, ..., "mean": m} over the groups whose Mann-Whitney test '
        "has p <= 0.05 (mean is null when none has). Each group not reported (p > 0.05, or no hate or no neutral "
        "statements) is named on stderr with its reason and p-value.",
    )
    safety.add_argument(
        "--perplexities",
        required=True,
        metavar="FILE.json",
        help="a JSON list of records with text, label (hate|neutral), toxicity_score, target_groups and perplexity, as SafeNLP's perplexities.json",
    )
    safety.add_argument(
        "--p-value",
        choices=["one-sided", "two-sided"],
        default="one-sided",
        help="which p is compared with 0.05: one-sided (default) is SafeNLP's, scipy 1.5's default of "
        "half the two-sided asymptotic p; two-sided is today's scipy default",
    )
    safety.set_defaults(func=cmd_safety_score)

    label = sub.add_parser(
        "label",
        help="score the text of every row of a file with scorers on Ray Data; write a parquet file",
        description="Score every row's text with each --scorer (one Ray Data actor pool each) and write OUT with columns "
        "id, text and one column per score (PREFIX + the scorer's column: vader gives neg, neu, pos, compound; detoxify "
        "toxicity, severe_toxicity, obscene, threat, insult, identity_attack; embedded_toxicity, roberta_hate and auto "
        "give toxicity), rows in input order. OUT is written under a temporary name and renamed. Uses the running Ray "
        "cluster at --address / $RAY_ADDRESS, else starts a local Ray for the run.",
    )
    label.add_argument("input", help="a .parquet, .jsonl, .json or .csv file, or hub:owner/name[:split] (default split: train)")
    label.add_argument("--out", required=True, metavar="OUT.parquet", help="the parquet file to write")
    label.add_argument(
        "--scorer",
        action="append",
        required=True,
        metavar="[PREFIX=]NAME[:MODEL]",
        help="repeatable; e.g. vader, detoxify:original, tox_=detoxify:/path/model.ckpt, embedded_toxicity",
    )
    label.add_argument("--text-column", default="text", help="the column holding the text (default: text)")
    label.add_argument("--id-column", default=None, help="the column holding row ids (default: the row number)")
    label.add_argument("--batch-size", type=int, default=256, help="rows per scorer call (default: 256)")
    label.add_argument("--actors", type=int, default=1, help="actors per scorer pool (default: 1)")
    label.add_argument("--cpus-per-actor", type=float, default=1, help="CPUs (and torch threads) per actor (default: 1)")
    label.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per actor (default: 0)")
    label.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    label.set_defaults(func=cmd_label)
    return p


def _load(args, path=None) -> list:
    trials = load_study(path or args.study, args.profile, args.max_trials)
    if args.smoke:
        from farm.smoke import shrink

        return shrink(trials)
    return trials


def _storage(args) -> str:
    from farm.cache import is_uri

    if args.storage and is_uri(args.storage):  # s3://bucket/prefix: shared by every node as is
        return args.storage.rstrip("/")
    return str(Path(args.storage or Path(args.results) / ".store").resolve())


def cmd_plan(args) -> int:
    from farm.cache import Store, plan_study
    from farm.estimate import Rates, estimate_study
    from farm.preflight import pin

    if args.power is not None:  # reads results only: nothing planned, nothing pinned
        return _power(_load(args), Path(args.results), args.power or [0.02, 0.05], args.metric)
    trials, unpinned = pin(_load(args))  # every hub input at a commit: the keys hold it
    for e, fields in unpinned.items():
        print(f"farm: warning: not pinned to a commit (the keys below hold the revision as given): {e} (at {', '.join(fields)})", file=sys.stderr)
    plans = plan_study(trials)
    store = Store(_storage(args))
    if args.why:
        return _why(args.why, trials, plans, store)
    study = trials[0].study
    chains = _distinct(" -> ".join(t.study.stages) or "none (the base model)" for t in trials)
    print(f"study {study.name} (profile {args.profile}): {len(trials)} trials, stages {' | '.join(chains)}")
    unique: dict[str, bool] = {}
    shown: set[str] = set()
    for t in trials:
        print(f"\n{t.id}")
        for name, kind, key, users, doc in _runs(plans[t.id]):
            done = store.done(kind, key)
            share = f", shared by {len(users)} trials" if len(users) > 1 else ""
            print(f"  {name:<10} {kind:<17} {key}  {'cached' if done else 'to run'}{share}")
            if done and key not in shown:  # what a reused artifact's key was made from, once per artifact
                shown.add(key)
                print("\n".join(f"  {'':<10} <- {line}" for line in _made_from(doc, plans[t.id])))
            if kind != "eval":
                unique[key] = done
    todo = sum(not d for d in unique.values())
    runs = sum(len(plans[t.id].labels) + len(plans[t.id].stages) for t in trials)
    print(f"\n{len(unique)} distinct stages ({runs} stage runs without reuse), {len(unique) - todo} cached, {todo} to run.")

    rates = Rates(args.throughput, args.throughput_params, args.gen_throughput)
    estimates, models = estimate_study(trials, plans, rates)
    print("\nEstimated cost, each distinct stage once (tokens: a row at max_length, an answer at max_new_tokens: upper bounds but for notes)")
    print("  " + ", ".join(f"{m}: {_count(p, 'parameters') if p else 'unknown size'}" for m, p in models.items()))
    print(f"  {'stage':<10} {'kind':<17} {'rows':>10} {'tokens':>8} {'GPUs':>5} {'GPU-hours':>10}  trials (the trial when one)")
    for e in estimates:
        rows = "-" if e.gpus is None else f"{e.rows:,.0f}" if e.rows is not None else "unknown"
        gpus = "-" if e.gpus is None else f"{e.gpus:g}" if e.gpus else "CPU"
        hours = f"{e.hours:,.2f}" if e.hours is not None else "-"
        print(
            f"  {e.name:<10} {e.kind:<17} {rows:>10} {_count(e.tokens) if e.tokens else '-':>8} {gpus:>5} {hours:>10}  {len(e.users) if len(e.users) > 1 else e.users[0]}  {e.note}".rstrip()
        )
    known = [e for e in estimates if e.hours is not None]
    total, left = sum(e.hours for e in known), sum(e.hours for e in known if not unique[e.key])
    if any(e.gpus for e in estimates):
        print(f"  total: {total:,.1f} GPU-hours ({left:,.1f} not cached); {sum(e.hours * len(e.users) for e in known):,.1f} GPU-hours without reuse")
    else:
        print("  total: no GPU-hours: no stage runs on a GPU")
    unknown = [e.name for e in estimates if e.hours is None and e.gpus]
    if unknown:
        print(f"  not in the total (unknown): {', '.join(_distinct(unknown))}")
    print(f"  eval ({len({plans[t.id].eval_key for t in trials})} runs) and labelling: not estimated")
    print(
        f"  assumed: {args.throughput:,.0f} training tokens/s per GPU with LoRA (full fine-tuning 1.5x, forward-only passes 0.5x) and "
        f"{args.gen_throughput:,.0f} generated tokens/s, for a model of {_count(args.throughput_params, 'parameters')}, "
        "inversely with model size (--throughput, --gen-throughput, --throughput-params)"
    )
    _print_memory(trials, plans)
    return 0


def _runs(plan) -> list[tuple]:
    """(name, kind, key, users, key document) of a trial's labelling runs, stages and eval."""
    stages = [(s.name, s.kind, s.key, s.users, s.doc) for s in (*plan.labels, *plan.stages)]
    return [*stages, ("eval", "eval", plan.eval_key, (), plan.eval_doc)]


def _made_from(doc: dict, plan) -> list[str]:
    """What a key document holds besides the stage's own settings, a line each: the artifacts it
    starts from and reads (by key), local files and folders (by sha256) and pinned hub commits."""
    names = {s.key: s.name for s in plan.stages}
    lines = []
    for part in ("input", "model", "reference", "refs"):
        for value in doc.get(part) if isinstance(doc.get(part), list) else [doc.get(part)]:
            if isinstance(value, str):
                lines.append(f"{part} {names.get(value, 'stage')} {value}")
            elif isinstance(value, dict):  # the study's model itself (with the trial seed where it is built)
                lines.append(f"{part} the base model {(value.get('model') or value['base']['model'])['base']}")

    def walk(node, path: str) -> None:
        for k, v in node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ():
            if k == "files":
                lines.extend(f"file {path}{field} {f['path']} sha256:{f['sha256']}" for field, f in v.items())
            elif "revision" in str(k) and v:
                lines.append(f"revision {path}{k} {json.dumps(v, sort_keys=True) if isinstance(v, dict) else v}")
            else:
                walk(v, f"{path}{k}.")

    walk(doc, "")
    return lines


def _power(trials, results: Path, deltas: list[float], metric: str | None) -> int:
    """`farm plan --power`: variance components of the main metric's paired differences, pooled over
    the comparisons of the main axis, and the seeds and items a difference of each size needs."""
    import numpy as np

    from farm import stats
    from farm.report import group_axes, metric_columns, power_rows
    from farm.results import read_items, study_dir, table

    study, axes = trials[0].study, list(trials[0].axes)
    d = study_dir(results, study.name)
    df = table(results, trials)
    if not (df["status"] == "ok").any():
        print(
            f"farm: --power reads a finished run, and {d} holds no finished trial of this study: run it (or a pilot of it, "
            "fewer seeds) first: farm run <study>",
            file=sys.stderr,
        )
        return 2
    known = metric_columns(df, axes)
    metric = metric or study.report.main_metric or known[0]
    if metric not in known:
        print(f"farm: --metric {metric!r} is not a metric of this run; its metrics: {', '.join(known)}", file=sys.stderr)
        return 2
    main_axis = study.report.main_axis or next(iter(group_axes(axes)), None)
    rows = power_rows(df, axes, metric, main_axis, read_items(d, df["trial"]))
    if not rows or "seed" not in axes:
        print(
            "farm: --power compares values of the main axis seed by seed: the grid needs a `seed` axis and another axis "
            f"(report.main_axis) with two or more values; this one has: {', '.join(axes) or 'none'}",
            file=sys.stderr,
        )
        return 2
    c = stats.pooled([r[3] for r in rows])
    print(
        f"study {study.name}: {metric}, paired differences of {main_axis} against {rows[0][1].split(' vs ')[-1]} "
        f"({len(rows)} comparisons, {c.seeds} seeds{f', {c.items} items per seed' if c.items else ', no per-item values'})"
    )
    print(f"  between seeds: SD {np.sqrt(c.between_seeds):.4g}" + (f"; between items: SD {np.sqrt(c.within_seeds):.4g}" if c.items else ""))
    print("  (one-way random effects, method of moments, averaged over the comparisons; from a few seeds a pilot's estimate)")
    print()
    print(f"  80% power, two-sided paired t-test over seeds at alpha 0.05{f', each seed scored on {c.items} items' if c.items else ''}:")
    more = sorted({c.seeds, 5, 10, 20})
    print(f"  {'difference':>10} {'seeds':>6}" + ("".join(f" {f'items @{s} seeds':>16}" for s in more) if c.items else ""))
    for delta in deltas:
        need = stats.seeds_needed(c, delta)
        line = f"  {delta:>10g} {need if need else '>10000':>6}"
        if c.items:
            line += "".join(f" {f'{n:,}' if (n := stats.items_needed(c, delta, s)) else 'none':>16}" for s in more)
        print(line)
    if c.items:
        print("  items: per seed; 'none': the seeds' own spread leaves too little power at that many seeds, whatever the items")
    return 0


def _why(name: str, trials, plans, store) -> int:
    """Print the key documents of the runs named `name` (a stage, eval, label, or a key) as JSON."""
    found: dict[str, dict] = {}
    for t in trials:
        for run, kind, key, _, doc in _runs(plans[t.id]):
            if name in (run, key):
                entry = found.setdefault(
                    key, {"stage": run, "kind": kind, "key": key, "cached": store.done(kind, key), "trials": [], "document": doc}
                )
                entry["trials"].append(t.id)
    if not found:
        names = _distinct(run for t in trials for run, *_ in _runs(plans[t.id]))
        raise StudyError(f"--why: {name!r} is neither a stage of the study nor a key of its plan; its stages: {', '.join(names)}")
    print(json.dumps(list(found.values()), indent=2, sort_keys=True))
    return 0


def _print_memory(trials, plans) -> None:
    """The peak GPU memory of each distinct stage and eval beside the GPU it lands on, and the
    artifacts' sizes; rows that read alike (a stage repeated across seeds) are printed once."""
    from farm.estimate import memory_study
    from farm.memory import DEFAULT_GPU, GPU_MEMORY_GIB

    rows = memory_study(trials, plans)
    print(
        "\nEstimated peak GPU memory per GPU, each distinct stage once (farm/memory.py: weights, gradients, AdamW state, "
        "measured activations, other models, KV caches, +10% allocator slack and 1 GiB CUDA context)"
    )
    print(f"  {'stage':<10} {'kind':<17} {'runs':>4} {'memory':>9}  {'on':<24} {'fits':<4}  {'checkpointing':<13}  artifact")
    lines: dict[str, int] = {}
    for r in rows:
        m = r.memory
        if not r.gpus:
            memory, on, fits = "-", "CPU (not estimated)", ""
        elif m is None:
            memory, on, fits = "unknown", "-", ""
        else:
            memory = f"{m.total / 2**30:.1f} GiB"
            on = f"{f'{m.share:g} x ' if m.share < 1 else ''}{m.gpu} {GPU_MEMORY_GIB[m.gpu]:g} GiB{' (assumed)' if m.assumed else ''}"
            fits = "yes" if m.fits else "NO"
        ckpt = "-" if m is None or m.checkpointing is None else "on" if m.checkpointing else "off"
        art = "-" if r.name == "eval" else f"{_size(r.artifact)} {r.artifact_kind}" if r.artifact is not None else r.artifact_kind
        line = f"  {r.name:<10} {r.kind:<17} {{runs:>4}} {memory:>9}  {on:<24} {fits:<4}  {ckpt:<13}  {art}"
        lines[line] = lines.get(line, 0) + 1
    for line, runs in lines.items():
        print(line.format(runs=runs).rstrip())
    sizes = [r.artifact for r in rows if r.artifact is not None]
    print(
        f"  artifacts in all: {_size(sum(sizes))} ({len(sizes)} stages{'; records not counted' if any(r.artifact_kind == 'records' for r in rows) else ''})"
    )
    if any(r.memory and r.memory.assumed for r in rows):
        print(
            f"  assumed: a stage or eval that names no accelerator_type lands on an {DEFAULT_GPU} ({GPU_MEMORY_GIB[DEFAULT_GPU]:g} GiB), "
            "the smallest GPU of cluster.yaml; resources.accelerator_type (eval.resources.accelerator_type) names another"
        )
    if any(r.memory and not r.memory.fits for r in rows):
        print("  a stage marked NO does not fit its GPU: `farm run` refuses it (the error says what to change)")


def _size(n: float) -> str:
    """16.0 MiB, 4.9 GiB: a size for people."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_memory(trials, plans, store, where: str) -> None:
    """Refuse (StudyError) a stage or eval still to run on a GPU whose estimated peak memory exceeds
    its GPU's, naming what to change. Stages on CPUs are not checked."""
    from farm.estimate import memory_fixes, memory_study

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


def _count(n: float, unit: str = "") -> str:
    """1.3B, 80.7M, 950K: a count for people."""
    scaled = next(((n / f, s) for f, s in ((1e9, "B"), (1e6, "M"), (1e3, "K")) if abs(n) >= f), (n, ""))
    return f"{scaled[0]:.3g}{scaled[1]}" + (f" {unit}" if unit else "")


def cmd_run(args) -> int:
    from farm import preflight
    from farm.cache import Store, plan_study
    from farm.results import ITEMS_FILE, finished, study_dir, write_trial
    from farm.track import log_trial, open_trackers

    trials = _load(args)  # all validation before Ray
    trials, unpinned = preflight.pin(trials)  # every hub input at a commit, before the keys that hold it
    plans = plan_study(trials)
    results, storage = Path(args.results).resolve(), _storage(args)
    store = Store(storage)
    study = trials[0].study
    saved = {t.id: finished(results, t, plans[t.id]) for t in trials}  # read once: the plan's todo and the trackers'
    todo = [t for t in trials if not saved[t.id]]
    if todo:  # a misspelt or gated repository, an empty eval set, a revision the hub lacks: one line each, before Ray starts
        preflight.check(todo, args.study, hub_checks=not args.no_preflight, unpinned=unpinned)
    if not args.ignore_memory_estimate:
        check_memory(todo, plans, store, args.study)  # a stage that cannot fit its GPU, before Ray starts
    warn_version_drift(todo, plans, store)
    chosen = args.track or [n for n in os.environ.get("FARM_TRACK", "").split(",") if n]  # FARM_TRACK=mlflow,tensorboard
    names = [n for n in dict.fromkeys(chosen) if n != "none"] if chosen else study.tracking
    try:
        trackers = open_trackers(names, study, study_dir(results, study.name))
    except RuntimeError as e:
        print(f"farm: {args.study}: {e}", file=sys.stderr)
        return 2
    print(
        f"farm: study {study.name}, profile {args.profile}: {len(trials)} trials ({len(trials) - len(todo)} already finished)"
        + (f"; tracking: {', '.join(names)} under {study_dir(results, study.name)}/" if names else "")
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

    from farm.eval.arena import ARENA_DIR  # (pandas: not at CLI start-up)

    arena = study.eval.pairwise and (todo or not (study_dir(results, study.name) / ARENA_DIR / "elo.csv").exists())
    if todo or arena:
        import ray

        from farm.tune import INTERRUPTED, run_grid

        # Ctrl-C reaches the farm (not Tune's own handler): it stops Ray and says how to resume.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

        def interrupt(signum, frame):
            INTERRUPTED.set()
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, interrupt)
        start = time.time()
        logging.getLogger("ray.tune").setLevel(logging.INFO if args.verbose else logging.WARNING)
        start_ray(args.address or os.environ.get("RAY_ADDRESS"), args.verbose)
        print(
            f"farm: Ray ready in {time.time() - start:.1f}s: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs"
        )
        try:
            if todo:
                run_grid(
                    todo,
                    plans,
                    storage,
                    f"{study.name}-{args.profile}",
                    study.max_failures,
                    on_complete,
                    on_error,
                    args.max_concurrent,
                    grid=_grid(todo, plans, store, len(trials) - len(todo)),
                )
            if study.eval.pairwise:
                _pairwise(trials, plans, store, study_dir(results, study.name) / ARENA_DIR)
        except KeyboardInterrupt:
            print(
                f"\nfarm: interrupted. Finished trials and stages are saved; run the same command again to resume:\n  {args.command_line}",
                file=sys.stderr,
            )
            return 130
        finally:
            ray.shutdown()
        print(f"farm: grid finished in {time.time() - start:.0f}s")
    path, df = _write_outputs(results, trials)
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
    from farm.estimate import estimate_study
    from farm.progress import Grid

    seconds = {e.key: e.seconds for e in estimate_study(todo, plans)[0]}
    return Grid(
        {t.id: [(s.name, s.key, seconds.get(s.key)) for s in plans[t.id].stages if not store.done(s.kind, s.key)] for t in todo},
        finished_before=finished_before,
    )


def cmd_ls(args) -> int:
    """Every registered name with its record shape (what it reads or gives) and a line of its
    documentation, from the registries themselves (as `tune ls` lists torchtune's recipes)."""
    import re

    from farm import registry

    unknown = [w for w in args.what if w not in LISTED]
    if unknown:
        print(f"farm ls: {', '.join(unknown)}: not a registry; one of {', '.join(LISTED)}", file=sys.stderr)
        return 2
    for what in args.what or LISTED:
        reg = getattr(registry, what)
        print(f"{what}:")
        for name in reg.names():
            shape = getattr(reg.get(name), "shape", None)
            line = re.split(r"(?<=\.)\s(?=[A-Z`])", reg.doc(name), maxsplit=1)[0]  # its first sentence ("et al. 2023" goes on)
            print(f"  {name:<20} {f'[{shape}] ' if shape else ''}{line}")
    return 0


def cmd_ui(args) -> int:
    """MLflow's own UI (`mlflow ui`) on the SQLite store `farm run` keeps beside the results; bound to
    127.0.0.1, since the UI has no authentication."""
    from farm.track import MLFLOW_DB

    db = Path(args.study_dir) / MLFLOW_DB
    if not db.is_file():
        print(f"farm ui: {db} does not exist: run the study with MLflow tracking first (its default; or farm run --track mlflow)", file=sys.stderr)
        return 2
    print(f"farm: MLflow UI at http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    # exec: this process becomes the server, so a signal to it (Ctrl-C, a supervisor's SIGTERM) is the server's
    os.execv(
        sys.executable,
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db.resolve()}", "--host", "127.0.0.1", "--port", str(args.port)],
    )


def warn_version_drift(trials, plans, store) -> None:
    """One warning per finished artifact the trials reuse that was made under another major.minor
    version of torch, transformers, trl, peft or the farm: versions are not in the keys
    (docs/ARCHITECTURE.md), so the artifact is reused, and the user decides whether to rebuild it."""
    from farm.cache import library_versions, version_drift

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
        from farm.preflight import runtime_env

        env = runtime_env({k: os.environ[k] for k in WORKER_ENV})
    ray.init(
        address=address,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        include_dashboard=None if joins else False,
        runtime_env=env,
    )


def _pairwise(trials, plans, store, out: Path) -> None:
    """Study E: judge every pair of the study's models on their kept answers (a Ray task, with
    the eval's resources), after the grid; the driver writes what it returns."""
    import ray

    from farm.cache import atomic_write
    from farm.eval.arena import contestants, judge_ref
    from farm.tune import arena_task

    study = trials[0].study
    entries = contestants(trials, plans, store)
    models = {e["model"] for e in entries}
    if len(models) < 2:
        print("farm: pairwise comparison skipped: fewer than two models have answers", file=sys.stderr)
        return
    res = study.eval.resources
    judge = study.eval.pairwise.judge
    task = arena_task.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, accelerator_type=res.accelerator_type)
    files = ray.get(task.remote(entries, judge, judge_ref(trials, plans, judge), str(store.root), study.eval.model_dump(mode="json")))
    for name, data in files.items():
        atomic_write(out / name, data)
    print(f"farm: pairwise comparison of {len(models)} models in {out}/ (elo.csv, win_rate.csv)")


def cmd_report(args) -> int:
    from farm.results import saved_trials

    target = Path(args.study)
    if target.is_dir():
        try:
            trials, results = saved_trials(target), target.resolve().parent
        except (FileNotFoundError, ValueError) as e:
            raise StudyError(str(e)) from None
    else:
        trials, results = _load(args, target), Path(args.results).resolve()
    path, _ = _write_outputs(results, trials)
    print(f"farm: report at {path} and {path.with_suffix('.html')}")
    return 0


def cmd_doctor(args) -> int:
    from farm.doctor import environment, study_needs

    lines, facts = environment(args.storage)
    for name, finding in lines:
        print(f"{name:<24} {finding}")
    missing = 0
    for path in args.studies or sorted(map(str, Path("jobs").glob("*.yaml"))):
        try:
            needs = study_needs(load_study(path, args.profile), facts)
        except StudyError as e:  # a study that does not load is a finding too; the others are still checked
            needs = [str(e)]
        print(f"\n{path} (profile {args.profile}): " + ("ready" if not needs else "missing:"))
        for need in needs:
            print(f"  - {need}")
        missing += len(needs)
    return 1 if missing else 0


def cmd_compare(args) -> int:
    from farm.results import compare

    try:
        print(compare(Path(args.a), Path(args.b)))
    except (FileNotFoundError, ValueError) as e:
        raise StudyError(str(e)) from None
    return 0


def cmd_safety_score(args) -> int:
    import json
    import math

    from farm.eval.safety import read_perplexities, safety_scores

    try:
        scores = safety_scores(read_perplexities(args.perplexities), p_value=args.p_value)
    except ValueError as e:
        raise StudyError(str(e)) from None
    for group, why in scores.dropped.items():
        print(f"farm: {group}: not reported: {why}", file=sys.stderr)
    print(json.dumps({**scores.groups, "mean": None if math.isnan(scores.mean) else scores.mean}))
    return 0


def parse_scorer(text: str, **pool) -> LabelSpec:
    """`[PREFIX=]NAME[:MODEL]` as a LabelSpec with the pool settings."""
    from pydantic import ValidationError

    prefix, eq, rest = text.partition("=")
    if not eq or ":" in prefix or "/" in prefix:  # an "=" inside the model path
        prefix, rest = "", text
    name, colon, model = rest.partition(":")
    try:
        return LabelSpec(scorer=name, model=model if colon else None, prefix=prefix, **pool)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"])) or "scorer"
        message = err["msg"].removeprefix("Value error, ")
        if where in pool:
            raise StudyError(f"--{where.replace('_', '-')}: {message}") from None
        raise StudyError(f"--scorer {text!r}: {message}") from None


def cmd_label(args) -> int:
    from farm.label.pipeline import InputError, check_labels, label_input, read_input, write_parquet

    pool = dict(batch_size=args.batch_size, actors=args.actors, cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor)
    labels = [parse_scorer(s, **pool) for s in args.scorer]
    try:  # every check before Ray starts
        check_labels(labels)
        data = read_input(args.input, args.text_column, args.id_column)
    except (InputError, ValueError, KeyError) as e:
        raise StudyError(str(e).strip("'\"")) from None
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    os.environ.update({k: os.environ.get(k, v) for k, v in WORKER_ENV.items()})
    start = time.time()
    print(f"farm: labelling {len(data)} rows of {args.input} with {', '.join(args.scorer)}", file=sys.stderr)
    try:
        table = label_input(data, labels, log=lambda line: print(f"farm: {line}", file=sys.stderr), progress=sys.stderr.isatty())
    except ValueError as e:  # a pool larger than the cluster, or two scores on one column
        raise StudyError(str(e)) from None
    write_parquet(table, args.out)
    print(f"farm: wrote {args.out}: {table.num_rows} rows, columns {', '.join(table.column_names)} ({time.time() - start:.1f}s)")
    return 0


def _write_outputs(results: Path, trials) -> tuple:
    """Write table and report; (report.md path, the table)."""
    from farm.report import write_report
    from farm.results import study_dir, table, write_table

    study = trials[0].study
    df = table(results, trials)
    write_table(results, study.name, df)
    axes = list(trials[0].axes)
    config = {
        "profile": trials[0].profile,
        "grid": {a: _distinct(t.axes[a] for t in trials) for a in axes},
        "study (first trial)": trials[0].study.model_dump(mode="json", exclude_defaults=True, exclude={"description", "reference"}),
    }
    return write_report(study_dir(results, study.name), study, df, axes, config), df


def _distinct(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _error_text(trial) -> str:
    try:
        return Path(trial.error_file).read_text().strip().splitlines()[-1]
    except (OSError, TypeError, IndexError):
        return "failed (see Ray logs)"


if __name__ == "__main__":
    sys.exit(main())
