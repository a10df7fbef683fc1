"""The `farm` command: run, plan and report studies."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from farm import registry
from farm.config import StudyError
from farm.doctor import environment, study_needs
from farm.estimate import Rates, estimate_study, memory_study
from farm.eval.safety import read_perplexities, safety_scores
from farm.files import is_uri
from farm.grid import DEFAULT_PROFILE, distinct, load_study
from farm.label.pipeline import InputError, check_labels, label_input, read_input, write_parquet
from farm.memory import DEFAULT_GPU, GPU_MEMORY_GIB
from farm.plan import plan_study
from farm.preflight import pin
from farm.process import WORKER_ENV
from farm.schema import LabelSpec
from farm.smoke import shrink
from farm.store import Store
from farm.track import MLFLOW_DB, TRACKERS

LISTED = ("sources", "transforms", "stages", "metrics", "scorers", "steps")  # `farm ls`: farm.registry's registries


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
        return shrink(trials)
    return trials


def _storage(args) -> str:
    if args.storage and is_uri(args.storage):  # s3://bucket/prefix: shared by every node as is
        return args.storage.rstrip("/")
    return str(Path(args.storage or Path(args.results) / ".store").resolve())


def cmd_plan(args) -> int:
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
    chains = distinct(" -> ".join(t.study.stages) or "none (the base model)" for t in trials)
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
        print(f"  not in the total (unknown): {', '.join(distinct(unknown))}")
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


def _power(trials, results_dir: Path, deltas: list[float], metric: str | None) -> int:
    """`farm plan --power`: variance components of the main metric's paired differences, pooled over
    the comparisons of the main axis, and the seeds and items a difference of each size needs."""
    import numpy as np

    from farm import report, results, stats  # pandas, matplotlib and scipy: only for --power

    study, axes = trials[0].study, list(trials[0].axes)
    d = results.study_dir(results_dir, study.name)
    df = results.table(results_dir, trials)
    if not (df["status"] == "ok").any():
        print(
            f"farm: --power reads a finished run, and {d} holds no finished trial of this study: run it (or a pilot of it, "
            "fewer seeds) first: farm run <study>",
            file=sys.stderr,
        )
        return 2
    known = report.metric_columns(df, axes)
    metric = metric or study.report.main_metric or known[0]
    if metric not in known:
        print(f"farm: --metric {metric!r} is not a metric of this run; its metrics: {', '.join(known)}", file=sys.stderr)
        return 2
    main_axis = study.report.main_axis or next(iter(report.group_axes(axes)), None)
    rows = report.power_rows(df, axes, metric, main_axis, results.read_items(d, df["trial"]))
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
        names = distinct(run for t in trials for run, *_ in _runs(plans[t.id]))
        raise StudyError(f"--why: {name!r} is neither a stage of the study nor a key of its plan; its stages: {', '.join(names)}")
    print(json.dumps(list(found.values()), indent=2, sort_keys=True))
    return 0


def _print_memory(trials, plans) -> None:
    """The peak GPU memory of each distinct stage and eval beside the GPU it lands on, and the
    artifacts' sizes; rows that read alike (a stage repeated across seeds) are printed once."""
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


def _count(n: float, unit: str = "") -> str:
    """1.3B, 80.7M, 950K: a count for people."""
    scaled = next(((n / f, s) for f, s in ((1e9, "B"), (1e6, "M"), (1e3, "K")) if abs(n) >= f), (n, ""))
    return f"{scaled[0]:.3g}{scaled[1]}" + (f" {unit}" if unit else "")


def cmd_ls(args) -> int:
    """Every registered name with its record shape (what it reads or gives) and a line of its
    documentation, from the registries themselves (as `tune ls` lists torchtune's recipes)."""
    import re

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
            better = getattr(reg.get(name), "directions", lambda: "")()  # a metric's: which way each value is better
            print(f"  {name:<20} {f'[{shape}] ' if shape else ''}{line}{f' ({better})' if better else ''}")
    return 0


def cmd_ui(args) -> int:
    """MLflow's own UI (`mlflow ui`) on the SQLite store `farm run` keeps beside the results; bound to
    127.0.0.1, since the UI has no authentication."""
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


def cmd_run(args) -> int:
    from farm import run  # Ray, Tune, pandas and matplotlib: not at the CLI's start (`farm plan`, `farm ls`)

    trials = _load(args)  # all validation before Ray
    return run.run_study(
        trials,
        args.study,
        Path(args.results).resolve(),
        _storage(args),
        track=args.track,
        hub_checks=not args.no_preflight,
        memory_check=not args.ignore_memory_estimate,
        max_concurrent=args.max_concurrent,
        address=args.address,
        verbose=args.verbose,
        command_line=args.command_line,
    )


def cmd_report(args) -> int:
    from farm import results, run  # pandas, matplotlib and Ray: not at the CLI's start, as in cmd_run

    target = Path(args.study)
    if target.is_dir():
        try:
            trials, results_dir = results.saved_trials(target), target.resolve().parent
        except (FileNotFoundError, ValueError) as e:
            raise StudyError(str(e)) from None
    else:
        trials, results_dir = _load(args, target), Path(args.results).resolve()
    path, _ = run.write_outputs(results_dir, trials)
    print(f"farm: report at {path} and {path.with_suffix('.html')}")
    return 0


def cmd_doctor(args) -> int:
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
    from farm import report  # pandas and matplotlib: not at the CLI's start

    try:
        print(report.compare(Path(args.a), Path(args.b)))
    except (FileNotFoundError, ValueError) as e:
        raise StudyError(str(e)) from None
    return 0


def cmd_safety_score(args) -> int:
    import json
    import math

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


if __name__ == "__main__":
    sys.exit(main())
