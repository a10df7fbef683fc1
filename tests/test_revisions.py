"""Pinned hub revisions (farm.preflight.pin, farm.hub.commit): before planning, every hub model and
dataset a study reads is resolved to a commit and written into its revision field, so the commit enters
the stage and eval keys, is what every load reads (`revision=`), and lands in the trial's record and the
report. Offline against a hub cache written in the hub's own layout (hub_mirror.put), two commits of
each repository; online against HfApi.repo_info standing in for the hub."""

import gzip
import json
import types

import httpx2
import pytest
import ray
import yaml
from hub_mirror import put

from farm import hub, preflight
from farm.cli import main
from farm.config import StudyError
from farm.data.sources import SourceSpec, hub_files, read_rows
from farm.grid import expand
from farm.models import ModelSpec
from farm.plan import plan_study
from farm.registry import sources

LM, RM = "farm-test/tiny-lm", "farm-test/tiny-rm"
HH = SourceSpec(name="hh_rlhf", origin="hub", subset="harmless-base", split="train")


def hh_file(n: int) -> bytes:
    rows = [{"chosen": f"\n\nHuman: q{i}?\n\nAssistant: yes {i}", "rejected": f"\n\nHuman: q{i}?\n\nAssistant: no"} for i in range(n)]
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


def model_files(tmp_path, name: str, n_layer: int, reward: bool = False) -> dict:
    """A tiny GPT-2 (a causal LM, or a one-output sequence classifier) with the bundled GPT-2 tokenizer."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from farm.models import load_tokenizer

    tok = load_tokenizer("gpt2")
    cfg = GPT2Config(vocab_size=len(tok), n_embd=8, n_layer=n_layer, n_head=2, n_positions=64, num_labels=1, pad_token_id=tok.pad_token_id)
    out = tmp_path / f"{name}-{n_layer}"
    (GPT2ForSequenceClassification if reward else GPT2LMHeadModel)(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return {p.name: p for p in out.iterdir()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A hub cache with two commits of a causal LM, a reward model and HH-RLHF's harmless-base:
    main (1 layer, 8 rows) and v2 (2 layers, 12 rows). {repo: {revision: commit}} and the folder."""
    root, files = tmp_path_factory.mktemp("hub"), tmp_path_factory.mktemp("files")
    repo, _, (pattern,) = hub_files(HH)
    commits = {}
    for rev, layers, rows in (("main", 1, 8), ("v2", 2, 12)):
        commits.setdefault(LM, {})[rev] = put(root, "model", LM, model_files(files, "lm", layers), rev).name
        commits.setdefault(RM, {})[rev] = put(root, "model", RM, model_files(files, "rm", layers, reward=True), rev).name
        commits.setdefault(repo, {})[rev] = put(root, "dataset", repo, {pattern: hh_file(rows)}, rev).name
    return root, commits


@pytest.fixture
def offline(cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache[0]))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache[0]))
    assert hub.offline()
    return cache[1]


def study_doc(tiny_doc, **model) -> dict:
    """The tiny study on the hub LM, its data from the hub, judged by the hub reward model."""
    tiny_doc["model"] = {"base": LM, **model}
    tiny_doc["data"]["sources"] = [HH.model_dump(exclude_defaults=True)]
    tiny_doc["stages"]["pretrain"]["data"]["sources"] = [{"name": "lima", "limit": 20}]
    tiny_doc["eval"].update(metrics=["preference_accuracy", "reward_score"], reward_model=RM)
    return tiny_doc


def test_offline_a_revision_is_the_commit_of_the_cached_snapshot(offline):
    assert hub.commit(LM) == offline[LM]["main"]
    assert hub.commit(LM, revision="v2") == offline[LM]["v2"]
    assert hub.commit(LM, revision=offline[LM]["v2"]) == offline[LM]["v2"]  # a commit the cache holds is itself
    with pytest.raises(hub.HubError, match=f"model {LM} \\(revision {'0' * 40}\\) is not in the local hub cache"):
        hub.commit(LM, revision="0" * 40)
    with pytest.raises(hub.HubError, match="model farm-test/absent is not in the local hub cache"):
        hub.commit("farm-test/absent")


def test_pinning_writes_each_commit_into_the_study_and_the_keys(offline, tiny_doc):
    trials, unpinned = preflight.pin(expand(study_doc(tiny_doc), "s.yaml"))
    assert unpinned == {}
    s = trials[0].study
    assert s.model.revision == offline[LM]["main"] and s.model.tokenizer_revision is None
    assert s.eval.revisions == {RM: offline[RM]["main"]}
    assert s.data.sources[0].revision == offline["Anthropic/hh-rlhf"]["main"]
    assert preflight.revisions(s) == {
        LM: offline[LM]["main"],
        RM: offline[RM]["main"],
        "datasets/Anthropic/hh-rlhf": offline["Anthropic/hh-rlhf"]["main"],
    }
    # The study file is not changed in place: the unpinned trials keep their revisions unset.
    assert expand(study_doc(tiny_doc), "s.yaml")[0].study.model.revision is None

    def keys(doc):
        plans = plan_study(preflight.pin(expand(doc, "s.yaml"))[0])
        return [(tuple(s.key for s in p.stages), p.eval_key) for p in plans.values()]

    pinned = keys(study_doc(tiny_doc))
    assert keys(study_doc(tiny_doc, revision=offline[LM]["main"])) == pinned  # the default branch pinned = its commit given
    v2 = keys(study_doc(tiny_doc, revision="v2"))
    assert all(a != b for (sa, ea), (sb, eb) in zip(pinned, v2) for a, b in [*zip(sa, sb), (ea, eb)])  # every stage reads the base
    # The judge's commit enters the eval key only; the data's every key that reads the data.
    doc = study_doc(tiny_doc)
    doc["eval"]["revisions"] = {RM: "v2"}
    judged = keys(doc)
    assert [s for s, _ in judged] == [s for s, _ in pinned] and all(a != b for (_, a), (_, b) in zip(judged, pinned))
    doc = study_doc(tiny_doc)
    doc["data"]["sources"][0]["revision"] = "v2"
    data = keys(doc)
    # pretrain reads lima alone; sft and dpo read the study's data
    assert all(a[0] == b[0] and all(x != y for x, y in zip(a[1:], b[1:])) for a, b in zip((s for s, _ in data), (s for s, _ in pinned)))


