"""A local stand-in for the Hugging Face hub: repositories under their real ids, written in the
layout of the hub's own cache (`$HF_HUB_CACHE/<type>s--<owner>--<name>/{refs,snapshots}`).

A user points the farm at a pre-filled cache with `HF_HOME` (or `HF_HUB_CACHE`) and
`HF_HUB_OFFLINE=1`; so do the tests: `huggingface_hub`, `transformers` and `datasets` then read
these repositories by id through their real code paths, exactly as they would read a cache that a
download on a machine with hub access had filled. Builders of the repositories' contents live in
`models.py` and `datasets.py` beside this file; `lm_eval.py` fills a `datasets` cache
(`HF_DATASETS_CACHE`) with the lm-eval tasks' datasets, since `datasets` offline reads only its own
cache, not the hub's. `build(root)` writes them all (cached by content).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def put(cache: Path, repo_type: str, repo_id: str, files: dict[str, bytes | str | Path], revision: str = "main") -> Path:
    """Write one repository revision into a hub cache; returns its snapshot folder.

    `files` maps a path in the repository to its content (bytes, text, or a local file to copy).
    The commit hash is derived from the content, so a changed fixture is a new commit."""
    folder = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    h = hashlib.sha1(repo_id.encode() + revision.encode())
    for name in sorted(files):
        content = files[name]
        data = Path(content).read_bytes() if isinstance(content, Path) else content.encode() if isinstance(content, str) else content
        h.update(name.encode() + hashlib.sha1(data).digest())
    commit = h.hexdigest()
    snapshot = folder / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content.encode() if isinstance(content, str) else content)
    ref = folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snapshot


def build(cache: Path) -> dict[str, str]:
    """Write every mirrored repository into `cache` (a no-op when nothing changed), and the datasets
    of lm-eval's hub tasks, prepared, into the cache of `datasets` at `<cache>/datasets` (lm_eval.py:
    offline, `datasets.load_dataset` reads that cache, not the hub's); returns the environment that
    points `huggingface_hub`, `transformers`, `datasets` and Detoxify (which fetches its checkpoint
    with torch.hub) at them, offline."""
    from hub_mirror import datasets, lm_eval, models

    cache.mkdir(parents=True, exist_ok=True)
    models.build(cache)
    datasets.build(cache)
    lm_eval.build(cache / "datasets")
    return {
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "TORCH_HOME": str(models.torch_home(cache)),
    }
