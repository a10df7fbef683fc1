"""Bad input gets one clear error (file, field, what is allowed) and exit code 2, before Ray."""

import copy
import json
import os
import random
import stat
from pathlib import Path

import pytest
import yaml
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.cli import main
from farm.config import StudyError
from farm.grid import expand
from farm.models import ModelSpec, base_model
from farm.plan import plan_study
from farm.results import write_trial

TINY_DOC = yaml.safe_load(TINY.read_text())
scalars = st.none() | st.booleans() | st.integers(-3, 10**9) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
KEYS = [
    "name",
    "seed",
    "model",
    "data",
    "stages",
    "eval",
    "grid",
    "profiles",
    "report",
    "reference",
    "max_failures",
    "sources",
    "transforms",
    "rate",
    "mode",
    "kind",
    "lr",
    "metrics",
    "generation",
    "holdout",
    "base",
    "config",
    "sft",
    "dpo",
    "pretrain",
    "lora",
    "resources",
    "fault",
    "columns",
    "path",
    "records",
    "plots",
    "limit",
]


def paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, (*prefix, i))


@st.composite
def mutated_studies(draw):
    """The tiny study with a few random edits: values replaced, keys added or removed."""
    doc = copy.deepcopy(TINY_DOC)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(list(paths(doc))))
        if not where:
            continue
        parent = doc
        for k in where[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "add", "remove"]))
        if action == "replace":
            parent[where[-1]] = draw(values)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS) | st.text(max_size=6))] = draw(values)
        elif isinstance(parent, dict):
            parent.pop(where[-1], None)
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=mutated_studies() | st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
def test_validator_accepts_or_raises_its_own_error(doc):
    try:
        trials = expand(doc, "h.yaml", max_trials=64)
    except StudyError as e:
        assert str(e).startswith("h.yaml") and "Traceback" not in str(e)
        return
    assert trials and all(t.id for t in trials)
    plan_study(trials)  # a valid study can always be planned


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def file_source_study(tmp_path, source: dict) -> dict:
    doc = copy.deepcopy(TINY_DOC)
    doc.pop("grid")
    doc["data"]["sources"] = [source]
    return doc


def test_local_data_file_columns_and_rows_are_checked(tmp_path):
    good = write(tmp_path, "pairs.jsonl", "\n".join(json.dumps({"q": f"q{i}", "good": "a", "bad": "b"}) for i in range(20)))
    ok = file_source_study(
        tmp_path, {"name": "file", "path": str(good), "records": "comparison", "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"}}
    )
    study = expand(ok, "s.yaml")[0].study
    from farm.data.sources import load_source

    rows = load_source(study.data.sources[0])
    assert len(rows) == 20 and rows[0].prompt == "q0" and rows[0].chosen == "a"

    missing = copy.deepcopy(ok)
    missing["data"]["sources"][0]["columns"]["chosen"] = "best"
    with pytest.raises(
        StudyError,
        match=r"data.sources.0: file '.*pairs.jsonl' has no column 'best' \(for the chosen of comparison records\); its columns: q, good, bad",
    ):
        expand(missing, "s.yaml")
    empty = write(tmp_path, "empty.csv", "prompt,chosen,rejected\n,,\nq,,b\n")
    with pytest.raises(StudyError, match="has no row with every column of comparison records filled"):
        expand(file_source_study(tmp_path, {"name": "file", "path": str(empty), "records": "comparison"}), "s.yaml")
    with pytest.raises(StudyError, match="file 'nope.jsonl' does not exist"):
        expand(file_source_study(tmp_path, {"name": "file", "path": "nope.jsonl", "records": "comparison"}), "s.yaml")
    with pytest.raises(StudyError, match="path, records and columns belong to a source with name: file"):
        expand(file_source_study(tmp_path, {"name": "hh_rlhf", "path": str(good)}), "s.yaml")


@pytest.mark.parametrize(
    "base, ok",
    [("tiny-gpt2", True), ("gpt2", True), ("meta-llama/Llama-2-7b-hf", True), ("tiny-gpt3", False), ("llama", False), ("./missing-model", False)],
)
def test_model_names(base, ok, tiny_doc):
    tiny_doc["model"] = {"base": base}
    if ok:
        expand(tiny_doc, "s.yaml")
    else:
        with pytest.raises(StudyError, match="model: base: (unknown model|path)"):
            expand(tiny_doc, "s.yaml")