def test_the_loads_read_the_pinned_commit(offline):
    from farm.models import base_model, for_inference, load_artifact

    for rev, layers in (("main", 1), ("v2", 2)):
        commit = offline[LM][rev]
        model, tok = base_model(ModelSpec(base=LM, revision=commit), seed=0)
        assert model.config.n_layer == layers and len(tok) == model.config.vocab_size
        assert load_artifact(LM, revision=commit)[0].config.n_layer == layers  # a generator named by hub id
        assert for_inference(RM, reward=True, revision=offline[RM][rev])[0].config.n_layer == layers  # a judge
        rows = read_rows(sources.get("hh_rlhf"), HH.model_copy(update={"revision": offline["Anthropic/hh-rlhf"][rev]}))
        assert len(rows) == {1: 8, 2: 12}[layers]  # a hub source


def test_a_revision_that_does_not_resolve_stops_the_run_naming_its_field(offline, tiny_doc, write_study, tmp_path, capsys):
    doc = study_doc(tiny_doc, revision="0" * 40)
    doc["data"]["sources"][0]["revision"] = "no-such-branch"
    code = main(["run", str(write_study(doc)), "--results", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and not ray.is_initialized() and not (tmp_path / "results").exists(), err
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert any(f"model {LM} (revision {'0' * 40})" in p and p.endswith("(at model.revision)") for p in problems), err
    assert any("dataset Anthropic/hh-rlhf (revision no-such-branch)" in p and "data.sources.0" in p for p in problems), err
    # `farm plan` shows the keys all the same, warning that they hold the revision as given.
    assert main(["plan", str(write_study(doc)), "--results", str(tmp_path / "results")]) == 0
    assert "not pinned to a commit" in capsys.readouterr().err


def test_online_the_hub_names_the_commit_and_refuses_one_it_lacks(tiny_doc, monkeypatch):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RevisionNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("farm.preflight.hub_reachable", lambda *a: True)
    asked = []

    def repo_info(self, repo_id, *, repo_type=None, revision=None, **kw):
        asked.append((repo_id, repo_type, revision))
        if revision == "gone":
            raise RevisionNotFoundError("404 Revision Not Found", response=httpx2.Response(404, request=httpx2.Request("GET", "https://hub")))
        return types.SimpleNamespace(sha=f"{abs(hash((repo_id, revision))):040d}"[:40])

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    trials, unpinned = preflight.pin(expand(study_doc(tiny_doc, revision="v2"), "s.yaml"))
    assert unpinned == {} and sorted(set(asked), key=str) == sorted(
        {(LM, "model", "v2"), (RM, "model", None), ("Anthropic/hh-rlhf", "dataset", None)}, key=str
    )
    assert trials[0].study.model.revision == f"{abs(hash((LM, 'v2'))):040d}"[:40]
    _, unpinned = preflight.pin(expand(study_doc(tiny_doc, revision="gone"), "s.yaml"))
    assert list(unpinned.values()) == [["model.revision"]]
    assert "the hub has no such revision; check the `revision:` the study pins" in next(iter(unpinned))


def test_revision_fields_are_refused_where_no_hub_repository_is_read(tiny_doc):
    with pytest.raises(StudyError, match="revision: pins the commit of a hub model, and base 'tiny-gpt2' is not one"):
        expand({**tiny_doc, "model": {"base": "tiny-gpt2", "revision": "v2"}}, "s.yaml")
    with pytest.raises(StudyError, match="revision: pins the commit of a source read from the hub"):
        expand({**tiny_doc, "data": {**tiny_doc["data"], "sources": [{"name": "hh_rlhf", "revision": "v2"}]}}, "s.yaml")
    doc = yaml.safe_load(yaml.safe_dump(tiny_doc))
    doc["stages"]["sft"]["revisions"] = {"owner/judge": "v2"}
    with pytest.raises(StudyError, match="stages.sft.revisions: 'owner/judge' is no hub model that stages.sft names"):
        expand(doc, "s.yaml")


def test_the_trial_record_and_the_report_name_the_commits(offline, tiny_doc, tmp_path):
    from farm.report import write_report
    from farm.results import study_dir, table, write_trial

    trials, _ = preflight.pin(expand(study_doc(tiny_doc), "s.yaml"))
    plans = plan_study(trials)
    for t in trials:
        write_trial(tmp_path, t, plans[t.id], "ok", {"acc": 0.5}, {})
    saved = json.loads((study_dir(tmp_path, "tiny") / trials[0].id / "metrics.json").read_text())
    assert saved["revisions"][LM] == offline[LM]["main"]
    md = write_report(study_dir(tmp_path, "tiny"), trials[0].study, table(tmp_path, trials), list(trials[0].axes), {}).read_text()
    assert f"- hub revisions: datasets/Anthropic/hh-rlhf @ {offline['Anthropic/hh-rlhf']['main']}; {LM} @ {offline[LM]['main']}" in md
