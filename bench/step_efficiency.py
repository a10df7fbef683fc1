"""Step efficiency: how close a training step of the quickstart comes to this CPU's FLOP bound,
and what the farm adds to a whole trial.

Steps (one process, no Ray, 1 torch thread, as a farm worker at `cpus_per_worker: 1`): the
quickstart's pretrain -> SFT -> DPO run directly through the stage functions, SFT and DPO for
--steps steps each, twice: with TRL's fused LM head as TRL ships it (the baseline: what the farm
ran before issue 23; on a CPU its chunked kernel, every position scored) and with the farm's
choice (farm.train.logprob: the plain LM head, labelled positions only). Per stage: the median step time (steps after the first
two), the step's FLOPs counted by torch's FlopCounterMode (matmuls and attention, forward and
backward, the DPO reference's forward included), and the FLOP bound = the farm's step's FLOPs / this CPU's fp32
matmul throughput, measured here on the step's own GEMM shapes. Ratios: step / bound, and
chunked / farm.

Trial (--trial): one quickstart trial through `farm run` (Ray, Tune, Train; a fresh store)
against the sum of the same stages and eval run directly in one process; ratio farm / direct.

Run: .venv/bin/python bench/step_efficiency.py [--steps 20] [--trial]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import yaml
from _results import write_result

from farm.grid import read_study

ROOT = Path(__file__).resolve().parents[1]


def quickstart(steps: int | None = None) -> dict:
    """One trial of the quickstart (rate 0.5, seed 42); SFT and DPO cut to `steps` if given."""
    doc = read_study(ROOT / "jobs" / "quickstart.yaml")  # with what it includes
    doc.pop("profiles"), doc.pop("reference")
    doc["report"].pop("labels")  # it names the rate axis, which this grid replaces
    doc.update(name="step-efficiency", grid={"seed": [42]})
    doc["data"]["transforms"][0]["rate"] = 0.5
    for name in ("sft", "dpo"):
        if steps:
            doc["stages"][name]["max_steps"] = steps
    return doc


def matmul_gflops(shapes: list[tuple[int, int, int]], seconds: float = 1.0) -> float:
    """fp32 GEMM throughput of this process (its torch threads) on the given (m, k, n) shapes."""
    import torch

    flops, spent = 0, 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm
        start, reps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / len(shapes):
            a @ b
            reps += 1
        spent += time.perf_counter() - start
        flops += 2 * m * k * n * reps
    return flops / spent / 1e9


def run_steps(steps: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import TrainerCallback

    from farm.data.prepare import training_records
    from farm.plan import plan_trial
    from farm.process import quiet
    from farm.spec import Study
    from farm.train import logprob
    from farm.train.base import StageContext

    class Steps(TrainerCallback):
        """Step times, and the FLOPs of one step (the third: past warm-up)."""

        def __init__(self):
            self.times, self.flops, self.counter = [], None, None

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()
            if state.global_step == 2:
                self.counter = FlopCounterMode(display=False)
                self.counter.__enter__()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)
            if self.counter is not None and self.flops is None:
                self.counter.__exit__(None, None, None)
                self.flops = self.counter.get_total_flops()

    torch.set_num_threads(1)
    quiet()
    doc = quickstart(steps)
    doc["seed"] = doc.pop("grid")["seed"][0]  # the one trial, validated without grid expansion
    study = Study.model_validate(doc)
    plan = plan_trial(study)
    out: dict = {}
    with tempfile.TemporaryDirectory() as root:

        def stage(p, tag: str) -> Steps:
            """Run stage `p` into <root>/<tag>/ (the shared pretrain's folder is "pretrain")."""
            s = study.stages[p.name]
            data = s.data or study.data
            records, _ = training_records(data, p.seed, s.shape)
            path = Path(root) / tag / f"{p.kind}-{p.key}"
            path.mkdir(parents=True)
            prev = Path(root) / ("pretrain" if p.name == "sft" else tag) / f"{p.input_kind}-{p.input_key}" if p.input_key else None
            cb = Steps()
            ctx = StageContext(
                p.name, s, study.model, p.seed, prev, records, path, Path(root) / f"work-{tag}-{p.name}", [cb], special_tokens=data.special_tokens()
            )
            ctx.stage.run(ctx)
            return cb

        with mock.patch.object(logprob, "install", lambda: None):  # TRL as shipped until the farm's turn
            stage(plan.stage("pretrain"), "pretrain")
        for tag in ("chunked", "farm"):
            # The baseline (first): TRL's fused head as TRL ships it, the farm's switch not installed yet.
            choice = mock.patch.object(logprob, "install", lambda: None) if tag == "chunked" else contextlib.nullcontext()
            with choice:
                for p in plan.stages:
                    if p.name != "pretrain":
                        cb = stage(p, tag)
                        out.setdefault(p.name, {})[tag] = {"step_seconds": statistics.median(cb.times[2:]), "flops": cb.flops}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--trial", action="store_true", help="also time one trial through `farm run` against it run directly")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    steps = run_steps(args.steps)
    # GEMM shapes of the quickstart's steps: batch 16 x 96 tokens through 128-wide layers and the 4k head.
    gflops = matmul_gflops([(1536, 128, 128), (1536, 128, 512), (1536, 128, 4096), (1536, 4096, 128)])
    result: dict = {"threads": 1, "cpus": os.cpu_count(), "load_average_start": round(load0, 2), "matmul_gflops": round(gflops, 1), "stages": {}}
    print(
        f"step efficiency: quickstart SFT and DPO, {args.steps} steps each, 1 torch thread; fp32 GEMM {gflops:.1f} GFLOP/s; load average {load0:.2f}"
    )
    print(f"  {'stage':<6}{'kernel':<9}{'step':>9}{'GFLOP':>8}{'bound':>9}{'step/bound':>12}")
    for name, runs in steps.items():
        # The step's arithmetic: the farm's count (labelled positions only); the baseline does more of it.
        bound = runs["farm"]["flops"] / gflops / 1e9
        for tag, r in runs.items():
            r.update(bound_seconds=bound, ratio_to_bound=r["step_seconds"] / bound)
            print(f"  {name:<6}{tag:<9}{r['step_seconds']:8.3f}s{r['flops'] / 1e9:8.1f}{bound:8.3f}s{r['ratio_to_bound']:11.1f}x")
        speedup = runs["chunked"]["step_seconds"] / runs["farm"]["step_seconds"]
        print(f"  {name}: TRL's chunked kernel / the farm's choice = {speedup:.2f}x per step")
        result["stages"][name] = {**runs, "chunked_over_farm": round(speedup, 2)}
    if args.trial:
        result["trial"] = trial()
    write_result("step_efficiency", result)
    return 0


def trial() -> dict:
    """One quickstart trial: `farm run` (fresh store) against its stages and eval run directly."""
    from farm_overhead import direct_trial, launch  # bench/ is on the path of a script run from it

    from farm.grid import load_study

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study.yaml"
        study.write_text(yaml.safe_dump(quickstart(), sort_keys=False))  # the quickstart's own epochs
        _, farm_wall, _ = launch([sys.executable, "-m", "farm", "run", str(study), "--results", f"{tmp}/results"], env)
        (t,) = load_study(str(study))
        start = time.time()
        direct_trial((t.id, t.study.model_dump(mode="json")))
        direct_wall = time.time() - start
    ratio = farm_wall / direct_wall
    print(
        f"trial: farm run {farm_wall:.1f}s (launch to exit) against the stages and eval run directly {direct_wall:.1f}s "
        f"(in-process, imports excluded): {ratio:.2f}x"
    )
    return {"farm_wall_seconds": round(farm_wall, 1), "direct_seconds": round(direct_wall, 1), "ratio": round(ratio, 2)}


if __name__ == "__main__":
    raise SystemExit(main())
