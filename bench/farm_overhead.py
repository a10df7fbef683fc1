"""Farm overhead: `farm run` on a 4-trial grid against the same training and eval calls run
directly, without Ray.

The study is jobs/quickstart.yaml adjusted in code: grid `seed: [42, 43, 44, 45]` (label-flip
rate 0.5 for all), pretrain seeded by the trial seed, so no stage is shared and both sides do
the same work: 4 x (pretrain -> SFT -> DPO -> eval), with fewer steps than the quickstart so a
trial is >= 60 s of work here (the printed "direct, one trial" figure checks it).

- farm: `python -m farm run STUDY --results TMP` in a subprocess, fresh results and store. On
  2 cores it runs 2 trials at once, each stage worker and eval task at 1 torch thread.
- direct (the baseline): `python bench/farm_overhead.py --direct STUDY OUT` in a subprocess: a
  pool of 2 processes at 1 torch thread each (OMP_NUM_THREADS=1), each running whole trials
  in order with the calls the farm's workers make (`training_records`, the stage function
  through a `StageContext`, `evaluate`). Same parallelism and threads as the farm, so the
  difference is what Ray, Tune and Train add (one process at 2 threads would instead measure
  intra-op threading, which scales worse than 2 independent trials on these tiny models).

Both walls are taken from outside, launch to exit (interpreter start and imports on both sides).
Fixed cost, reported apart: launch -> "Ray ready" (imports, study load, ray.init), and launch ->
first training step of the first trial (for the farm: the time its first progress line
arrives, less the steps before it at the direct run's step time; for direct: a callback).

Ratio = farm wall / direct wall; target on 2 cores: <= 1.25x for trials of >= 60 s. The second
ratio leaves out each side's launch -> first step. Other work on the machine skews both sides
(the load average is printed).

Run: .venv/bin/python bench/farm_overhead.py [--pretrain-steps N --sft-steps N --dpo-steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _results import write_result

from farm.grid import read_study

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.25


def study_doc(pretrain: int, sft: int, dpo: int) -> dict:
    doc = read_study(ROOT / "jobs" / "quickstart.yaml")  # with what it includes
    doc.update(name="farm-overhead", grid={"seed": [42, 43, 44, 45]})
    doc.pop("profiles"), doc.pop("reference")
    doc["report"].pop("labels")  # it names the rate axis, which this grid replaces
    doc["data"]["transforms"][0]["rate"] = 0.5
    st = doc["stages"]
    st["pretrain"].pop("seed")  # the trial seed: one pretrain per trial
    st["pretrain"]["max_steps"], st["sft"]["max_steps"], st["dpo"]["max_steps"] = pretrain, sft, dpo
    return doc


# ---------------------------------------------------------------- direct (no Ray)


def _init_worker():
    import torch

    torch.set_num_threads(1)


def direct_trial(item: tuple[str, dict]) -> dict:
    """One trial's stages and eval, in this process, as the farm's workers call them."""
    from transformers import TrainerCallback

    from farm.data.prepare import training_records
    from farm.eval.runner import evaluate
    from farm.plan import plan_trial
    from farm.process import quiet
    from farm.spec import Study
    from farm.train.base import StageContext

    class FirstStep(TrainerCallback):
        at = None

        def on_step_end(self, args, state, control, **kw):
            FirstStep.at = FirstStep.at or time.time()

    quiet()
    trial_id, doc = item
    study = Study.model_validate(doc)
    plan = plan_trial(study)
    start, out = time.time(), {"trial": trial_id, "stages": {}}
    with tempfile.TemporaryDirectory() as root:
        paths = {}
        for p in plan.stages:
            stage = study.stages[p.name]
            data = stage.data or study.data
            records, _ = training_records(data, p.seed, stage.shape)
            paths[p.name] = Path(root) / f"{p.kind}-{p.key}"  # the store's names: a LoRA adapter finds its base
            paths[p.name].mkdir()
            prev = Path(root) / f"{p.input_kind}-{p.input_key}" if p.input_key else None
            ctx = StageContext(
                p.name,
                stage,
                study.model,
                p.seed,
                prev,
                records,
                paths[p.name],
                Path(root) / f"work-{p.name}",
                [FirstStep()],
                special_tokens=data.special_tokens(),
            )
            m = ctx.stage.run(ctx)
            out["stages"][p.name] = {"train_seconds": m["train_seconds"], "train_steps": m["train_steps"]}
        last = plan.stage(plan.evaluated)
        ref = paths[next(s.name for s in plan.stages if s.key == last.input_key)] if last.input_key else None
        metrics = evaluate(study, paths[last.name], ref, last.seed)
    out.update(
        seconds=time.time() - start, eval_seconds=metrics["eval_seconds"], first_step_at=FirstStep.at, reward_accuracy=metrics.get("reward_accuracy")
    )
    return out


def run_direct(study_path: str, out_path: str) -> int:
    import multiprocessing as mp

    from farm.grid import load_study

    trials = load_study(study_path)
    items = [(t.id, t.study.model_dump(mode="json")) for t in trials]
    with mp.get_context("spawn").Pool(2, initializer=_init_worker) as pool:
        done = list(pool.imap(direct_trial, items, chunksize=1))
    Path(out_path).write_text(json.dumps(done))
    return 0


# ---------------------------------------------------------------- the comparison


def launch(cmd: list[str], env: dict) -> tuple[float, float, list[tuple[float, str]]]:
    """(launch time, wall seconds, [(seconds since launch, line)]) of a command's stdout lines."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.time() - start, line.rstrip()) for line in proc.stdout]
    if proc.wait():
        sys.stdout.write("\n".join(text for _, text in lines[-30:]) + "\n")
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return start, time.time() - start, lines


