import os
from pathlib import Path

import pytest
import yaml

# Tests never reach a hub; fail fast instead of retrying for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

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
        path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
        return path

    return write
