"""After the grid (Study E): every pair of the study's models, within each seed, compared prompt by
prompt on the answers their evaluations kept, judged by a reward model; the judgements, win
rates and Bradley-Terry Elo ratings (bootstrap intervals) are written beside the study table."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd

from farm.config import axis_labels
from farm.eval.harmlessness import ANSWERS_FILE
from farm.eval.pairwise import bootstrap_elo, judge_by_reward, win_rate_table, win_tests
from farm.files import atomic_write
from farm.models import for_inference, reward_scores
from farm.process import quiet
from farm.registry import steps
from farm.store import Store

ARENA_DIR = "pairwise"  # results/<study>/pairwise/: judgements.csv, elo.csv, win_rate.csv, win_tests.csv, examples.json


def model_name(trial) -> str:
    """A trial's model: its grid point without the seed, as trial ids write it ("stages=rl-cai")."""
    short = axis_labels(list(trial.axes))
    return ", ".join(f"{short[a]}={v}" for a, v in trial.axes.items() if a != "seed") or "model"


def contestants(trials, plans, store) -> list[dict]:
    """Each evaluated trial's model name, seed and kept answers (read on the driver: the arena task
    may run on another node)."""
    out = []
    for t in trials:
        if store.done("eval", plans[t.id].eval_key):
            path = store.path("eval", plans[t.id].eval_key) / ANSWERS_FILE
            if path.exists():
                out.append({"model": model_name(t), "seed": t.study.seed, "answers": json.loads(path.read_text())})
    return out


def judge_ref(trials, plans, judge: str) -> tuple[str, str] | None:
    """(kind, key) of the judge's artifact when it is a stage of the study (None: a hub id or path)."""
    for t in trials:
        for name, kind, key in plans[t.id].eval_refs:
            if name == judge:
                return kind, key
    return None


def run_arena(entries: list[dict], judge: str, eval_spec, resolve=None) -> dict[str, bytes]:
    """Judge every pair of models of each seed on their shared prompts; returns the files to write
    under results/<study>/pairwise/ (the driver writes them: results are local to it)."""
    p = eval_spec.pairwise
    model, tok = for_inference(judge, resolve, reward=True, revision=eval_spec.revisions.get(judge))
    answers = {(e["seed"], e["model"]): e["answers"] for e in entries}
    judgements, rewards = [], []
    for seed in sorted({s for s, _ in answers}):
        models = {m: rows for (s, m), rows in answers.items() if s == seed}
        ids = [r["id"] for r in next(iter(models.values()))]
        if any([r["id"] for r in rows] != ids for rows in models.values()):
            raise ValueError(f"eval.pairwise: the models of seed {seed} answered different prompts; compare models evaluated on the same data")
        scores = {}
        for m, rows in models.items():
            scores[m] = reward_scores(
                model,
                tok,
                [r["prompt"] for r in rows],
                [r["answer"] for r in rows],
                eval_spec.batch_size,
                eval_spec.max_length,
                eval_spec.max_prompt_length,
            ).tolist()
            rewards += [{"seed": seed, "model": m, "prompt": i, "reward": v} for i, v in enumerate(scores[m])]
        judgements += judge_by_reward(scores, seed=seed, tie=p.tie)
    names = list(dict.fromkeys(m for _, m in answers))
    first = min(s for s, _ in answers)
    shown = {m: rows for (s, m), rows in answers.items() if s == first}
    prompts = next(iter(shown.values()))
    examples = [{"prompt": prompts[i]["prompt"], **{m: rows[i]["answer"] for m, rows in shown.items()}} for i in range(min(p.examples, len(prompts)))]
    return {
        "judgements.csv": pd.DataFrame([dataclasses.asdict(j) for j in judgements]).to_csv(index=False).encode(),
        "rewards.csv": pd.DataFrame(rewards).to_csv(index=False).encode(),
        "elo.csv": bootstrap_elo(judgements, names, n=p.bootstrap, seed=0, anchor=p.anchor).to_csv().encode(),
        "win_rate.csv": win_rate_table(judgements, names).to_csv().encode(),
        "win_tests.csv": win_tests(judgements, names).to_csv(index=False).encode(),
        "examples.json": json.dumps(examples, indent=2, ensure_ascii=False).encode(),
    }


