"""Stage reuse: what the content-keyed store saves on a grid whose trials share SFT stages, and
what a rerun of a finished study costs.

The study is jobs/quickstart.yaml without pretraining (SFT from the base model, then DPO), in
fewer steps, as a 3 x 2 grid: an axis of 3 DPO variants (beta 0.05, 0.1, 0.2; the whole
`stages` section is the axis value) x 2 SFT data variants (label-flip rate 0.0, 0.5). The SFT
seed is fixed, so the 6 trials share 2 SFT stages. The DPO axis comes first, so the two trials
Tune starts together need different SFT stages.

- shared: `farm run` in a fresh results folder and store. Counted: SFT artifacts in the store
  (`<storage>/artifacts/sft-*` with a `farm-artifact.json` marker); must be 2.
- cache disabled (the baseline): the same grid in one `farm run` (one Ray start, 2 trials at a
  time, like the shared run), but with the SFT seed set per DPO variant (1, 2, 3), so no two
  trials have the same SFT key and each trains its own, as with no reuse at all (the seed
  changes the weights, not the work). Its wall is the grid's, comparable with the shared run's.
  Running each trial alone with its own store would add 5 Ray starts and run 1 trial at a time
  on 2 cores: it would measure that, not the reuse.
- rerun: the shared run's command again, same results and store: every trial is finished, so
  the farm only rebuilds the table and report. Target: <= 5% of the first run's wall.

Ratios: shared / cache-disabled wall (below 1: the reuse saves time; sharing also splits a
trial's SFT and DPO into two Ray Train fits, each with a fixed start cost, which eats into the
saving when SFT is short), and rerun / first run.

Run: .venv/bin/python bench/stage_reuse.py [--sft-steps N --dpo-steps N]
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _results import write_result

from farm.grid import read_study

ROOT = Path(__file__).resolve().parents[1]
TARGET_RERUN = 0.05
BETAS = [0.05, 0.1, 0.2]


def study_doc(sft_steps: int, dpo_steps: int, shared: bool) -> dict:
    doc = read_study(ROOT / "jobs" / "quickstart.yaml")  # with what it includes
    doc.pop("profiles"), doc.pop("reference")
    doc["name"] = "stage-reuse"
    stages = doc.pop("stages")
    stages.pop("pretrain")
    stages["sft"]["max_steps"], stages["dpo"]["max_steps"] = sft_steps, dpo_steps
    doc["eval"]["limit"] = 100
    variants = {}
    for i, beta in enumerate(BETAS, 1):
        v = copy.deepcopy(stages)
        v["sft"]["seed"] = 0 if shared else i
        v["dpo"]["beta"] = beta
        variants[f"beta{beta}"] = v
    doc["grid"] = {"stages": variants, "data.transforms.0.rate": [0.0, 0.5]}
    return doc


def farm_run(study: Path, results: Path) -> float:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "farm", "run", str(study), "--results", str(results)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.stdout.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"farm run {study} failed ({proc.returncode})")
    return wall


def trained(results: Path, kind: str) -> int:
    return sum((p / "farm-artifact.json").exists() for p in (results / ".store" / "artifacts").glob(f"{kind}-*"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft-steps", type=int, default=80)
    ap.add_argument("--dpo-steps", type=int, default=10)
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    print(
        f"stage reuse: 6 trials (3 DPO x 2 SFT variants), sft {args.sft_steps} steps, dpo {args.dpo_steps} steps, "
        f"{os.cpu_count()} CPUs, load average {load0:.2f}",
        flush=True,
    )
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shared in (("shared", True), ("no_cache", False)):
            study, results = Path(tmp) / f"{name}.yaml", Path(tmp) / name
            study.write_text(yaml.safe_dump(study_doc(args.sft_steps, args.dpo_steps, shared), sort_keys=False))
            wall = farm_run(study, results)
            runs[name] = {"wall_seconds": round(wall, 1), "sft_trained": trained(results, "sft"), "dpo_trained": trained(results, "dpo")}
            print(f"  ({name}: {wall:.1f}s)", flush=True)
        before = trained(Path(tmp) / "shared", "sft") + trained(Path(tmp) / "shared", "dpo")
        rerun = farm_run(Path(tmp) / "shared.yaml", Path(tmp) / "shared")
        rerun_new = trained(Path(tmp) / "shared", "sft") + trained(Path(tmp) / "shared", "dpo") - before
    load1 = os.getloadavg()[0]
    shared, none = runs["shared"], runs["no_cache"]
    ratio, rerun_ratio = shared["wall_seconds"] / none["wall_seconds"], rerun / shared["wall_seconds"]
    result = {
        "trials": 6,
        "steps": {"sft": args.sft_steps, "dpo": args.dpo_steps},
        "load_average_start_end": [round(load0, 2), round(load1, 2)],
        "shared": shared,
        "cache_disabled": none,
        "rerun": {"wall_seconds": round(rerun, 1), "stages_trained": rerun_new},
        "ratio": round(ratio, 2),
        "rerun_ratio": round(rerun_ratio, 3),
        "target_rerun_ratio": TARGET_RERUN,
    }
    print(f"  {'run':<34}{'wall':>9}{'SFT trained':>13}{'DPO trained':>13}")
    print(f"  {'shared SFT stages (farm)':<34}{shared['wall_seconds']:8.1f}s{shared['sft_trained']:>13}{shared['dpo_trained']:>13}")
    print(f"  {'cache disabled (baseline)':<34}{none['wall_seconds']:8.1f}s{none['sft_trained']:>13}{none['dpo_trained']:>13}")
    print(f"  {'rerun of the finished study':<34}{rerun:8.1f}s   {rerun_new} new stages")
    print(
        f"  SFT stages trained with sharing: {shared['sft_trained']} (must be 2: {'ok' if shared['sft_trained'] == 2 else 'WRONG'}); "
        f"load average {load0:.2f} -> {load1:.2f}"
    )
    print(f"ratio: {ratio:.2f}x shared / cache-disabled wall")
    print(f"ratio: {rerun_ratio:.3f}x rerun / first run (target <= {TARGET_RERUN}: {'met' if rerun_ratio <= TARGET_RERUN else 'NOT met'})")
    write_result("stage_reuse", result)
    return 0 if shared["sft_trained"] == 2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