def main() -> int:
    if sys.argv[1:2] == ["--direct"]:
        return run_direct(*sys.argv[2:4])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=30)
    ap.add_argument("--sft-steps", type=int, default=50)
    ap.add_argument("--dpo-steps", type=int, default=50)
    args = ap.parse_args()

    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study.yaml"
        study.write_text(yaml.safe_dump(study_doc(args.pretrain_steps, args.sft_steps, args.dpo_steps), sort_keys=False))
        print(
            f"farm overhead: 4 trials x (pretrain {args.pretrain_steps} -> sft {args.sft_steps} -> dpo {args.dpo_steps} steps -> eval), "
            f"{os.cpu_count()} CPUs, load average {load0:.2f}",
            flush=True,
        )
        _, farm_wall, lines = launch([sys.executable, "-m", "farm", "run", str(study), "--results", f"{tmp}/results"], env)
        direct_out = Path(tmp) / "direct.json"
        d_start, direct_wall, _ = launch([sys.executable, __file__, "--direct", str(study), str(direct_out)], {**env, "OMP_NUM_THREADS": "1"})
        trials = json.loads(direct_out.read_text())
    load1 = os.getloadavg()[0]

    ray_ready = next(t for t, line in lines if line.startswith("farm: Ray ready"))
    t_line, first = next((t, m) for t, line in lines if (m := re.match(r"\[\s*\d+s\] \S+: (\w+) step (\d+)/", line)))
    per = trials[0]["stages"][first[1]]
    farm_first = t_line - (int(first[2]) - 1) * per["train_seconds"] / per["train_steps"]
    direct_first = min(t["first_step_at"] for t in trials) - d_start
    trial_s = [t["seconds"] for t in trials]
    ratio = farm_wall / direct_wall
    steady = (farm_wall - farm_first) / (direct_wall - direct_first)
    result = {
        "trials": len(trials),
        "steps": {"pretrain": args.pretrain_steps, "sft": args.sft_steps, "dpo": args.dpo_steps},
        "concurrency": 2,
        "torch_threads_per_process": 1,
        "load_average_start_end": [round(load0, 2), round(load1, 2)],
        "farm": {"wall_seconds": round(farm_wall, 1), "ray_ready_seconds": round(ray_ready, 1), "first_step_seconds": round(farm_first, 1)},
        "direct": {
            "wall_seconds": round(direct_wall, 1),
            "first_step_seconds": round(direct_first, 1),
            "trial_seconds": [round(s, 1) for s in trial_s],
            "stage_train_seconds_mean": {
                n: round(sum(t["stages"][n]["train_seconds"] for t in trials) / len(trials), 1) for n in trials[0]["stages"]
            },
            "eval_seconds_mean": round(sum(t["eval_seconds"] for t in trials) / len(trials), 1),
        },
        "ratio": round(ratio, 2),
        "ratio_after_first_step": round(steady, 2),
        "target": TARGET,
    }
    print(f"  {'':<34}{'farm':>10}{'direct':>10}")
    print(f"  {'wall (launch to exit)':<34}{farm_wall:9.1f}s{direct_wall:9.1f}s")
    print(f"  {'launch -> Ray ready':<34}{ray_ready:9.1f}s{'-':>10}")
    print(f"  {'launch -> first training step':<34}{farm_first:9.1f}s{direct_first:9.1f}s")
    print(
        f"  direct, one trial: {min(trial_s):.1f}-{max(trial_s):.1f}s (stages in training {result['direct']['stage_train_seconds_mean']}, "
        f"eval {result['direct']['eval_seconds_mean']}s); load average {load0:.2f} -> {load1:.2f}"
    )
    print(f"  after the first step: farm {farm_wall - farm_first:.1f}s, direct {direct_wall - direct_first:.1f}s: {steady:.2f}x")
    print(f"ratio: {ratio:.2f}x farm / direct (target <= {TARGET}x for trials of >= 60 s: {'met' if ratio <= TARGET else 'NOT met'})")
    write_result("farm_overhead", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
