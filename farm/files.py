"""Files: atomic writes, content digests, storage URIs and the node's cache folder.

Every module that writes a result, a record or an artifact's marker writes it through
`atomic_write`, so a reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from pathlib import Path

DIGESTS = "digests.json"  # under cache_dir(): {absolute path: [size, mtime_ns, ctime_ns, inode, sha256]}


# A file changed this shortly before it was read may change again within the same timestamp tick (many
# filesystems keep coarser times than ns) with its size: its digest is not cached, the next plan reads it.
RACY_NS = 2 * 10**9


_digests: dict[str, dict] = {}  # {cache file: its entries}, loaded once per process


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes; of a folder, of the lines `<sha256>  <path in the folder>` of its
    files, sorted (as `sha256sum` prints them). Names starting with a dot are left out: `.git`,
    the `.cache` the hub writes into a downloaded folder, editors' swap files. A file's digest is
    cached by its path, size, mtime, ctime and inode (`DIGESTS`), so a plan reads again only the
    files that changed: a 7B model's weights, or a 1 GB data file, are read once."""
    path = Path(path).expanduser().absolute()
    cached = _digest_cache()
    new: dict[str, list] = {}
    if path.is_dir():
        files = []
        for root, dirs, names in os.walk(path, followlinks=True):  # links followed: a hub snapshot's files are links
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [Path(root, n).relative_to(path).as_posix() for n in names if not n.startswith(".")]
        files.sort()
        manifest = "".join(f"{_file_digest(path / f, cached, new)}  {f}\n" for f in files)
        out = hashlib.sha256(manifest.encode()).hexdigest()
    else:
        out = _file_digest(path, cached, new)
    if new:
        _save_digests(new)
    return out


def _file_digest(path: Path, cached: dict, new: dict) -> str:
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    entry = cached.get(str(path))
    if entry and entry[:4] == stamp:
        return entry[4]
    start = time.time_ns()
    sha = sha256_file(path)
    if start - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
        cached[str(path)] = new[str(path)] = [*stamp, sha]
    return sha


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digest_cache() -> dict:
    file = str(cache_dir() / DIGESTS)
    if file not in _digests:
        try:
            _digests[file] = json.loads(Path(file).read_text())
        except (OSError, ValueError):  # none yet, or unreadable: every file is hashed again
            _digests[file] = {}
    return _digests[file]


def _save_digests(new: dict) -> None:
    """Merge `new` into the cache file, whose entries another driver may have added meanwhile.
    A cache that cannot be written costs time, not correctness: a warning, and the plan goes on."""
    file = cache_dir() / DIGESTS
    try:
        try:
            on_disk = json.loads(file.read_text())
        except (OSError, ValueError):
            on_disk = {}
        atomic_write(file, json.dumps({**on_disk, **new}).encode())
    except OSError as e:
        warnings.warn(f"could not write the cache of file digests {file}: {e}; the next plan reads local inputs again", stacklevel=2)


def is_uri(root) -> bool:
    """`s3://bucket/x`, `gs://...`, `file:///...`: a pyarrow filesystem URI rather than a local path."""
    return "://" in str(root)


def join(root: str, *parts: str) -> str:
    """A path under a storage root, local or URI (Path would turn `s3://b` into `s3:/b`)."""
    return "/".join([str(root).rstrip("/"), *parts]) if is_uri(root) else str(Path(root, *parts))


def cache_dir() -> Path:
    """This node's cache (downloaded artifacts, scorer models): $FARM_CACHE, else ~/.cache/farm."""
    return Path(os.environ.get("FARM_CACHE", Path.home() / ".cache" / "farm"))


def move(tmp: Path, final: Path) -> None:
    """Rename a finished local folder into place, unless a concurrent writer got there first."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a reader sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
