"""A stage whose workers are killed after a checkpoint resumes from it on Tune's retry, and ends
with the very weights of a run that was never interrupted."""

import re

import pytest
import torch
import yaml
from conftest import TINY, farm, read_json
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 6


def one_stage_study(tmp_path, name: str, **sft) -> str:
    """The tiny study cut to one SFT stage on two workers (so ranks must agree on the checkpoint)."""
    doc = yaml.safe_load(TINY.read_text())
    doc.pop("grid")
    doc["max_failures"] = 1
    stage = {**doc["stages"]["sft"], "max_steps": STEPS, "resources": {"num_workers": 2}, **sft}
    doc["stages"] = {"sft": stage}
    doc["eval"] = {**doc["eval"], "metrics": ["perplexity"], "limit": 8}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def stage_record(results) -> dict:
    return read_json(results / "tiny" / "base" / "metrics.json")["stages"]["sft"]


def weights(store, record) -> dict:
    folder = store / "artifacts" / f"sft-{record['key']}"
    return {f.name: load_file(f) for f in sorted(folder.glob("*.safetensors"))}


def test_a_killed_stage_resumes_from_its_checkpoint_and_ends_as_if_uninterrupted(tmp_path):
    # Checkpoints after steps 2 and 4; every worker is killed after step 3, once.
    study = one_stage_study(tmp_path, "killed", checkpoint_every={"steps": 2}, fault={"at_step": 3, "kind": "kill", "times": 1})
    results = tmp_path / "killed"
    out = farm("run", study, "--results", results).stdout
    killed = stage_record(results)
    assert (results / ".store" / "faults" / f"{killed['key']}-base").read_text() == "1"  # it was killed once
    assert killed["metrics"]["resumed_from_step"] == 2 and killed["metrics"]["train_steps"] == STEPS
    logged = [int(s) for s in re.findall(rf"sft step (\d+)/{STEPS}", out)]
    assert set(range(3, STEPS + 1)) <= set(logged) and len(logged) == len(set(logged))  # no step trained twice
    assert not (results / ".store" / ".checkpoints" / "sft" / killed["key"]).exists()  # deleted once published

    # The same stage (checkpoints and faults are not in its key), never interrupted, in another store.
    reference = tmp_path / "reference"
    farm("run", one_stage_study(tmp_path, "reference"), "--results", reference)
    plain = stage_record(reference)
    assert plain["key"] == killed["key"] and plain["metrics"]["resumed_from_step"] is None
    got, want = weights(results / ".store", killed), weights(reference / ".store", plain)
    assert want and got.keys() == want.keys()
    for name in want:
        assert want[name].keys() == got[name].keys()
        for tensor in want[name]:
            assert torch.equal(got[name][tensor], want[name][tensor]), tensor
