"""Every hub source read from a hub cache in the real repositories' layouts (tests/hub_mirror/datasets.py),
offline, through the farm's one door to the hub: only the files a spec needs, no loading scripts."""

import json

import pytest
from hub_mirror.datasets import LONG, PILE_DOCS, PILE_SETS, PILE_SHARDS

from farm import hub
from farm.data.records import Comparison, Demonstration
from farm.data.sources import PILE_DROPPED, SourceSpec, hub_files, load_source


@pytest.fixture
def snapshots(monkeypatch):
    """The file patterns of every hub.snapshot call."""
    calls, real = [], hub.snapshot
    monkeypatch.setattr(
        hub,
        "snapshot",
        lambda repo, repo_type="dataset", revision=None, patterns=None: (
            calls.append((repo, revision, patterns)) or real(repo, repo_type, revision, patterns)
        ),
    )
    return calls


def hub_source(**kw):
    return load_source(SourceSpec(origin="hub", **kw))


def test_hh_rlhf_reads_one_subset_or_all_four_and_drops_ties_and_empty_answers(mirror, snapshots):
    rows = hub_source(name="hh_rlhf", subset="helpful-online", split="test")
    assert snapshots == [("Anthropic/hh-rlhf", None, ["helpful-online/test.jsonl.gz"])]
    assert all(isinstance(r, Comparison) and r.chosen.strip() and r.rejected.strip() and r.chosen != r.rejected for r in rows)
    ids = [r.id for r in rows]
    assert ids[0] == "hh_rlhf/helpful-online/test/0" and "hh_rlhf/helpful-online/test/20" not in ids  # row 20: a tie
    assert "hh_rlhf/helpful-online/test/21" not in ids  # an empty answer
    assert any(len(r.chosen.split()) > 512 for r in rows) and any("東京" in r.prompt for r in rows)
    every = hub_source(name="hh_rlhf", subset="all", split="test")
    per_subset = [
        hub_source(name="hh_rlhf", subset=s, split="test") for s in ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
    ]
    assert len(every) == sum(map(len, per_subset)) and len({r.id for r in every}) == len(every)


def test_red_team_attempts_are_one_json_array_of_transcripts(mirror):
    rows = hub_source(name="hh_red_team", subset="red-team-attempts")
    assert len(rows) == 30 and all(isinstance(r, Demonstration) for r in rows)  # the reply-less attempt dropped
    assert rows[0].id == "hh_red_team/0" and rows[0].prompt.startswith("\n\nHuman: ") and rows[0].prompt.endswith("\n\nAssistant:")


def test_lima_hub_rows_give_the_bundled_records(mirror, snapshots):
    rows = hub_source(name="lima")
    assert snapshots == [("GAIR/lima", None, ["train.jsonl"])]  # not the loading script
    bundled = load_source(SourceSpec(name="lima", limit=30))
    assert rows[:30] == bundled  # the hub schema (conversations) and the bundled copy give the same records
    assert len(rows) == 35  # + 3 multi-turn, the long one and one ending on a human turn; the unanswered one dropped
    assert sum(r.prompt.count("\n\nHuman:") > 1 for r in rows) == 3  # the one ending on a human turn loses it
    with pytest.raises(ValueError, match=r"split 'test' of lima on the hub \(GAIR/lima\): allowed: train"):
        SourceSpec(name="lima", origin="hub", split="test")


def test_webgpt_is_read_from_the_parquet_conversion(mirror, snapshots):
    assert "webgpt_comparisons.py" in hub.files("openai/webgpt_comparisons") and not hub.matching(
        hub.files("openai/webgpt_comparisons"), ["*.parquet"]
    )
    rows = hub_source(name="webgpt_comparisons")
    assert snapshots == [("openai/webgpt_comparisons", hub.PARQUET, ["default/train/*.parquet"])]
    ids = [r.id for r in rows]
    assert len(rows) == 23 and "webgpt/train/4" not in ids and "webgpt/train/1" not in ids  # 6 ties and one empty answer dropped
    by_id = {r.id: r for r in rows}
    assert by_id["webgpt/train/2"].rejected.strip() == LONG  # score_0 -0.5: answer_1 is chosen
    assert any("東京" in r.prompt for r in rows)
    eli5, other = hub_source(name="webgpt_comparisons", subset="eli5"), hub_source(name="webgpt_comparisons", subset="other")
    assert sorted(r.id for r in eli5 + other) == sorted(ids) and all(int(r.id.rsplit("/", 1)[1]) % 3 == 0 for r in eli5)


