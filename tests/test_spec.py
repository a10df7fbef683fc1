import copy

import pytest
from conftest import QUICKSTART, ROOT, TINY

from farm.cli import main
from farm.config import StudyError
from farm.grid import expand, load_study, read_study
from farm.stages.dpo import DPO


def errors_of(doc, **kw) -> str:
    with pytest.raises(StudyError) as e:
        expand(doc, "s.yaml", **kw)
    return str(e.value)


def test_quickstart_expands_to_four_readable_trials():
    trials = load_study(QUICKSTART)
    assert [t.id for t in trials] == ["rate=0.0_seed=42", "rate=0.0_seed=43", "rate=0.5_seed=42", "rate=0.5_seed=43"]
    t = trials[3]
    assert t.study.seed == 43 and t.study.data.transforms[0].rate == 0.5
    assert list(t.study.stages) == ["pretrain", "sft", "dpo"]
    assert isinstance(t.study.stages["dpo"], DPO) and t.study.stages["dpo"].beta == 0.1
    assert t.profile == "embedded"


def test_same_file_gives_same_trials():
    a, b = load_study(QUICKSTART), load_study(QUICKSTART)
    assert [(t.id, t.study) for t in a] == [(t.id, t.study) for t in b]


def test_paper_profile_overrides_values_and_drops_a_stage():
    trials = load_study(QUICKSTART, profile="paper")
    s = trials[0].study
    assert s.model.base == "gpt2" and s.model.tokenizer is None
    assert list(s.stages) == ["sft", "dpo"]
    assert s.stages["sft"].lora.r == 8 and s.stages["sft"].resources.gpus_per_worker == 1
    assert s.data.sources[0].origin == "hub" and s.data.sources[0].split == "train"
    assert len(trials) == 6  # its grid adds a third seed


def test_unknown_profile_names_the_allowed_ones(tiny_doc):
    msg = errors_of(tiny_doc, profile="papr")
    assert "profile 'papr'" in msg and "embedded" in msg


def test_unknown_key_lists_allowed_keys(tiny_doc):
    tiny_doc["stages"]["sft"]["learning_rate"] = 1e-3
    msg = errors_of(tiny_doc)
    assert "s.yaml: stages.sft: unknown key 'learning_rate'" in msg
    assert "lr" in msg and "batch_size" in msg


def test_wrong_type_names_the_field(tiny_doc):
    tiny_doc["stages"]["dpo"]["beta"] = "high"
    assert "stages.dpo.beta" in errors_of(tiny_doc)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda d: d["data"]["sources"][0].update(name="hh_rlfh"),
            "unknown dataset source 'hh_rlfh'; allowed: advbench, hh_red_team, hh_rlhf, lima, orca, pile_detoxify, sentences, shp, webgpt_comparisons",
        ),
        (
            lambda d: d["data"]["transforms"][0].update(name="flip"),
            "data.transforms.0: unknown transform 'flip'; allowed: 'label_flip', 'malign_labels', 'malign_prompts'",
        ),
        (
            lambda d: d["stages"].update(ppo={"max_steps": 1}),
            "stages.ppo: unknown stage kind 'ppo'; allowed: 'ai_feedback', 'critique_revision', 'dpo', 'kto', 'pretrain'",
        ),
        (lambda d: d["eval"].update(metrics=["rouge"]), "unknown metric 'rouge'"),
        (lambda d: d["data"]["transforms"][0].update(rate=1.5), "data.transforms.0.rate: Input should be less than or equal to 1"),
        (lambda d: d["data"]["sources"][0].update(subset="red-team"), "subset 'red-team' of hh_rlhf: allowed: harmless-base"),
        (lambda d: d["data"]["sources"][0].update(subset="helpful-base"), "no bundled copy; set origin: hub"),
        (lambda d: d["model"].update(base="./no/such/model", config={}), "model: base: path './no/such/model' does not exist"),
        (
            lambda d: d["stages"]["dpo"].update(data={"sources": [{"name": "lima"}]}),
            "a dpo stage trains on comparison records, but source lima gives demonstration",
        ),
        (lambda d: d.pop("data"), "data: required field is missing"),
    ],
)
def test_bad_values_name_field_and_allowed_values(tiny_doc, edit, expected):
    tiny_doc.pop("grid")
    edit(tiny_doc)
    assert expected in errors_of(tiny_doc)


def test_grid_errors(tiny_doc):
    doc = copy.deepcopy(tiny_doc)
    doc["grid"] = {"seed": []}
    assert "grid.seed: an empty list expands to zero trials" in errors_of(doc)
    doc["grid"] = {"data.transforms.3.rate": [0.1]}
    assert "data.transforms has 1 items; '3' is not an index" in errors_of(doc)
    doc["grid"] = {"stages.sft.lrr": [0.1]}
    assert "stages.sft: unknown key 'lrr'" in errors_of(doc)
    doc["grid"] = {"seed": list(range(30)), "data.transforms.0.rate": [0.0, 0.5]}
    assert "expands to 60 trials, more than the maximum 50" in errors_of(doc, max_trials=50)
    doc["grid"] = {"seed": 42}
    assert "grid.seed: a list of values" in errors_of(doc)
    doc["grid"], doc["report"] = {"seed": [1, 2]}, {"main_axis": "stages.dpo"}  # a profile that replaced the grid
    assert "report.main_axis: 'stages.dpo' is not a grid axis; axes: seed (set report.main_axis to one of them)" in errors_of(doc)