def arena_tables(d: Path, examples_width: int = 300) -> list:
    """Study E's pairwise comparison, as the arena wrote it: Elo with intervals, win rates, and
    the first prompts' answers side by side."""
    if not (d / "elo.csv").exists():
        return []
    elo = pd.read_csv(d / "elo.csv", index_col=0).sort_values("elo", ascending=False)
    shown = pd.DataFrame(
        {
            "model": elo.index,
            "Elo": elo["elo"].round(1),
            "95% interval": [f"[{lo:.1f}, {hi:.1f}]" for lo, hi in zip(elo["low"], elo["high"])],
            "judgements": elo["n"],
        }
    )
    wins = pd.read_csv(d / "win_rate.csv", index_col=0)
    wins.insert(0, "model (row) against", wins.index)
    examples = pd.DataFrame(json.loads((d / "examples.json").read_text()))
    examples = examples.map(lambda t: t if len(str(t)) <= examples_width else str(t)[:examples_width] + " …")
    note = "judged by a reward model prompt by prompt, within each seed; ties count half"
    tests = (
        [
            (
                "Wins tested",
                pd.read_csv(d / "win_tests.csv"),
                f"{note}; sign test of wins against losses over the prompts (McNemar's exact test; ties carry no evidence), "
                "pooled over seeds and per seed; it tests these models on these prompts. q: Benjamini-Hochberg across the pairs",
            )
        ]
        if (d / "win_tests.csv").exists()
        else []
    )
    return [
        ("Elo (Bradley-Terry maximum likelihood)", shown, f"{note}; intervals: bootstrap over prompts"),
        ("Win rate", wins, f"{note}; (wins + ties / 2) / N of the row model against the column model"),
        *tests,
        ("Example answers", examples, "the first held-out prompts of the first seed, each model's answer"),
    ]


def arena_task(entries: list, judge: str, judge_ref, storage: str, eval_spec) -> dict:
    """The arena on a worker (a Ray task with the eval's resources); returns the files to write."""
    quiet()
    store = Store(storage)
    if judge_ref:  # a stage of the study: its artifact, fetched on this node
        judge = str(store.path(*judge_ref))
    return run_arena(entries, judge, eval_spec, store.path)


class Arena:
    """Study E's pairwise comparison of the study's models after the grid (`eval.pairwise`)."""

    def wanted(self, study) -> bool:
        return study.eval.pairwise is not None

    def done(self, out: Path) -> bool:
        return (out / ARENA_DIR / "elo.csv").exists()

    def run(self, trials, plans, store, out: Path) -> None:
        """Judge every pair of the study's models on their kept answers (a Ray task, with the eval's
        resources); the driver writes what it returns under `out`/pairwise/."""
        import ray

        study = trials[0].study
        entries = contestants(trials, plans, store)
        models = {e["model"] for e in entries}
        if len(models) < 2:
            print("farm: pairwise comparison skipped: fewer than two models have answers", file=sys.stderr)
            return
        res, judge = study.eval.resources, study.eval.pairwise.judge
        task = ray.remote(arena_task).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, accelerator_type=res.accelerator_type)
        files = ray.get(task.remote(entries, judge, judge_ref(trials, plans, judge), str(store.root), study.eval))
        for name, data in files.items():
            atomic_write(out / ARENA_DIR / name, data)
        print(f"farm: pairwise comparison of {len(models)} models in {out / ARENA_DIR}/ (elo.csv, win_rate.csv)")

    def tables(self, out: Path) -> list:
        return arena_tables(out / ARENA_DIR)


steps.register("pairwise", doc=Arena.__doc__)(Arena())
