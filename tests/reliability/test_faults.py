"""Stage failures injected through the test-only stage setting `fault`."""

import pandas as pd
import pytest
import yaml
from conftest import TINY, farm, metrics_table, read_json

pytestmark = pytest.mark.slow


def study_with(tmp_path, stage: str, fault: dict) -> str:
    doc = yaml.safe_load(TINY.read_text())
    doc["max_failures"] = 1
    doc["stages"][stage]["fault"] = fault
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))  # the stage chain keeps its order
    return path


def test_a_stage_that_keeps_raising_is_retried_then_marked_failed(tiny_run, tmp_path):
    study = study_with(tmp_path, "dpo", {"at_step": 2, "kind": "raise", "trial": "rate=1.0"})
    results = tmp_path / "results"
    proc = farm("run", study, "--results", results, check=False)
    assert proc.returncode == 1  # a trial failed
    table = metrics_table(results)
    assert table.loc["rate=1.0", "status"] == "failed" and "injected fault at step 2" in table.loc["rate=1.0", "error"]
    ok = table.loc[["rate=0.0"]].drop(columns=["error"])  # the other trial finished, unchanged
    pd.testing.assert_frame_equal(ok, metrics_table(tiny_run[0]).loc[["rate=0.0"]], check_dtype=False)
    counters = list((results / ".store" / "faults").iterdir())
    assert [c.read_text() for c in counters] == ["2"]  # first attempt + max_failures=1 retry
    report = (results / "tiny" / "report.md").read_text()
    assert "1 of 2 trials finished" in report and "injected fault" in report
    assert read_json(results / "tiny" / "rate=1.0" / "metrics.json")["status"] == "failed"


def test_a_killed_worker_is_survived_by_a_retry(tiny_run, tmp_path):
    study = study_with(tmp_path, "sft", {"at_step": 2, "kind": "kill", "times": 1, "trial": "rate=1.0"})
    results = tmp_path / "results"
    farm("run", study, "--results", results)
    assert metrics_table(results).equals(metrics_table(tiny_run[0]))  # as if nothing had happened
    counters = list((results / ".store" / "faults").iterdir())
    assert [c.read_text() for c in counters] == ["1"]