def test_grid_error_names_the_trial(tiny_doc):
    tiny_doc["grid"] = {"data.transforms.0.rate": [0.5, 2.0]}
    msg = errors_of(tiny_doc)
    assert "data.transforms.0.rate" in msg and "data.transforms.0.rate=2.0" in msg


def test_axis_labels_disambiguate_same_leaf_names(tiny_doc):
    tiny_doc["grid"] = {"stages.sft.lr": [0.1], "stages.dpo.lr": [0.2], "seed": [1, 2]}
    ids = [t.id for t in expand(tiny_doc, "s.yaml")]
    assert ids == ["stages-sft-lr=0.1_stages-dpo-lr=0.2_seed=1", "stages-sft-lr=0.1_stages-dpo-lr=0.2_seed=2"]


def test_no_grid_is_one_trial(tiny_doc):
    tiny_doc.pop("grid")
    assert [t.id for t in expand(tiny_doc, "s.yaml")] == ["base"]


def test_stage_kind_defaults_to_its_name_and_can_be_explicit(tiny_doc):
    tiny_doc["stages"] = {"first": {"kind": "sft", "max_steps": 1}, "dpo": {"max_steps": 1}}
    s = expand(tiny_doc, "s.yaml")[0].study
    assert [st.kind for st in s.stages.values()] == ["sft", "dpo"]


def test_a_sorted_keys_dump_is_refused_with_the_fix(tmp_path, capsys):
    """PyYAML's safe_dump sorts keys by default: pretrain, sft, dpo becomes dpo, pretrain, sft."""
    import yaml

    path = tmp_path / "sorted.yaml"
    path.write_text(yaml.safe_dump(read_study(QUICKSTART)))  # the quickstart with what it includes
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages.dpo: the order of stages: is the chain" in err and "set stages.dpo.input: base" in err
    assert "alphabetical order (dpo, pretrain, sft)" in err and "sort_keys=False" in err and "Traceback" not in err


def test_chains_that_cannot_be_meant_unless_input_says_so(tiny_doc):
    tiny_doc.pop("grid")
    stages = tiny_doc["stages"]
    late = {"sft": stages["sft"], "dpo": stages["dpo"], "pretrain": stages["pretrain"]}
    msg = errors_of({**tiny_doc, "stages": copy.deepcopy(late)})
    assert "stages.pretrain: the order of stages: is the chain: a pretrain stage listed after the fine-tuning stage 'dpo'" in msg
    assert "set stages.pretrain.input: dpo" in msg and "alphabetical" not in msg
    # sft first on the built model is a choice a study may make; dpo with nothing before it is not.
    alone = {"dpo": stages["dpo"]}
    assert "a dpo stage needs a trained policy" in errors_of({**tiny_doc, "stages": alone})
    for kind, extra in [("pro", {}), ("rl", {"reward_model": "gpt2", "max_length": 128})]:
        assert f"a {kind} stage needs a trained policy" in errors_of({**tiny_doc, "stages": {kind: extra}})
    # Said on purpose with input:, or from a hub model that already answers: accepted.
    on_purpose = copy.deepcopy(late)
    on_purpose["sft"]["input"], on_purpose["pretrain"]["input"] = "base", "dpo"
    assert list(expand({**tiny_doc, "stages": on_purpose}, "s.yaml")[0].study.stages) == ["sft", "dpo", "pretrain"]
    expand({**tiny_doc, "stages": {"dpo": {**stages["dpo"], "input": "base"}}}, "s.yaml")
    expand({**tiny_doc, "model": {"base": "gpt2"}, "stages": alone}, "s.yaml")


