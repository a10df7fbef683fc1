"""Scorers (Detoxify on a tiny local checkpoint, VADER) and the Ray Data labelling pipeline."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from conftest import FARM, ROOT

from farm.cli import main
from farm.data.records import Text
from farm.label import pipeline
from farm.label.pipeline import label_file, label_records
from farm.label.scorers import DETOXIFY_COLUMNS, DETOXIFY_RELEASED, build, write_tiny_detoxify
from farm.process import WORKER_ENV
from farm.schema import LabelSpec

TEXTS = [
    "I love this wonderful, beautiful day!",
    "This is terrible and I hate every part of it.",
    "",
    "The report is due on Tuesday.",
    "you are a stupid idiot " * 60,  # longer than the model's 128 positions: truncated
    "ok",
]
POSITIVE, NEGATIVE = TEXTS[0], TEXTS[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return str(write_tiny_detoxify(tmp_path_factory.mktemp("detoxify")))


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module; the pipeline reuses it and leaves it running."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


def records(n: int) -> list[Text]:
    return [Text(f"r/{i}", f"{TEXTS[i % len(TEXTS)]} (row {i})", meta={"scores": {}, "source": "x" * 1000}) for i in range(n)]


# ---------------------------------------------------------------- scorers


def test_detoxify_tiny_checkpoint(ckpt, tmp_path):
    scorer = build("detoxify", model=ckpt, batch_size=4)
    got = scorer.fields(TEXTS)
    assert tuple(got) == DETOXIFY_COLUMNS == scorer.columns
    for column, values in got.items():
        assert values.shape == (len(TEXTS),) and ((values >= 0) & (values <= 1)).all(), column
        assert len(set(values.round(6))) > 1, f"{column}: every text scored alike"
    np.testing.assert_array_equal(scorer.score(TEXTS), got["toxicity"])
    again = build("detoxify", model=ckpt, batch_size=4).fields(TEXTS)  # another load of the same file
    rewritten = build("detoxify", model=str(write_tiny_detoxify(tmp_path)), batch_size=4).fields(TEXTS)  # same seed, same weights
    one_by_one = build("detoxify", model=ckpt, batch_size=1).fields(TEXTS)
    for column in DETOXIFY_COLUMNS:
        np.testing.assert_array_equal(again[column], got[column])
        np.testing.assert_array_equal(rewritten[column], got[column])
        np.testing.assert_allclose(one_by_one[column], got[column], atol=1e-5)  # padding changes float sums only
    assert build("detoxify", model=ckpt).fields([TEXTS[3]])["toxicity"].shape == (1,)  # Detoxify gives a float for one text
    from detoxify.detoxify import MODEL_URLS

    assert set(DETOXIFY_RELEASED) == set(MODEL_URLS)  # the names a study may give, checked without importing detoxify


def test_vader_known_sentences():
    scorer = build("vader")
    got = scorer.fields([POSITIVE, NEGATIVE])
    assert tuple(got) == ("neg", "neu", "pos", "compound")
    assert got["pos"][0] > got["neg"][0] and got["compound"][0] > 0.5
    assert got["neg"][1] > got["pos"][1] and got["compound"][1] < -0.5
    np.testing.assert_allclose(got["neg"] + got["neu"] + got["pos"], 1, atol=2e-3)
    np.testing.assert_array_equal(scorer.score([POSITIVE, NEGATIVE]), got["compound"])


@pytest.mark.parametrize(
    "labels, message",
    [
        ([], "no scorer given"),
        ([LabelSpec(scorer="detoxify", model="/no/such.ckpt")], "neither a released model"),
        ([LabelSpec(scorer="vader", model="x")], "vader takes no model"),
        ([LabelSpec(scorer="detoxify"), LabelSpec(scorer="embedded_toxicity")], "both give column 'toxicity'"),
        ([LabelSpec(scorer="vader", prefix="x"), LabelSpec(scorer="vader", prefix="x")], "both give column 'xneg'"),
        ([LabelSpec(scorer="embedded_toxicity", prefix="")], None),
    ],
)
def test_check_labels(labels, message):
    if message is None:
        assert pipeline.check_labels(labels) == ["toxicity"]
        return
    with pytest.raises(ValueError, match=message):
        pipeline.check_labels(labels)


def test_read_input_takes_only_its_columns(tmp_path):
    src = tmp_path / "rows.jsonl"
    rows = [{"id": 1, "text": "a", "extra": {"x": 1}}, {"id": "b", "text": None, "extra": [1, "y"]}, {"id": 3, "text": 7}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = pipeline.read_input(src, id_column="id")  # mixed-type ids become strings; other columns are never built
    assert got.ids.to_pylist() == ["1", "b", "3"] and got.texts.to_pylist() == ["a", "", "7"]
    pd.DataFrame({"body": ["x", None], "blob": [b"\0", b"\1"]}).to_parquet(tmp_path / "rows.parquet")
    got = pipeline.read_input(tmp_path / "rows.parquet", text_column="body")
    assert got.ids.to_pylist() == [0, 1] and got.texts.to_pylist() == ["x", ""]


# ---------------------------------------------------------------- CLI (its own Ray: runs before the module's)


def test_cli_label_jsonl(tmp_path):
    """The command as a user runs it: its own local Ray, started and shut down."""
    import subprocess

    rows = [{"uid": f"u{i}", "body": TEXTS[i % len(TEXTS)]} for i in range(12)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out" / "labels.parquet"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [*FARM, "label", src, "--out", out, "--scorer", "vader", "--text-column", "body", "--id-column", "uid", "--batch-size", "4", "--actors", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    df = pd.read_parquet(out)
    assert list(df.columns) == ["id", "text", "neg", "neu", "pos", "compound"]
    assert df["id"].tolist() == [r["uid"] for r in rows] and df["text"].tolist() == [r["body"] for r in rows]
    assert df.loc[0, "compound"] > 0.5 > -0.5 > df.loc[1, "compound"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["{d}/missing.jsonl", "--scorer", "vader"], "missing.jsonl: no such file"),
        (["{d}/in.txt", "--scorer", "vader"], "not a readable file type"),
        (["{d}/in.jsonl", "--scorer", "sentiment"], "unknown scorer 'sentiment'"),
        (["{d}/in.jsonl", "--scorer", "vader", "--text-column", "body"], "no text column 'body'; its columns: id, text"),
        (["{d}/in.jsonl", "--scorer", "vader", "--id-column", "uid"], "no id column 'uid'"),
        (["{d}/in.jsonl", "--scorer", "detoxify:{d}/missing.ckpt"], "neither a released model"),
        (["{d}/in.jsonl", "--scorer", "vader", "--actors", "0"], "--actors: Input should be greater than or equal to 1"),
        (["{d}/dup.jsonl", "--scorer", "vader", "--id-column", "id"], "id column 'id' has repeated values"),
        (["{d}/in.jsonl", "--scorer", "detoxify", "--scorer", "embedded_toxicity"], "give one of them a prefix"),
    ],
)
def test_cli_label_bad_input(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "a"}\n')
    (tmp_path / "in.txt").write_text("a\n")
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')

    def no_ray(*a, **k):
        raise AssertionError("Ray work started for a bad input")

    monkeypatch.setattr(pipeline, "ray_session", no_ray)
    monkeypatch.setattr(pipeline, "label_input", no_ray)
    monkeypatch.setattr("farm.cli.label_input", no_ray)
    rc = main(["label", *(a.format(d=tmp_path) for a in args), "--out", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.parquet").exists()


# ---------------------------------------------------------------- the pipeline on the module's Ray


def test_label_records_matches_serial(local_ray, ckpt):
    recs = records(40)
    labels = [LabelSpec(scorer="vader", batch_size=8, actors=2), LabelSpec(scorer="detoxify", model=ckpt, prefix="tox_", batch_size=8, actors=1)]
    assert pipeline.rows_per_block(len(recs), labels) < len(recs)  # several blocks, so order is restored
    got = label_records(recs, labels)
    assert list(got) == [r.id for r in recs]
    columns = ["neg", "neu", "pos", "compound", *(f"tox_{c}" for c in DETOXIFY_COLUMNS)]
    assert all(list(v) == columns for v in got.values())
    assert all(isinstance(x, float) for v in got.values() for x in v.values())
    texts = [r.text for r in recs]
    vader, detox = build("vader").fields(texts), build("detoxify", model=ckpt).fields(texts)
    for c in vader:
        assert [got[r.id][c] for r in recs] == vader[c].tolist()
    for c in detox:
        np.testing.assert_allclose([got[r.id][f"tox_{c}"] for r in recs], detox[c], atol=1e-5)
    import ray

    assert ray.is_initialized()  # a running Ray is reused and left running


def test_label_records_refusals(local_ray):
    with pytest.raises(ValueError, match="not unique"):
        label_records([Text("a", "x"), Text("a", "y")], [LabelSpec(scorer="vader")])
    with pytest.raises(ValueError, match=r"scorer vader: an actor pool of 3 actors x 1 CPU can never run .*at most 2 such actors fit"):
        label_records(records(3), [LabelSpec(scorer="vader", actors=3)])  # would wait forever
    assert label_records([], [LabelSpec(scorer="vader")]) == {}


def test_label_file_parquet_atomic(local_ray, tmp_path, monkeypatch):
    src, out = tmp_path / "in.parquet", tmp_path / "labels.parquet"
    pd.DataFrame({"uid": [f"u{i}" for i in range(30)], "body": [TEXTS[i % len(TEXTS)] for i in range(30)], "other": 1}).to_parquet(src)
    out.write_bytes(b"old")
    labels = [LabelSpec(scorer="vader", prefix="s_", batch_size=4, actors=2)]

    def fail(*a, **k):
        raise RuntimeError("scoring failed")

    with monkeypatch.context() as m:  # a failed run leaves the old file as it was
        m.setattr(pipeline, "score_dataset", fail)
        with pytest.raises(RuntimeError):
            label_file(src, out, labels, text_column="body", id_column="uid")
    assert out.read_bytes() == b"old"

    import farm.files

    renames = []
    real = os.replace
    monkeypatch.setattr(farm.files.os, "replace", lambda a, b: (renames.append((str(a), str(b))), real(a, b))[1])
    label_file(src, out, labels, text_column="body", id_column="uid")
    [(tmp, final)] = renames
    assert final == str(out) and os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".labels.parquet.tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "labels.parquet"]
    df = pd.read_parquet(out)
    assert list(df.columns) == ["id", "text", "s_neg", "s_neu", "s_pos", "s_compound"]
    assert df["id"].tolist() == [f"u{i}" for i in range(30)]
    np.testing.assert_array_equal(df["s_compound"], build("vader").score(df["text"].tolist()))


def test_label_file_hub_split(local_ray, tmp_path, monkeypatch):
    """`hub:` input goes through `ray.data.from_huggingface`; a local dataset folder stands in for the hub."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "ds"
    folder.mkdir()
    pd.DataFrame({"sentence": [TEXTS[i % 4] for i in range(20)]}).to_parquet(folder / "train.parquet")
    out = tmp_path / "hub.parquet"
    label_file(f"hub:{folder}:train", out, [LabelSpec(scorer="vader", batch_size=4, actors=2)], text_column="sentence")
    df = pd.read_parquet(out)
    assert df["id"].tolist() == list(range(20)) and df["text"].tolist() == [TEXTS[i % 4] for i in range(20)]
    np.testing.assert_array_equal(df["compound"], build("vader").score(df["text"].tolist()))


def test_cli_label_in_process_reuses_ray(local_ray, tmp_path, monkeypatch, capsys, ckpt):
    for key in WORKER_ENV:  # the command sets these for Ray workers; restore them after
        monkeypatch.delenv(key, raising=False)
    src = tmp_path / "in.csv"
    pd.DataFrame({"text": [POSITIVE, NEGATIVE, ""]}).to_csv(src, index=False)
    assert main(["label", str(src), "--out", str(tmp_path / "o.parquet"), "--scorer", f"tox_=detoxify:{ckpt}"]) == 0
    df = pd.read_parquet(tmp_path / "o.parquet")
    assert list(df.columns) == ["id", "text", *(f"tox_{c}" for c in DETOXIFY_COLUMNS)]
    assert df["id"].tolist() == [0, 1, 2] and df["text"].tolist() == [POSITIVE, NEGATIVE, ""]  # a csv's empty cell is ""
    np.testing.assert_allclose(df["tox_toxicity"], build("detoxify", model=ckpt).score(df["text"].tolist()), atol=1e-5)
    assert "wrote" in capsys.readouterr().out
