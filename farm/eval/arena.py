"""After the grid (Study E): every pair of the study's models, within each seed, compared prompt by
prompt on the answers their evaluations kept, judged by a reward model; the judgements, win
rates and Bradley-Terry Elo ratings (bootstrap intervals) are written beside the study table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

ARENA_DIR = "pairwise"  # results/<study>/pairwise/: judgements.csv, elo.csv, win_rate.csv, examples.json


def model_name(trial) -> str:
    """A trial's model: its grid point without the seed, as trial ids write it ("stages=rl-cai")."""
    from farm.spec import axis_labels

    short = axis_labels(list(trial.axes))
    return ", ".join(f"{short[a]}={v}" for a, v in trial.axes.items() if a != "seed") or "model"


def contestants(trials, plans, store) -> list[dict]:
    """Each evaluated trial's model name, seed and answers file; the judge's artifact if it is a stage."""
    from farm.tune import ANSWERS_FILE

    out = []
    for t in trials:
        path = store.path("eval", plans[t.id].eval_key) / ANSWERS_FILE
        if path.exists():
            out.append({"model": model_name(t), "seed": t.study.seed, "answers": str(path)})
    return out


def judge_path(trials, plans, store, judge: str) -> str:
    for t in trials:
        for name, kind, key in plans[t.id].eval_refs:
            if name == judge:
                return str(store.path(kind, key))
    return judge  # a hub id or a local path


def run_arena(entries: list[dict], judge: str, eval_spec, out_dir: Path) -> pd.DataFrame:
    """Judge every pair of models of each seed on their shared prompts and write the results;
    returns the Elo table."""
    from farm.cache import atomic_write
    from farm.eval.pairwise import bootstrap_elo, judge_by_reward, win_rate_table
    from farm.eval.reward import reward_scores
    from farm.models import load_reward_model

    p = eval_spec.pairwise
    model, tok = load_reward_model(judge)
    answers = {(e["seed"], e["model"]): json.loads(Path(e["answers"]).read_text()) for e in entries}
    judgements, rewards = [], []
    for seed in sorted({s for s, _ in answers}):
        models = {m: rows for (s, m), rows in answers.items() if s == seed}
        ids = [r["id"] for r in next(iter(models.values()))]
        if any([r["id"] for r in rows] != ids for rows in models.values()):
            raise ValueError(f"eval.pairwise: the models of seed {seed} answered different prompts; compare models evaluated on the same data")
        scores = {}
        for m, rows in models.items():
            scores[m] = reward_scores(model, tok, [r["prompt"] for r in rows], [r["answer"] for r in rows],
                                      eval_spec.batch_size, eval_spec.max_length, eval_spec.max_prompt_length).tolist()
            rewards += [{"seed": seed, "model": m, "prompt": i, "reward": v} for i, v in enumerate(scores[m])]
        judgements += judge_by_reward(scores, seed=seed, tie=p.tie)
    names = list(dict.fromkeys(m for _, m in answers))
    out_dir = Path(out_dir)
    elo = bootstrap_elo(judgements, names, n=p.bootstrap, seed=0, anchor=p.anchor)
    table = pd.DataFrame([dataclasses.asdict(j) for j in judgements])
    atomic_write(out_dir / "judgements.csv", table.to_csv(index=False).encode())
    atomic_write(out_dir / "rewards.csv", pd.DataFrame(rewards).to_csv(index=False).encode())
    atomic_write(out_dir / "elo.csv", elo.to_csv().encode())
    atomic_write(out_dir / "win_rate.csv", win_rate_table(judgements, names).to_csv().encode())
    first = min(s for s, _ in answers)
    shown = {m: rows for (s, m), rows in answers.items() if s == first}
    prompts = next(iter(shown.values()))
    examples = [{"prompt": prompts[i]["prompt"], **{m: rows[i]["answer"] for m, rows in shown.items()}} for i in range(min(p.examples, len(prompts)))]
    atomic_write(out_dir / "examples.json", json.dumps(examples, indent=2, ensure_ascii=False).encode())
    return elo