def test_remote_code_is_off_unless_the_study_sets_it(monkeypatch):
    import transformers

    seen = {}

    def fake(name, **kw):
        seen.update(kw)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(
        "farm.models.load_tokenizer", lambda name, trust=False, chat_template=True, revision=None: seen.setdefault("tokenizer_trust", trust)
    )
    for trust in (False, True):
        seen.clear()
        with pytest.raises(OSError):
            base_model(ModelSpec(base="owner/model", trust_remote_code=trust), seed=0)
        assert seen["trust_remote_code"] is trust and seen["tokenizer_trust"] is trust
    assert ModelSpec(base="owner/model").trust_remote_code is False


def test_results_follow_the_umask(tmp_path, tiny_doc):
    trials = expand(tiny_doc, "s.yaml")
    old = os.umask(0o077)
    try:
        write_trial(tmp_path, trials[0], plan_study(trials)[trials[0].id], "ok", {"x": 1.0}, {})
    finally:
        os.umask(old)
    d = tmp_path / "tiny" / trials[0].id
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE((d / "metrics.json").stat().st_mode) == 0o600


def test_cli_bad_input_exit_2_before_ray(tmp_path, capsys, tiny_doc):
    tiny_doc["grid"] = {"seed": list(range(40))}
    path = write(tmp_path, "big.yaml", yaml.safe_dump(tiny_doc, sort_keys=False))
    assert main(["run", str(path), "--max-trials", "10", "--results", str(tmp_path / "r")]) == 2
    assert "expands to 40 trials, more than the maximum 10 (raise --max-trials)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_doctor_reports_the_environment_and_what_a_study_lacks(capsys, monkeypatch, tmp_path):
    from conftest import QUICKSTART
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["doctor", str(QUICKSTART)]) == 0
    out = capsys.readouterr().out
    assert "GPUs visible" in out and "Hugging Face hub         offline" in out and "quickstart.yaml (profile embedded): ready" in out
    assert "hub token                none: gated repositories" in out
    assert main(["doctor", str(QUICKSTART), "--profile", "paper"]) == 1
    out = capsys.readouterr().out
    assert "dataset Anthropic/hh-rlhf is not in the local hub cache" in out and "(needed by data.sources.0 [hh_rlhf])" in out
    assert "model gpt2 is not in the local hub cache" in out and "asks for 1 GPUs" in out


@pytest.mark.parametrize("profile", ["embedded", "paper"])
def test_doctor_checks_every_job_file_without_a_traceback(profile, capsys, monkeypatch, tmp_path):
    """Stage kinds without a field another kind has (rank and critique_revision: no deepspeed) included."""
    from conftest import ROOT
    from huggingface_hub import constants

    monkeypatch.chdir(ROOT)  # its default: every jobs/*.yaml here
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["doctor", "--profile", profile])
    out, err = capsys.readouterr()
    assert code in (0, 1) and "Traceback" not in out + err
    for job in sorted((ROOT / "jobs").glob("*.yaml")):
        assert f"jobs/{job.name} (profile {profile}): " in out
    if profile == "paper":  # with nothing in the hub cache, every paper study lacks its base model or data
        assert code == 1 and out.count("is not in the local hub cache") >= len(list((ROOT / "jobs").glob("*.yaml")))


# ---------------------------------------------------------------- bytes, not documents (issue 19)

BAD_BYTES = {
    "random": random.Random(0).randbytes(4096),
    "truncated": "prompt: café".encode()[:-1],  # ends inside a two-byte character
    "utf-16": "prompt: tiny\n".encode("utf-16"),
    "latin-1": "prompt: café\n".encode("latin-1"),
    "nul": b"prompt: tiny\x00\n",
    "large": b"",  # generated in the test (16 MiB of random bytes), never committed
}


def bad_bytes(kind: str) -> bytes:
    return random.Random(1).randbytes(16 * 2**20) if kind == "large" else BAD_BYTES[kind]


def assert_refused(args: list[str], capsys, *named: str) -> str:
    import ray

    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err and not ray.is_initialized(), out + err
    assert all(n in err for n in named), err
    return err


@pytest.mark.parametrize("kind", [*BAD_BYTES, "folder"])
def test_a_study_file_of_bytes_exits_2_naming_it(kind, tmp_path, capsys):
    path = tmp_path / "study.yaml"
    if kind == "folder":
        path.mkdir()
    elif kind == "large":  # a study file is a few KB: a 5 MiB one is refused unread
        path.write_bytes(b"# x\n" * (5 * 2**18))
    else:
        path.write_bytes(bad_bytes(kind))
    for command in ("plan", "run"):
        assert_refused([command, str(path), "--results", str(tmp_path / "r")], capsys, f"error: {path}: ")
    if kind != "folder":  # a folder is a results folder to `farm report`
        assert_refused(["report", str(path), "--results", str(tmp_path / "r")], capsys, f"error: {path}: ")
    assert not (tmp_path / "r").exists()


