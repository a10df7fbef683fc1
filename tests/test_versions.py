"""Library versions (farm.store.library_versions): each artifact's marker records the versions of
torch, transformers, trl, peft and the farm that made it; they are not in its key, so reusing one made
under another major.minor version is said: a warning when `farm run` reuses it, a note in the report,
whose environment lists the versions the study's artifacts were made with."""

import json
from importlib.metadata import version

from farm.files import write_json
from farm.grid import expand
from farm.plan import plan_study
from farm.run import warn_version_drift
from farm.store import LIBRARIES, MARKER, Store, library_versions, version_drift


def older_minor(v: str) -> str:
    major, minor = v.split("+")[0].split(".")[:2]
    return f"{int(major) - 1}.{minor}.0" if minor == "0" else f"{major}.{int(minor) - 1}.3"


def publish(store: Store, kind: str, key: str, **versions) -> None:
    """An artifact in the store, its marker saying it was made under `versions` (the rest: this environment's)."""
    with store.writing(kind, key, {"metrics": {"acc": 0.5}}):
        pass
    path = store.root / "artifacts" / f"{kind}-{key}" / MARKER
    marker = json.loads(path.read_text())
    write_json(path, {**marker, "versions": {**marker["versions"], **versions}})


def test_a_marker_records_the_versions_that_made_the_artifact(tmp_path):
    store = Store(tmp_path)
    with store.writing("sft", "k1", {"metrics": {}}):
        pass
    assert store.marker("sft", "k1")["versions"] == {name: version(name) for name in LIBRARIES} == library_versions()


def test_only_a_major_or_minor_difference_is_drift():
    now = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "trl": "1.16.0"}
    assert version_drift({"torch": "2.13.1", "transformers": "5.24.3", "trl": "1.16.0"}, now) == []  # patch releases
    assert version_drift({"torch": "2.12.0+cu121", "transformers": "4.24.0", "peft": "0.1.0"}, now) == [
        "torch 2.12.0+cu121 (now 2.13.0+cpu)",
        "transformers 4.24.0 (now 5.24.0)",
    ]  # peft: not installed now, nothing to say
    assert version_drift(None, now) == []  # an artifact from before markers held versions


def test_reusing_an_artifact_of_an_older_minor_version_warns(tiny_doc, tmp_path, capsys):
    trials = expand(tiny_doc, "s.yaml")
    plans = plan_study(trials)
    store = Store(tmp_path / "store")
    pretrain, sft, _ = plans[trials[0].id].stages
    old = older_minor(version("transformers"))
    publish(store, "pretrain", pretrain.key)  # this environment's versions: nothing to say
    publish(store, "sft", sft.key, transformers=old)
    warn_version_drift(trials, plans, store)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # once, though both trials reuse it
    assert err[0].startswith(f"farm: warning: reusing sft (sft-{sft.key}), made with transformers {old} (now {version('transformers')})")
    assert f"remove {store.root}/artifacts/sft-{sft.key} to rebuild it" in err[0]


def test_the_report_lists_the_versions_and_notes_an_artifact_of_another_minor(tiny_doc, tmp_path):
    from farm.report import write_report
    from farm.results import study_dir, table, write_trial

    trials = expand(tiny_doc, "s.yaml")
    plans = plan_study(trials)
    store = Store(tmp_path / "store")
    old = older_minor(version("trl"))
    for t in trials:
        for s in plans[t.id].stages:
            publish(store, s.kind, s.key, **({"trl": old} if s.kind == "pretrain" else {}))
        records = {s.name: store.marker(s.kind, s.key) for s in plans[t.id].stages}
        write_trial(tmp_path, t, plans[t.id], "ok", {"acc": 0.5}, records, eval_versions=library_versions())
    md = write_report(study_dir(tmp_path, "tiny"), trials[0].study, table(tmp_path, trials), list(trials[0].axes), {}).read_text()
    pretrain = plans[trials[0].id].stages[0].key  # shared by both trials: one artifact, one note
    now = library_versions()
    # 7 artifacts: the shared pretrain, an sft and a dpo per trial, an eval per trial
    trl = ", ".join(sorted([f"{now['trl']} (6 artifacts)", f"{old} (1 artifact)"]))
    assert (
        f"- artifacts made with: farm {now['farm']}; peft {now['peft']}; torch {now['torch']}; transformers {now['transformers']}; trl {trl}\n" in md
    )
    assert md.count(f"artifact pretrain-{pretrain} was made with trl {old} (now {now['trl']}) and reused as is") == 1
