import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, TINY

FARM = [sys.executable, "-m", "farm"]


def farm(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*FARM, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"farm {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics_table(results: Path) -> pd.DataFrame:
    return pd.read_csv(results / "tiny" / "table.csv").drop(columns=["eval_seconds"]).set_index("trial").sort_index()


def artifacts(results: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in (results / ".store" / "artifacts").iterdir()}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny study run once on a local Ray: (results folder, the run's output)."""
    results = tmp_path_factory.mktemp("tiny-results")
    proc = farm("run", TINY, "--results", results)
    return results, proc.stdout + proc.stderr


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
