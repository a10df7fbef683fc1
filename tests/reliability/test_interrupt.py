"""A driver killed (SIGKILL) or stopped (Ctrl-C) in the middle of a grid loses no finished work."""

import os
import signal
import subprocess
import time

import pytest
from conftest import FARM, ROOT, TINY, artifacts, farm, metrics_table

pytestmark = pytest.mark.slow


SECRET = "hf_FarmTestSecret0123456789"


def start(results):
    env = {**os.environ, "HF_TOKEN": SECRET, "WANDB_API_KEY": SECRET}
    return subprocess.Popen(
        [*FARM, "run", str(TINY), "--results", str(results)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(predicate, proc, timeout=600):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"farm exited early ({proc.returncode}): {proc.communicate()}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.5)


def test_sigkill_mid_grid_then_rerun_equals_an_uninterrupted_run(tiny_run, tmp_path):
    results = tmp_path / "results"
    proc = start(results)
    # Mid-grid: the shared pretrain and at least one trial's SFT are complete, no trial is.
    wait_for(lambda: (results / ".store" / "artifacts").exists() and any(n.startswith("sft-") for n in artifacts(results)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = artifacts(results)
    assert not (results / "tiny" / "table.csv").exists()

    out = farm("run", TINY, "--results", results).stdout
    after = artifacts(results)
    assert all(after[name] == mtime for name, mtime in before.items())  # finished stages were not redone
    assert "pretrain step" not in out  # the shared stage finished before the kill
    assert metrics_table(results).equals(metrics_table(tiny_run[0]))  # same ids, same metrics
    leaked = [p for p in results.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked  # tokens from the environment reach no result, artifact or log


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    results = tmp_path / "results"
    proc = start(results)
    # Mid-grid: the shared pretrain is done, the trials' own stages and evaluations are not.
    wait_for(lambda: (results / ".store" / "artifacts").exists() and any(n.startswith("pretrain-") for n in artifacts(results)), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and f"farm run {TINY} --results {results}" in err
    assert "Traceback" not in err
    finished = farm("run", TINY, "--results", results)  # and it resumes
    assert "farm: report at" in finished.stdout