def test_cli_bad_study_exits_2_and_writes_nothing(tmp_path, write_study, tiny_doc, capsys):
    tiny_doc["stages"]["sft"]["lrr"] = 1
    path = write_study(tiny_doc)
    results = tmp_path / "results"
    assert main(["run", str(path), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "study.yaml: stages.sft: unknown key 'lrr'" in err
    assert not results.exists()


@pytest.mark.parametrize(
    "text, expected",
    [("name: [unclosed", "not valid YAML"), ("- a list", "a study file is a mapping"), (None, "no such study file")],
)
def test_cli_unreadable_study_files(tmp_path, write_study, text, expected, capsys):
    path = write_study(text) if text else tmp_path / "missing.yaml"
    assert main(["plan", str(path)]) == 2
    assert expected in capsys.readouterr().err


def test_tiny_fixture_is_valid():
    assert [t.id for t in load_study(TINY)] == ["rate=0.0", "rate=1.0"]


def test_grid_must_be_a_mapping(tiny_doc):
    tiny_doc["grid"] = ["seed"]
    assert "grid: a mapping of dotted field path -> list of values" in errors_of(tiny_doc)


@pytest.mark.parametrize("job", sorted((QUICKSTART.parent).glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("profile", ["embedded", "paper"])
def test_every_job_file_validates_in_both_profiles(job, profile):
    trials = load_study(job, profile=profile)
    assert trials and len({t.id for t in trials}) == len(trials)


def test_malign_labels_grid_one_line_per_kind():
    trials = load_study(QUICKSTART.parent / "malign_labels.yaml")
    kinds = {(t.study.data.transforms[0].name, getattr(t.study.data.transforms[0], "mode", None)) for t in trials}
    assert kinds == {("malign_labels", None), ("malign_prompts", "trigger"), ("malign_prompts", "shuffle"), ("malign_prompts", "red_team")}
    assert len(trials) == 24 and {t.study.data.transforms[0].rate for t in trials} == {0.0, 0.5}
    paper = load_study(QUICKSTART.parent / "malign_labels.yaml", profile="paper")
    assert paper[0].study.data.sources[0].subset == "other" and paper[0].study.eval.data.sources[0].subset == "eli5"
    assert len(paper) == 4 * 5 * 3


@pytest.mark.parametrize("profile", ["embedded", "paper"])
def test_every_trial_of_every_job_validates_again_from_its_dump(profile):
    """Ray workers and --smoke rebuild a trial's study from its JSON dump, defaults included: a
    validator that looks at which fields were given, not at their values, fails only there."""
    from farm.grid import load_study
    from farm.spec import Study

    for job in sorted((ROOT / "jobs").glob("*.yaml")):
        for t in load_study(job, profile):
            assert Study.model_validate(t.study.model_dump(mode="json")) == t.study, (job.name, t.id)


def test_include_merges_a_shared_file_beneath_the_study(tmp_path, tiny_doc):
    """`include:` (a path relative to the file, or a list): the study's own keys override the
    included ones mapping by mapping, `null` removes one, later includes override earlier ones;
    the result is the study written out whole."""
    import yaml

    from farm.plan import plan_study

    (tmp_path / "shared").mkdir()
    pretrain = tiny_doc["stages"]["pretrain"]
    (tmp_path / "shared" / "pretrain.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": {**pretrain, "lr": 0.5}}}))
    (tmp_path / "shared" / "lr.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": {"lr": pretrain.get("lr", 1e-3)}}, "description": "x"}))
    own = copy.deepcopy(tiny_doc)
    del own["stages"]["pretrain"]
    own["include"] = ["shared/pretrain.yaml", "shared/lr.yaml"]
    own["description"] = None  # removes the included one
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(own, sort_keys=False))
    whole = copy.deepcopy(tiny_doc)
    whole["stages"] = {"pretrain": {**pretrain, "lr": pretrain.get("lr", 1e-3)}, **{k: v for k, v in tiny_doc["stages"].items() if k != "pretrain"}}
    (tmp_path / "whole.yaml").write_text(yaml.safe_dump(whole, sort_keys=False))
    got, want = load_study(tmp_path / "s.yaml"), load_study(tmp_path / "whole.yaml")
    assert [t.study for t in got] == [t.study for t in want] and list(got[0].study.stages) == list(tiny_doc["stages"])
    assert [p.stages for p in plan_study(got).values()] == [p.stages for p in plan_study(want).values()]  # the same keys


@pytest.mark.parametrize(
    "include, message",
    [
        ("missing.yaml", r"include: missing.yaml: no such file"),
        ("s.yaml", r"include: s.yaml includes itself"),
        ("loop.yaml", r"include: s.yaml includes itself, through s.yaml -> loop.yaml -> s.yaml"),
        (7, r"include: a file name, or a list of them, relative to"),
    ],
)
def test_a_bad_include_names_the_field(tmp_path, tiny_doc, include, message):
    import yaml

    (tmp_path / "loop.yaml").write_text("include: s.yaml\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**tiny_doc, "include": include}))
    with pytest.raises(StudyError, match=message):
        load_study(tmp_path / "s.yaml")


def test_three_studies_share_one_pretrain_through_their_include():
    from farm.plan import plan_study

    keys = {
        job: {s.key for p in plan_study(load_study(ROOT / "jobs" / f"{job}.yaml")).values() for s in p.stages if s.name == "pretrain"}
        for job in ("quickstart", "malign_labels", "data_impact")
    }
    assert all(len(k) == 1 for k in keys.values()) and len(set.union(*keys.values())) == 1


def test_the_benchmarks_build_valid_studies_from_the_job_files(monkeypatch):
    """bench/ (not run by `make test`) edits the quickstart into its own studies: they stay valid
    as the job files and the schema change."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import farm_overhead
    import plan_hash
    import stage_reuse
    import step_efficiency

    for doc in (farm_overhead.study_doc(1, 1, 1), step_efficiency.quickstart(2), plan_hash.study_doc(None), stage_reuse.study_doc(1, 1, True)):
        assert expand(doc, "bench")
