import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

# Tests never reach a hub; fail fast instead of retrying for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# No tracker by default: MLflow's start costs ~8 s a run. The trackers are tested on their own
# (test_track.py) and through `farm run --track` on the tiny study (tiny_run, e2e/test_run.py).
os.environ.setdefault("FARM_TRACK", "none")
os.environ.setdefault("WANDB_MODE", "offline")  # W&B's servers are not reached either

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny.yaml"
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


@pytest.fixture
def tiny_doc() -> dict:
    return yaml.safe_load(TINY.read_text())


@pytest.fixture
def write_study(tmp_path):
    def write(doc, name="study.yaml") -> Path:
        path = tmp_path / name
        path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
        return path

    return write


FARM = [sys.executable, "-m", "farm"]
RAY = str(Path(sys.executable).parent / "ray")  # the `ray` CLI of this venv (tests that start Ray nodes)


@pytest.fixture
def chromium() -> str:
    """The headless browser the HTML tests render in. CI installs it (.ci/run): missing there, the
    test fails; a developer's machine without it skips."""
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (CI installs it)")
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def farm(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*FARM, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"farm {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def farm_in_terminal(*args) -> str:
    """`farm run ...` with a pseudo-terminal for its output (as a researcher's shell gives it): what
    it wrote, escape codes and all; fails as `farm` does on a non-zero exit."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    proc = subprocess.Popen([*FARM, *map(str, args)], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    try:
        while chunk := os.read(master, 65536):
            out += chunk
    except OSError:  # EIO: every holder of the terminal's other end has closed it
        pass
    finally:
        os.close(master)
    text = out.decode(errors="replace")
    if proc.wait(timeout=900) != 0:
        raise AssertionError(f"farm {' '.join(map(str, args))} exited {proc.returncode}\n{text}")
    return text


def metrics_table(results: Path) -> pd.DataFrame:
    return (
        pd.read_csv(results / "tiny" / "table.csv")
        .drop(columns=["eval_seconds", "gen_tokens_per_s"], errors="ignore")
        .set_index("trial")
        .sort_index()
    )


def artifacts(results: Path) -> dict[str, float]:
    """Complete artifacts (a temporary folder left by a killed writer is not one) and their mtimes."""
    return {p.name: p.stat().st_mtime for p in (results / ".store" / "artifacts").iterdir() if not p.name.startswith(".")}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny study run once on a local Ray: (results folder, the run's output)."""
    results = tmp_path_factory.mktemp("tiny-results")
    proc = farm("run", TINY, "--results", results, "--track", "mlflow", "--track", "tensorboard", "--track", "wandb")
    return results, proc.stdout + proc.stderr


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def hub_mirror_env() -> dict[str, str]:
    """The local hub (tests/hub_mirror), built once and kept between runs beside the tiny models:
    the environment that points the hub libraries at it, offline."""
    from hub_mirror import build
    from tiny_models import cache_root

    return build(cache_root().parent / "hub-mirror")


@pytest.fixture(scope="module")
def mirror(hub_mirror_env):
    """This process reads the hub from the mirror (huggingface_hub and datasets read their cache
    folders at import)."""
    import datasets
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_CACHE", hub_mirror_env["HF_HUB_CACHE"])
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", Path(hub_mirror_env["HF_DATASETS_CACHE"]))
        for k, v in hub_mirror_env.items():
            mp.setenv(k, v)
        yield Path(hub_mirror_env["HF_HUB_CACHE"])