def test_shp_cap_keeps_the_strongest_pairs_of_each_post(mirror, snapshots):
    full = hub_source(name="shp")
    assert snapshots[-1] == ("stanfordnlp/SHP", None, ["*/train.json"])
    assert {r.meta["domain"] for r in full} == {"askculinary_train", "askhr_train", "legaladvice_train"}
    capped = hub_source(name="shp", per_post=5)
    posts = {}
    for r in capped:
        posts.setdefault(r.id.split("#")[0], []).append(r)
    assert max(map(len, posts.values())) == 5 and len(capped) < len(full)
    by_id = {r.id: r for r in full}
    assert all(by_id[r.id] == r for r in capped)  # a kept pair keeps its id and content
    for post, kept in posts.items():
        dropped = [r for r in full if r.id.split("#")[0] == post and r not in kept]
        assert not dropped or min(r.meta["score_ratio"] for r in kept) >= max(r.meta["score_ratio"] for r in dropped)
    one = hub_source(name="shp", subset="askhr", split="validation")
    assert snapshots[-1] == ("stanfordnlp/SHP", None, ["askhr/validation.json"]) and {r.meta["domain"] for r in one} == {"askhr_validation"}
    raw = [
        json.loads(line)
        for line in (hub.snapshot("stanfordnlp/SHP", patterns=["askhr/validation.json"]) / "askhr/validation.json").read_text().splitlines()
    ]
    rows = {f"shp/validation/{r['post_id']}#{r['c_root_id_A']}-{r['c_root_id_B']}": r for r in raw}
    assert len(one) == len(raw) - 1  # the empty comment
    for r in one:  # labels 1: comment A is preferred
        a, b = rows[r.id]["human_ref_A"].strip(), rows[r.id]["human_ref_B"].strip()
        assert (r.chosen.strip(), r.rejected.strip()) == ((a, b) if rows[r.id]["labels"] == 1 else (b, a))
    assert {rows[r.id]["labels"] for r in one} == {0, 1}
    with pytest.raises(ValueError, match="per_post .* source shp only: remove it from source hh_rlhf"):
        SourceSpec(name="hh_rlhf", origin="hub", per_post=5)


def test_orca_samples_across_both_files_and_row_groups_with_stable_ids(mirror):
    full = hub_source(name="orca")
    assert len(full) == 78 and {r.id.split(".")[0] for r in full} == {"orca/flan", "orca/niv"}  # an empty answer in each file dropped
    assert any(r.prompt.startswith("\n\nHuman: You are an AI assistant.") for r in full)
    by_id = {r.id: r for r in full}
    samples = [hub_source(name="orca", sample=12, seed=seed) for seed in range(4)]
    assert all(by_id[r.id] == r for s in samples for r in s) and len({tuple(r.id for r in s) for s in samples}) == 4
    assert samples[1] == hub_source(name="orca", sample=12, seed=1)


def test_advbench_hub_copy_matches_the_bundled_rows(mirror):
    assert hub_source(name="advbench") == load_source(SourceSpec(name="advbench", limit=40))


def test_pile_sample_downloads_only_the_shards_it_draws_from(mirror, snapshots):
    sample = hub_source(name="pile_detoxify", sample=20, seed=3)
    shards = [p for repo, _, p in snapshots if repo == "tomekkorbak/pile-detoxify"]
    assert len(shards) == 2 and all(len(p) == 1 for p in shards)  # 20 documents: two shards of 16
    assert {r.id.split("/")[1] for r in sample} == {p[0].split("-")[1] for p in shards}
    again = hub_source(name="pile_detoxify", sample=20, seed=3)
    assert again == sample
    assert {r.id.split("#")[0] for r in hub_source(name="pile_detoxify", sample=20, seed=4)} != {r.id.split("#")[0] for r in sample}
    full = {r.id: r for r in hub_source(name="pile_detoxify")}
    assert len({r.id.split("/")[1] for r in full.values()}) == PILE_SHARDS
    assert all(full[r.id] == r for r in sample)  # a document keeps its id (and so its split) in every sample
    assert all(0 <= r.meta["scores"]["toxicity"] <= 1 and len(r.text.split()) >= 10 for r in sample)
    kept = [(s, d) for s in range(PILE_SHARDS) for d in range(PILE_DOCS) if PILE_SETS[(s + d) % len(PILE_SETS)] not in PILE_DROPPED]
    assert {r.id.split("#")[0] for r in full.values()} == {f"pile/{s:05d}/{d}" for s, d in kept}  # Github, ArXiv, FreeLaw dropped


def test_a_repository_missing_from_the_cache_is_named(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(hub.HubError, match="dataset Anthropic/hh-rlhf is not in the local hub cache"):
        hub_source(name="hh_rlhf", subset="harmless-base")
    with pytest.raises(hub.HubError, match="dataset tomekkorbak/pile-detoxify"):
        hub_source(name="pile_detoxify", sample=5)


def test_hub_files_names_what_a_spec_reads():
    assert hub_files(SourceSpec(name="hh_rlhf", origin="hub", subset="all", split="test")) == (
        "Anthropic/hh-rlhf", None, [f"{s}/test.jsonl.gz" for s in ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")])  # fmt: skip
    assert hub_files(SourceSpec(name="orca", origin="hub"))[2] == ["1M-GPT4-Augmented.parquet", "3_5M-GPT3_5-Augmented.parquet"]
    with pytest.raises(ValueError, match="sentences has no hub copy"):
        SourceSpec(name="sentences", origin="hub", subset="toxigen")
