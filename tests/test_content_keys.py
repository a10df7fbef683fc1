"""Local inputs enter keys by content (farm.config.content): editing a file a stage, labelling run or
evaluation reads changes exactly the keys that read it; digests are cached by (path, size, mtime,
ctime, inode); `farm plan` shows what a reused stage's key was made from and `--why` its document."""

import json
import os
from pathlib import Path

import pytest

from farm import files
from farm.cli import main
from farm.config import StudyError
from farm.grid import expand
from farm.plan import plan_trial
from farm.store import Store

OLD = 1_600_000_000 * 10**9  # an mtime long past


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    """A fresh cache of digests per test, and a count of the files actually read."""
    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "farm-cache"))
    monkeypatch.setattr(files, "_digests", {})
    monkeypatch.setattr(files, "RACY_NS", 0)  # the files here were all written just now (see the test of it)
    reads = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda path: reads.append(Path(path).name) or real(path))
    return reads


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.utime(path, ns=(OLD, OLD))
    return path


def weights(value: float, n: int = 256) -> bytes:
    """A safetensors file of one tensor: same size whatever the value, as a model retrained in place."""
    import numpy as np
    from safetensors.numpy import save

    return save({"w": np.full(n, value, dtype=np.float32)})


def pairs(n: int, tag: str = "") -> str:
    return "".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}{tag}", "rejected": f"bad {i}"}) + "\n" for i in range(n))


def study(tmp_path, **changes) -> dict:
    """A tiny study: an SFT stage on a local data file, a DPO stage on the bundled pairs, an eval."""
    doc = {
        "name": "content",
        "seed": 1,
        "model": {"base": "tiny-gpt2", "config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}},
        "data": {"sources": [{"name": "hh_rlhf", "limit": 40}], "holdout": 0.2},
        "stages": {
            "sft": {
                "max_steps": 1,
                "max_length": 32,
                "max_prompt_length": 16,
                "data": {"sources": [{"name": "file", "path": str(tmp_path / "mine.jsonl"), "records": "comparison"}]},
            },
            "dpo": {"max_steps": 1, "max_length": 32, "max_prompt_length": 16},
        },
        "eval": {"metrics": ["preference_accuracy"], "limit": 8},
    }
    for path, value in changes.items():
        node, *keys = [doc, *path.split(".")]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return doc


def plan(doc):
    return plan_trial(expand(doc, "s.yaml")[0].study)


def keys(p) -> dict[str, str]:
    return {**{s.name: s.key for s in p.stages}, **{f"label{i}": s.key for i, s in enumerate(p.labels)}, "eval": p.eval_key}


def changed(a, b) -> set[str]:
    ka, kb = keys(a), keys(b)
    return {n for n in ka if ka[n] != kb.get(n)}


def own(p, name: str) -> dict:
    """A stage's key document without the keys of what it starts from: what it reads itself."""
    return {k: v for k, v in p.stage(name).doc.items() if k != "input"}


def test_a_data_files_bytes_change_the_stages_that_read_it(tmp_path):
    data = write(tmp_path / "mine.jsonl", pairs(8))
    doc = study(tmp_path)
    before = plan(doc)
    assert plan(doc) == before  # same bytes, same keys
    write(data, pairs(8, tag="!"))  # same name, other rows
    after = plan(doc)
    # SFT reads the file; DPO and the eval start from SFT's model, and read nothing else that changed.
    assert changed(before, after) == {"sft", "dpo", "eval"}
    assert own(after, "dpo") == own(before, "dpo")
    file = after.stage("sft").doc["data"]["files"]["sources.0.path"]
    assert file == {"path": str(data), "sha256": files.sha256_file(data)}


def test_a_local_model_retrained_in_place_changes_every_key_that_reads_it(tmp_path):
    write(tmp_path / "mine.jsonl", pairs(8))
    model = tmp_path / "model"
    write(model / "config.json", json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64}))
    file = write(model / "model.safetensors", weights(0.0))
    write(model / ".cache" / "huggingface" / "download.lock", "x")  # hub bookkeeping: not the model
    doc = study(tmp_path, **{"model.base": str(model), "model.config": {}, "model.tokenizer": "farm-bpe", "data.labels": [{"scorer": "vader"}]})
    before = plan(doc)
    write(model / ".cache" / "huggingface" / "download.lock", "y")
    assert plan(doc) == before
    write(file, weights(1.0))  # retrained: same name, same size, other weights
    after = plan(doc)
    # Every stage starts from the model (DPO through SFT); the eval's reference is SFT's model. The
    # labelling of the study's rows reads no model.
    assert changed(before, after) == {"sft", "dpo", "eval"}
    assert after.labels == before.labels and after.eval_label == before.eval_label