def study_naming(kind: str, tmp_path) -> tuple[dict, Path, str]:
    """The tiny study naming a local file of `kind`: (the study, that file, the field that names it)."""
    doc = copy.deepcopy(TINY_DOC)
    doc.pop("grid")
    folder = tmp_path / "model"
    folder.mkdir()
    if kind in ("jsonl", "csv", "json", "parquet"):
        path = tmp_path / f"pairs.{kind}"
        doc["data"]["sources"] = [{"name": "file", "path": str(path), "records": "comparison"}]
        return doc, path, "data.sources.0: file"
    if kind == "constitution":
        path = tmp_path / "mine.yaml"
        doc["stages"]["critique"] = {"kind": "critique_revision", "constitution": str(path)}
        return doc, path, "stages.critique.constitution: constitution"
    if kind == "deepspeed":
        path = tmp_path / "ds.json"
        doc["stages"]["sft"]["deepspeed"] = str(path)
        return doc, path, "stages.sft.deepspeed: deepspeed config"
    if kind in ("model config", "model weights"):
        doc["model"] = {"base": str(folder)}
        return doc, folder / ("config.json" if kind == "model config" else "model.safetensors"), "model: base: "
    if kind == "tokenizer":
        doc["model"]["tokenizer"] = str(folder)
        return doc, folder / "tokenizer.json", "model: tokenizer: "
    if kind == "task file":
        path = tmp_path / "mine.yaml"
        doc["eval"].update(metrics=["benchmarks"], benchmarks={"tasks": ["mine"], "include": str(path)})
        return doc, path, "eval.benchmarks: include: "
    if kind == "diversity tokenizer":  # checked by the preflight of `farm run`
        doc["stages"]["sft"]["diversity_tokenizer"] = str(folder)
        return doc, folder / "tokenizer.json", "stages.sft.diversity_tokenizer: "
    assert kind == "judge"
    doc["eval"].update(metrics=["reward_score"], reward_model=str(folder))
    return doc, folder / "config.json", "eval.reward_model: "


LOCAL_FILES = [
    "jsonl",
    "csv",
    "json",
    "parquet",
    "constitution",
    "deepspeed",
    "model config",
    "model weights",
    "tokenizer",
    "diversity tokenizer",
    "judge",
    "task file",
]


@pytest.mark.parametrize("bytes_kind", list(BAD_BYTES))
@pytest.mark.parametrize("file_kind", LOCAL_FILES)
def test_every_local_file_a_study_names_of_bytes_exits_2_naming_file_and_field(file_kind, bytes_kind, tmp_path, capsys):
    doc, path, field = study_naming(file_kind, tmp_path)
    path.write_bytes(bad_bytes(bytes_kind))
    study = write(tmp_path, "study.yaml", yaml.safe_dump(doc, sort_keys=False))
    assert_refused(["run", str(study), "--results", str(tmp_path / "r")], capsys, f"error: {study}", field, str(path))


def test_a_truncated_weights_file_and_rows_that_are_not_objects(tmp_path, capsys):
    doc, path, field = study_naming("model weights", tmp_path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    whole = len(header).to_bytes(8, "little") + header + bytes(16)
    path.write_bytes(whole)
    expand(doc, "s.yaml")  # whole files are accepted (what they hold is the loader's to judge)
    study = write(tmp_path, "study.yaml", yaml.safe_dump(doc, sort_keys=False))
    path.write_bytes(whole[:-4])
    assert_refused(
        ["plan", str(study)], capsys, f"{path}: not a whole safetensors file: it has {len(whole) - 4} bytes, and its header places {len(whole)}"
    )

    (tmp_path / "rows").mkdir()
    doc, path, field = study_naming("jsonl", tmp_path / "rows")
    path.write_text("1\n2\n")
    study = write(tmp_path, "rows.yaml", yaml.safe_dump(doc, sort_keys=False))
    assert_refused(["plan", str(study)], capsys, "data.sources.0: file", "expected one JSON object (named columns) per row, found a int")


@pytest.mark.parametrize("kind", ["random", "utf-16", "nul"])
def test_report_of_a_results_folder_whose_config_is_bytes_exits_2(kind, tmp_path, capsys):
    config = tmp_path / "tiny" / "rate=0.0" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_bytes(bad_bytes(kind))
    assert_refused(["report", str(tmp_path / "tiny")], capsys, f"error: {config}: ")
