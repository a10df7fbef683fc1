"""After the grid (Study E): every pair of the study's models, within each seed, compared prompt by
prompt on the answers their evaluations kept, judged by a reward model; the judgements, win
rates and Bradley-Terry Elo ratings (bootstrap intervals) are written beside the study table."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd

ARENA_DIR = "pairwise"  # results/<study>/pairwise/: judgements.csv, elo.csv, win_rate.csv, win_tests.csv, examples.json


def model_name(trial) -> str:
    """A trial's model: its grid point without the seed, as trial ids write it ("stages=rl-cai")."""
    from farm.spec import axis_labels

    short = axis_labels(list(trial.axes))
    return ", ".join(f"{short[a]}={v}" for a, v in trial.axes.items() if a != "seed") or "model"


def contestants(trials, plans, store) -> list[dict]:
    """Each evaluated trial's model name, seed and kept answers (read on the driver: the arena task
    may run on another node)."""
    from farm.tune import ANSWERS_FILE

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
    from farm.eval.pairwise import bootstrap_elo, judge_by_reward, win_rate_table, win_tests
    from farm.models import for_inference, reward_scores

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