def test_a_judge_folder_changes_only_the_eval(tmp_path):
    write(tmp_path / "mine.jsonl", pairs(8))
    judge = tmp_path / "judge"
    file = write(judge / "model.safetensors", weights(0.0))
    doc = study(tmp_path, **{"eval.metrics": ["preference_accuracy", "reward_score"], "eval.reward_model": str(judge)})
    before = plan(doc)
    write(file, weights(2.0))
    assert changed(before, plan(doc)) == {"eval"}


def test_a_local_task_file_changes_only_the_eval(tmp_path):
    write(tmp_path / "mine.jsonl", pairs(8))
    task = write(tmp_path / "tasks" / "mine.yaml", "task: my_task\ndataset_path: json\noutput_type: multiple_choice\n")
    doc = study(
        tmp_path,
        **{"eval.metrics": ["preference_accuracy", "benchmarks"], "eval.benchmarks": {"tasks": ["my_task"], "include": str(tmp_path / "tasks")}},
    )
    before = plan(doc)
    write(task, "task: my_task\ndataset_path: json\noutput_type: multiple_choice\nnum_fewshot: 0\n")
    after = plan(doc)
    assert changed(before, after) == {"eval"}
    assert "eval.benchmarks.include" in after.eval_doc["files"]
    with pytest.raises(StudyError, match="'other_task' has no bundled copy.*define it in"):
        plan(study(tmp_path, **{"eval.metrics": ["benchmarks"], "eval.benchmarks": {"tasks": ["other_task"], "include": str(task)}}))


def test_a_refusal_list_changes_only_the_evals_that_read_it(tmp_path):
    write(tmp_path / "mine.jsonl", pairs(8))
    harmless = {"eval.metrics": ["preference_accuracy", "harmlessness"]}
    before = plan(study(tmp_path, **harmless))
    after = plan(study(tmp_path, **harmless, **{"eval.refusals": ["I refuse"]}))
    assert changed(before, after) == {"eval"}
    # An eval without the harmlessness metric reads no refusal phrase: its key stays.
    assert changed(plan(study(tmp_path)), plan(study(tmp_path, **{"eval.refusals": ["I refuse"]}))) == set()


def test_labelled_data_files_change_the_labelling_run(tmp_path):
    write(tmp_path / "mine.jsonl", pairs(8))
    rows = write(tmp_path / "eval.jsonl", pairs(6))
    doc = study(tmp_path, **{"data.sources": [{"name": "file", "path": str(rows), "records": "comparison"}], "data.labels": [{"scorer": "vader"}]})
    before = plan(doc)
    assert before.eval_label == before.labels[0].key
    write(rows, pairs(6, tag="?"))
    after = plan(doc)
    # The study's data feeds the labelling run, DPO (no data of its own) and the eval; SFT reads its own file.
    assert changed(before, after) == {"label0", "dpo", "eval"}


def test_digests_are_cached_by_path_size_mtime_and_inode(tmp_path, digest_cache):
    data = write(tmp_path / "mine.jsonl", pairs(8))
    doc = study(tmp_path)
    plan(doc)
    assert digest_cache.count("mine.jsonl") == 1  # each trial's keys read the file once between them
    files._digests.clear()  # a new process: only the cache file remains
    digest_cache.clear()
    plan(doc)
    assert digest_cache == []
    os.utime(data, ns=(OLD + 10**9, OLD + 10**9))  # touched: read again
    plan(doc)
    assert digest_cache == ["mine.jsonl"]
    with open(data, "a") as f:  # grown, mtime put back: the size and the ctime tell
        f.write(pairs(1))
    os.utime(data, ns=(OLD + 10**9, OLD + 10**9))
    plan(doc)
    assert digest_cache == ["mine.jsonl", "mine.jsonl"]
    assert json.loads((tmp_path / "farm-cache" / files.DIGESTS).read_text())[str(data)][4] == files.sha256_file(data)


