"""Checkpoints of a training stage, so that a retry resumes it instead of starting over.

The HF trainer writes the checkpoints (model, optimizer, scheduler, RNG states, trainer state: its
own `resume_from_checkpoint` restores all of them and the data position); this module decides when
(`due`), where (`Store.checkpoints`: `<store>/.checkpoints/<kind>/<key>/`, a stable path that
outlives the worker and that a retry on any node finds), and which ones count:

- A checkpoint counts once `farm-checkpoint.json` is written in it, after every rank has saved its
  part (and, on an object store, after every node uploaded it): a save cut short by a kill is
  never resumed from.
- Only the latest complete checkpoint is kept: the previous one is deleted once the next one counts.
- Rank 0 picks the checkpoint to resume from and tells the other ranks, so all resume from the same one.
- Once the stage's artifact is published the checkpoints are deleted.
"""

from __future__ import annotations

import json
import shutil
import time

from pyarrow.fs import FileSelector, FileType, LocalFileSystem, copy_files
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from farm.files import atomic_write, fsync_tree
from farm.store import Store

MARKER = "farm-checkpoint.json"


def due(step: int, max_steps: int, seconds_since_save: float, every) -> bool:
    """Whether to save a checkpoint after `step` (`every`: the stage's CheckpointEvery). Never after
    the last step: the stage saves its artifact then."""
    if step >= max_steps:
        return False
    by_steps = every.steps is not None and step % every.steps == 0
    return by_steps or (every.minutes is not None and seconds_since_save >= every.minutes * 60)


def step_of(name: str) -> int | None:
    """The step of a `checkpoint-<step>` folder name, else None."""
    prefix, _, step = name.rpartition("-")
    return int(step) if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() else None


class Checkpoints(TrainerCallback):
    """One training stage's checkpoints on one rank: `prepare` before training (the checkpoint to
    resume from), the trainer callback while training, `finish` after the artifact is published."""

    def __init__(self, store: Store, kind: str, key: str, every, rank: int = 0, local_rank: int = 0):
        self.store, self.every, self.rank, self.local_rank = store, every, rank, local_rank
        self.area, self.local = store.checkpoints(kind, key)  # on store.fs; where the trainer writes
        self.uploads = store.uri is not None  # the trainer writes to a staging folder on this node
        self.resumed_from: int | None = None  # the step this attempt resumed from
        self.last_save = time.monotonic()

    # Before and after the stage

    def prepare(self) -> str | None:
        """The local folder of the checkpoint to resume from (None: start from scratch), the same on every rank."""
        step = None
        if self.rank == 0:
            steps = self._complete()
            step = steps[-1] if steps else None
            self._prune(keep=step)  # cut-short saves and older checkpoints: nothing resumes from them
        step = _broadcast(step)
        if self.uploads and self.local_rank == 0:  # one copy per node, shared by its ranks
            shutil.rmtree(self.local, ignore_errors=True)  # a killed attempt's staging
            if step is not None:
                self._download(_name(step))
        _barrier()  # every node has its copy
        self.resumed_from = step
        return self.resume

    @property
    def resume(self) -> str | None:
        return None if self.resumed_from is None else str(self.local / _name(self.resumed_from))

    def finish(self) -> None:
        """After the artifact is published (rank 0) or this rank's part is done: delete what is left."""
        if self.rank == 0:
            _delete(self.store.fs, self.area)
        if self.uploads and self.local_rank == 0:
            shutil.rmtree(self.local, ignore_errors=True)

    # While training (the trainer calls these on every rank)

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()  # minutes of training: loading the model does not count

    def on_step_end(self, args, state, control, **kwargs):
        # Every rank must save at the same step (DeepSpeed saves collectively, each rank writes its RNG
        # state). A step count decides alike on every rank; a time is rank 0's clock, sent to all only
        # at logging steps, so that a stage does not pay a collective for it on every step.
        step = state.global_step
        if self.every.minutes is not None and step % max(1, int(args.logging_steps)) == 0:
            seconds = _broadcast(time.monotonic() - self.last_save if self.rank == 0 else None)
        else:
            seconds = 0.0
        if due(step, state.max_steps, seconds, self.every):
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        name = _name(state.global_step)
        _barrier()  # every rank has written its part
        if self.uploads and self.local_rank == 0:
            self._upload(name)
            shutil.rmtree(self.local / name)  # uploaded: the area holds it now
        _barrier()  # every node has uploaded its ranks' parts (on a local store: a no-op wait)
        if self.rank == 0:
            marker = json.dumps({"step": state.global_step}).encode()
            if self.uploads:
                with self.store.fs.open_output_stream(f"{self.area}/{name}/{MARKER}") as f:  # one put: whole or absent
                    f.write(marker)
            else:
                fsync_tree(self.local / name)  # on disk before it counts (a node may crash, not just a worker)
                atomic_write(self.local / name / MARKER, marker)
            self._prune(keep=state.global_step)
        self.last_save = time.monotonic()

    # The area

    def _complete(self) -> list[int]:
        """Steps of the complete checkpoints in the area, oldest first."""
        fs = self.store.fs
        folders = [(step_of(f.base_name), f.path) for f in fs.get_file_info(FileSelector(self.area, allow_not_found=True))]
        return sorted(s for s, path in folders if s is not None and fs.get_file_info(f"{path}/{MARKER}").type == FileType.File)

    def _prune(self, keep: int | None) -> None:
        for f in self.store.fs.get_file_info(FileSelector(self.area, allow_not_found=True)):
            if step_of(f.base_name) != keep:
                _delete(self.store.fs, f.path)

    def _upload(self, name: str) -> None:
        self.store.fs.create_dir(f"{self.area}/{name}")  # copy_files makes only the subfolders
        copy_files(str(self.local / name), f"{self.area}/{name}", source_filesystem=LocalFileSystem(), destination_filesystem=self.store.fs)

    def _download(self, name: str) -> None:
        (self.local / name).mkdir(parents=True)
        copy_files(f"{self.area}/{name}", str(self.local / name), source_filesystem=self.store.fs, destination_filesystem=LocalFileSystem())


def resume_from(ctx) -> str | None:
    """The checkpoint the stage's trainer resumes from (`Checkpoints.prepare` chose it), if any."""
    found = [cb for cb in ctx.callbacks if isinstance(cb, Checkpoints)]
    return found[0].resume if found else None


def _name(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def _delete(fs, path: str) -> None:
    info = fs.get_file_info(path)
    if info.type == FileType.Directory:
        fs.delete_dir(path)
    elif info.type == FileType.File:
        fs.delete_file(path)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast(value):
    """Rank 0's value on every rank."""
    if not _distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()
