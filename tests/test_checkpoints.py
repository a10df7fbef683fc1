"""Training checkpoints in the store (farm.train.checkpoints), without a trainer: what counts as a
checkpoint, which one a retry resumes from, and what is kept. The trainer's side (HF writes and
restores them) runs in tests/reliability/test_resume.py."""

from types import SimpleNamespace

import pytest
from transformers import TrainerControl

from farm.schema import CheckpointEvery
from farm.store import Store
from farm.train.checkpoints import MARKER, Checkpoints, due, resume_from, step_of


@pytest.mark.parametrize(
    "step, seconds, every, expected",
    [
        (2, 0, CheckpointEvery(steps=2, minutes=None), True),
        (3, 0, CheckpointEvery(steps=2, minutes=None), False),
        (3, 1799, CheckpointEvery(), False),  # the default: by time only
        (3, 1800, CheckpointEvery(), True),
        (3, 1800, CheckpointEvery(steps=2, minutes=30), True),  # whichever comes first
        (10, 10**6, CheckpointEvery(steps=2), False),  # the last step: the artifact is saved instead
    ],
)
def test_due(step, seconds, every, expected):
    assert due(step, 10, seconds, every) is expected


def test_step_of():
    assert step_of("checkpoint-40") == 40
    assert step_of("checkpoint-x") is None and step_of("README.md") is None and step_of("other-3") is None


@pytest.fixture
def node(tmp_path, monkeypatch):
    """Switch this "node"'s local cache ($FARM_CACHE), where a URI store stages checkpoints."""

    def use(name: str):
        monkeypatch.setenv("FARM_CACHE", str(tmp_path / name))

    use("node-a")
    return use


def save(cp: Checkpoints, step: int, payload: bytes) -> None:
    """What the HF trainer does at a save: write checkpoint-<step> into its output_dir, then call on_save."""
    folder = cp.local / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "rng_state.pth").write_bytes(b"rng")
    cp.on_save(None, SimpleNamespace(global_step=step), TrainerControl())


def area_steps(cp: Checkpoints) -> dict:
    """{folder name: has its marker} in the stage's checkpoint area (on the store's filesystem)."""
    from pyarrow.fs import FileSelector, FileType

    fs = cp.store.fs
    return {
        f.base_name: fs.get_file_info(f"{f.path}/{MARKER}").type == FileType.File
        for f in fs.get_file_info(FileSelector(cp.area, allow_not_found=True))
    }


@pytest.mark.parametrize("uri", [False, True], ids=["local", "uri"])
def test_a_retry_on_another_node_resumes_from_the_latest_complete_checkpoint(tmp_path, node, uri):
    root = (tmp_path / "store").as_uri() if uri else tmp_path / "store"
    every = CheckpointEvery(steps=2)
    first = Checkpoints(Store(root), "sft", "k1", every)
    assert first.prepare() is None and first.resumed_from is None  # nothing to resume from
    assert first.area == f"{first.store.base}/.checkpoints/sft/k1"
    assert first.local.is_relative_to(tmp_path / ("node-a" if uri else "store"))  # a URI store stages on the node

    save(first, 2, b"step 2")
    save(first, 4, b"step 4")
    assert area_steps(first) == {"checkpoint-4": True}  # the previous one goes once the next one counts
    if uri:
        assert not (first.local / "checkpoint-4").exists()  # uploaded, then dropped from the node
    # The worker dies while saving step 6: its files are there, its marker is not.
    partial = tmp_path / "store" / ".checkpoints" / "sft" / "k1" / "checkpoint-6"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")

    node("node-b")
    retry = Checkpoints(Store(root), "sft", "k1", every)
    path = retry.prepare()
    assert retry.resumed_from == 4 and path == str(retry.local / "checkpoint-4")
    assert (retry.local / "checkpoint-4" / "model.safetensors").read_bytes() == b"step 4"  # on this node
    assert area_steps(retry) == {"checkpoint-4": True}  # the cut-short save is gone
    assert resume_from(SimpleNamespace(callbacks=[object(), retry])) == path
    assert resume_from(SimpleNamespace(callbacks=[])) is None

    save(retry, 6, b"step 6")
    assert area_steps(retry) == {"checkpoint-6": True}
    retry.finish()  # the artifact is published: nothing is left, in the store or on the node
    assert area_steps(retry) == {} and not retry.local.exists()


def asked_to_save(every) -> list[int]:
    cp = Checkpoints(Store("mock:///bucket"), "sft", "k1", every)
    asked = []
    for step in range(1, 10):
        control = TrainerControl()
        cp.on_step_end(SimpleNamespace(logging_steps=2), SimpleNamespace(global_step=step, max_steps=9), control)
        asked += [step] * control.should_save
    return asked


def test_the_callback_asks_the_trainer_to_save_when_due():
    assert asked_to_save(CheckpointEvery(steps=3)) == [3, 6]  # not 9: the last step saves the artifact
    # By time, the clock is read at logging steps only (on several ranks each read is a collective).
    assert asked_to_save(CheckpointEvery(steps=None, minutes=1e-9)) == [2, 4, 6, 8]


def test_the_interval_is_not_part_of_the_stage_key(tiny_doc):
    from farm.grid import expand
    from farm.plan import plan_trial

    tiny_doc.pop("grid")
    plain = plan_trial(expand(tiny_doc, "s.yaml")[0].study)
    tiny_doc["stages"]["sft"]["checkpoint_every"] = {"steps": 5, "minutes": None}
    tiny_doc["stages"]["dpo"]["checkpoint_every"] = None
    assert plan_trial(expand(tiny_doc, "s.yaml")[0].study) == plain  # how often it saves changes no weight