def test_a_file_written_just_now_is_not_cached(tmp_path, digest_cache, monkeypatch):
    monkeypatch.setattr(files, "RACY_NS", 2 * 10**9)
    data = write(tmp_path / "fresh.bin", b"x" * 10)  # changed now (its ctime): a rewrite within the same tick would keep its times
    files.content_digest(data)
    files.content_digest(data)
    assert digest_cache == ["fresh.bin", "fresh.bin"]


def test_an_unreadable_local_input_names_its_field(tmp_path):
    write(tmp_path / "mine.jsonl", pairs(8))
    model = tmp_path / "model"
    write(model / "config.json", "{}")
    (model / "model.safetensors").symlink_to(tmp_path / "gone")  # a weight file that is not there
    doc = study(tmp_path, **{"model.base": str(model), "model.config": {}, "model.tokenizer": "farm-bpe"})
    with pytest.raises(StudyError, match=r"^model.base: '.*model' cannot be read"):
        plan(doc)


def test_plan_shows_what_a_reused_stage_was_made_from_and_why_prints_its_document(tmp_path, write_study, capsys):
    data = write(tmp_path / "mine.jsonl", pairs(8))
    path = write_study(study(tmp_path))
    results = tmp_path / "results"
    p = plan(study(tmp_path))
    sft = p.stage("sft")
    with Store(results / ".store").writing("sft", sft.key, {}):  # as if trained
        pass
    assert main(["plan", str(path), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert f"sft        sft               {sft.key}  cached" in out
    assert f"<- file data.sources.0.path {data} sha256:{files.sha256_file(data)}" in out
    assert "<- input the base model tiny-gpt2" in out
    assert main(["plan", str(path), "--results", str(results), "--why", "sft"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["key"] == sft.key and entry["cached"] and entry["document"] == json.loads(json.dumps(sft.doc))
    assert files.digest(entry["document"]) == sft.key  # the document is exactly what the key hashes
    assert main(["plan", str(path), "--results", str(results), "--why", "nope"]) == 2
    assert "--why: 'nope' is neither a stage" in capsys.readouterr().err


# The quickstart's keys as of issue 19 (evals: issue 20, farm.eval.runner.VERSION 3: an eval keeps per-item values; issue 18: data.dev, the eval scores half the held-out rows). They change only when an input of theirs does: a new field of
# the study schema changes every key that dumps it (each artifact is then rebuilt once), and so does a
# bumped version (a stage kind's `version`, farm.eval.runner.VERSION, farm.label.stage.VERSION). Update these only for such a change, on purpose, and say so in its commit.
QUICKSTART_KEYS = {
    "rate=0.0_seed=42": (["97292b41197a4de1", "835be02ba6add049", "7b451aecae9b4756"], "ddc53209749f10fd"),
    "rate=0.0_seed=43": (["97292b41197a4de1", "5a1e71caa9fe21b3", "9e3b8668de902697"], "2d80d61bf165b3b1"),
    "rate=0.5_seed=42": (["97292b41197a4de1", "0d82eb79c812d363", "4bef671b75dc3a7d"], "ca7c9a0e5e9b196d"),
    "rate=0.5_seed=43": (["97292b41197a4de1", "d8996684da952760", "e6ce6a0e4dfce076"], "801bf5fb34e97dc1"),
}


def test_the_quickstarts_keys_stay_put_unless_an_input_changes():
    from farm.grid import load_study
    from farm.plan import plan_study

    trials = load_study(Path(__file__).parents[1] / "jobs" / "quickstart.yaml")
    plans = plan_study(trials)
    keys = {t.id: ([s.key for s in plans[t.id].stages], plans[t.id].eval_key) for t in trials}
    assert keys == QUICKSTART_KEYS, "the quickstart's keys moved: every user's store rebuilds it (see the comment above)"
