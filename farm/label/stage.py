"""The labelling stage: score every row of a data spec's sources with its `labels` scorers
through the Ray Data pipeline, once, and keep the scores in the store like any artifact."""

from __future__ import annotations

from farm.data.records import convert
from farm.data.sources import load_source
from farm.label.pipeline import label_records
from farm.store import Store

# Bump when this code changes what a labelling run makes: its old artifacts stop matching (farm.plan).
VERSION = 1

SCORES = "scores.parquet"


def label_data(data, store: Store, key: str) -> None:
    rows = convert([r for s in data.sources for r in load_source(s)], "text")
    scores = label_records(rows, list(data.labels))
    with store.writing("label", key, {"rows": len(rows), "labels": [lab.model_dump(mode="json") for lab in data.labels]}) as out:
        import pandas as pd

        pd.DataFrame([{"id": i, **cols} for i, cols in scores.items()]).to_parquet(out / SCORES, index=False)


def read_scores(store: Store, key: str) -> dict:
    """{row id: {column: score}} of a labelled data spec, from its finished labelling stage `key`
    (the plan's: a worker hashes no local file again)."""
    import pandas as pd

    if not store.done("label", key):
        raise RuntimeError(f"the labelling stage {key} of this data has not run")
    frame = pd.read_parquet(store.path("label", key) / SCORES)
    return {r.pop("id"): r for r in frame.to_dict("records")}
