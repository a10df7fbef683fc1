"""The artifact store: every stage's output under its key, complete or absent.

An artifact is written under a temporary name, marked complete, fsynced and renamed: a
half-written one is never visible under its final name. On an object store (a `s3://` root) the
marker is uploaded last instead, and only an artifact with its marker is read (see `Store`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
import warnings
import weakref
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from filelock import FileLock
from pyarrow.fs import FileSelector, FileSystem, FileType, LocalFileSystem, copy_files

from farm.files import atomic_write, cache_dir, fsync_dir, fsync_tree, is_uri, move, write_json

MARKER = "farm-artifact.json"


CHECKPOINTS = ".checkpoints"  # under the root: checkpoints of unfinished training stages


CACHE_MAX_GB = "FARM_CACHE_MAX_GB"  # bound of a node's cache of downloaded artifacts (default: half its disk)


USED = ".used"  # beside a cached artifact: its mtime is the last use; users hold a shared lock on it


# A lease on an object store (`S3Lease`) not renewed for this long is a dead holder's, and a waiter takes
# it over. Its holder renews it every quarter of it, so three renewals in a row may fail (a slow request,
# a network blip) before it is lost; a crashed node's stage is rebuilt this long after its last renewal,
# little next to the minutes to hours of the stages it guards.
LEASE_TTL = 120.0


# How often a waiter looks at a lease again: one small GET each time, and what it waits for takes minutes.
LEASE_POLL = 5.0


# What S3 answers a conditional request that lost: its precondition failed (412), a concurrent conditional
# write to the same key won (409), or `If-Match` named an object that is gone (404).
LOST = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"}


# The libraries whose versions each artifact's marker records. Not in the key (docs/ARCHITECTURE.md): a
# patch release would rebuild every artifact; the farm's own changes to what a kind makes bump its version (`version` of a stage kind).
LIBRARIES = ("torch", "transformers", "trl", "peft", "farm")


def library_versions() -> dict[str, str]:
    """{library: version} of LIBRARIES installed in this process (importlib.metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def version_drift(made: dict | None, now: dict[str, str]) -> list[str]:
    """A note ("transformers 4.57.1 (now 5.24.0)") for each library whose major.minor differs between
    the versions an artifact was made with (`made`, from its marker) and `now`. A patch release is
    taken to change no result; a minor one may (a new default, a changed kernel), so reuse says so."""

    def minor(v: str) -> list[str]:
        return v.split("+")[0].split(".")[:2]

    return [f"{name} {v} (now {now[name]})" for name, v in (made or {}).items() if name in now and minor(v) != minor(now[name])]


class Store:
    """Artifacts under `<root>/artifacts/<kind>-<key>/`, each with a completion marker.

    `root` is a local folder (or an NFS mount) or a URI that pyarrow understands (`s3://`, `gs://`,
    `file://`). Under a local folder an artifact is written under a temporary name and renamed
    into place. An object store has no rename: the files are uploaded first and the marker last,
    so the marker is what makes an artifact visible, and a folder without one is never read.
    Either way `path()` is a local folder: under a URI root, this node's copy of the artifact
    (`$FARM_CACHE/store/<hash of root>/`), downloaded on first use. That cache is bounded
    (`$FARM_CACHE_MAX_GB`, see `evict`): an artifact a live `Store` has handed out is in use and
    kept; keep the `Store` while reading the folder.

    Training stages keep checkpoints under `<root>/.checkpoints/<kind>/<key>/` until their artifact
    is published (`checkpoints`, farm.train.checkpoints)."""

    def __init__(self, root: str | os.PathLike):
        self.uri = str(root).rstrip("/") if is_uri(root) else None
        if self.uri:
            self.fs, self.base = FileSystem.from_uri(self.uri)
            self.root = self.uri
            self.id = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
            self.cache = cache_dir() / "store" / self.id
        else:
            self.root = Path(root).resolve()
            self.fs, self.base = LocalFileSystem(), str(self.root)
        self._pins: dict[str, int] = {}  # cached artifact -> fd of its shared lock, held while this Store lives
        self._s3 = None  # boto3 client for leases, made on first use (`_s3_client`)
        weakref.finalize(self, _unpin, self._pins)

    def __reduce__(self):  # another process gets a Store of the same root; the pins (open files) stay here
        return Store, (self.root,)

    def path(self, kind: str, key: str) -> Path:
        if not self.uri:
            return self.root / "artifacts" / f"{kind}-{key}"
        local = self.cache / f"{kind}-{key}"
        if local.exists() or self.done(kind, key):
            self._use(local)
            if not local.exists():  # not here yet, or evicted while we waited for the lock
                self._download(kind, key, local)
        return local

    def _use(self, local: Path) -> None:
        """Hold a shared lock on the artifact's `.used` file while this Store lives (eviction skips
        it), and stamp the use on that file's mtime (eviction takes the least recent first)."""
        if local.name not in self._pins:
            local.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(used_file(local), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while an eviction removes the folder
            self._pins[local.name] = fd
        _touch(used_file(local))

    def _download(self, kind: str, key: str, local: Path) -> None:
        remote = self._remote(kind, key)
        size = sum(f.size for f in self.fs.get_file_info(FileSelector(remote, recursive=True)) if f.type == FileType.File)
        self._make_room(size)  # first: the disk is finite
        # Download under a temporary name then rename: a reader beside us sees all or nothing.
        tmp = self.cache / f".tmp-{local.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)  # copy_files makes only the subfolders
        try:
            copy_files(remote, str(tmp), source_filesystem=self.fs, destination_filesystem=LocalFileSystem())
            move(tmp, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def checkpoints(self, kind: str, key: str) -> tuple[str, Path]:
        """A training stage's checkpoint area on `self.fs` (a stable path keyed by the stage, which a
        retry on any node finds), and the local folder its trainer saves into: the area itself under a
        local root; under a URI root a staging folder on this node, uploaded after each save."""
        area = f"{self.base}/{CHECKPOINTS}/{kind}/{key}"
        return area, Path(area) if not self.uri else cache_dir() / "checkpoints" / self.id / kind / key

    def marker(self, kind: str, key: str) -> dict | None:
        """The completed artifact's record, or None if it is absent or incomplete."""
        try:
            record = json.loads(self.read_text(f"artifacts/{kind}-{key}/{MARKER}"))  # from the root, not a local copy
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return record if record.get("key") == key else None

    def done(self, kind: str, key: str) -> bool:
        return self.marker(kind, key) is not None

    def lock(self, key: str):
        """Exclusive while held, across processes and nodes: a caller takes it, checks `done` again, and
        builds and publishes only if the artifact is still missing. A file lock on a local disk or an NFS
        mount (a `file://` URI is one too); on S3 a lease object, `<root>/locks/<key>.lease` (`S3Lease`).
        Another object store has no lock: trials on two nodes may then build the same stage at once, which
        costs time but is harmless (same key, same content): the first marker wins, the later writer skips
        its upload."""
        if not self.uri or isinstance(self.fs, LocalFileSystem):
            folder = self.root if not self.uri else Path(self.base)
            (folder / "locks").mkdir(parents=True, exist_ok=True)
            return FileLock(str(folder / "locks" / f"{key}.lock"))
        if self.fs.type_name == "s3":
            try:
                import boto3  # noqa: F401  (pyarrow cannot write conditionally; boto3 can)
            except ImportError:
                warnings.warn(
                    f"no lock on {self.uri} without boto3: trials on several nodes may each build a shared stage; pip install 'farm[s3]'",
                    stacklevel=2,
                )
                return contextlib.nullcontext()
            bucket, _, prefix = self.base.partition("/")
            return S3Lease(self._s3_client(), bucket, f"{prefix}/locks/{key}.lease".lstrip("/"))
        warnings.warn(
            f"no lock on a {self.fs.type_name} store: trials on several nodes may each build a shared stage; use an s3:// root or a shared mount",
            stacklevel=2,
        )
        return contextlib.nullcontext()

    def _s3_client(self):
        """A boto3 client reaching the store as pyarrow does: the URI's `endpoint_override`, `scheme` and
        `region` if given, else the environment (AWS_ENDPOINT_URL, AWS_REGION, credentials), which both
        read. One per Store: a client is slow to make and safe to share between threads."""
        if self._s3 is None:
            import boto3

            query = {k: v[0] for k, v in parse_qs(urlsplit(self.uri).query).items()}
            endpoint = query.get("endpoint_override")
            if endpoint and "://" not in endpoint:
                endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
            self._s3 = boto3.client("s3", endpoint_url=endpoint, region_name=query.get("region"))
        return self._s3

    @contextlib.contextmanager
    def writing(self, kind: str, key: str, record: dict):
        """Yield a temporary folder; on success mark it complete and move it into place.

        `record` is filled by the caller inside the block and written as the marker."""
        final = self.path(kind, key) if not self.uri else self.cache / f"{kind}-{key}"
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            marker = {**record, "versions": library_versions(), "key": key, "kind": kind}
            if self.uri:
                self._publish(tmp, kind, key, marker)
                return
            write_json(tmp / MARKER, marker)
            fsync_tree(tmp)
            if final.exists():  # an incomplete leftover, or a twin that finished first
                if self.done(kind, key):
                    shutil.rmtree(tmp)
                    return
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(final.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, tmp: Path, kind: str, key: str, marker: dict) -> None:
        """Upload the files, then the marker; keep the folder as this node's copy."""
        if self.done(kind, key):  # a twin finished first: its artifact stands
            return
        # Files left by a writer that died before its marker are overwritten, never trusted.
        self.fs.create_dir(self._remote(kind, key))  # copy_files makes only the subfolders
        copy_files(str(tmp), self._remote(kind, key), source_filesystem=LocalFileSystem(), destination_filesystem=self.fs)
        write_json(tmp / MARKER, marker)
        self.write_text(f"artifacts/{kind}-{key}/{MARKER}", (tmp / MARKER).read_text())
        move(tmp, self.cache / f"{kind}-{key}")
        _touch(used_file(self.cache / f"{kind}-{key}"))  # a use, for eviction's order
        self._make_room(0)  # a node that only writes artifacts keeps its cache bounded too

    def _make_room(self, size: int) -> None:
        """Evict from this node's cache until `size` more bytes fit under its limit."""
        evict(self.cache.parent, cache_limit(self.cache.parent) - size)

    def location(self, kind: str, key: str) -> str:
        """Where the artifact lives: its URI under a URI root, else its folder; nothing is fetched."""
        return f"{self.uri}/artifacts/{kind}-{key}" if self.uri else str(self.root / "artifacts" / f"{kind}-{key}")

    def _remote(self, kind: str, key: str) -> str:
        return f"{self.base}/artifacts/{kind}-{key}"

    def read_text(self, rel: str) -> str:
        """A small file under the root (FileNotFoundError if absent)."""
        if not self.uri:
            return (self.root / rel).read_text()
        with self.fs.open_input_stream(f"{self.base}/{rel}") as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str) -> None:
        """Write a small file under the root (one put on an object store: whole or absent)."""
        if not self.uri:
            return atomic_write(self.root / rel, text.encode())
        self.fs.create_dir(f"{self.base}/{rel}".rsplit("/", 1)[0])
        with self.fs.open_output_stream(f"{self.base}/{rel}") as f:
            f.write(text.encode())


class S3Lease:
    """An exclusive lease, the object `s3://<bucket>/<key>`, for a build that trials on several nodes may
    start at once (a context manager; `Store.lock` makes one).

    Taken by creating the object with a conditional write (`If-None-Match: *`): of several writers exactly
    one succeeds. Its body names the holder and its expiry. While held, a heartbeat thread rewrites it
    (`If-Match` on the ETag it last wrote), so a build longer than the TTL keeps it; on exit it is deleted
    if still ours (`If-Match` again). A waiter polls. A lease whose ETag has not changed for its TTL, timed
    on the waiter's own clock (nodes' clocks may disagree; the body's expiry is for people reading it), is
    a dead holder's: the waiter overwrites it with `If-Match` on that ETag, so of several waiters, or a
    late renewal, one wins."""

    def __init__(self, client, bucket: str, key: str):
        self.client, self.bucket, self.key = client, bucket, key
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # which node to look at
        self.ttl = LEASE_TTL
        self.etag: str | None = None  # of the body we last wrote, while we hold the lease
        self._renewals = 0  # in the body, so each renewal changes the ETag
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self):
        seen = None  # (ETag, when we first saw it, body) of another holder's lease
        while not (etag := self._write(IfNoneMatch="*")):
            current = self._read()
            if current is None:
                continue  # released between our write and our read: try again at once
            if current[1]["owner"] == self.owner:  # our write went through, its reply was lost, the retry failed
                etag = current[0]
                break
            if seen is None or seen[0] != current[0]:
                seen = (current[0], time.monotonic(), current[1])
            elif time.monotonic() - seen[1] > seen[2]["ttl"] and (etag := self._write(IfMatch=seen[0])):
                warnings.warn(
                    f"took over the lease s3://{self.bucket}/{self.key} of {seen[2]['owner']}, unrenewed for {seen[2]['ttl']:g} s", stacklevel=2
                )
                break
            time.sleep(LEASE_POLL)
        self.etag = etag
        self._beat = threading.Thread(target=self._renew, name=f"lease-{self.key}", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._stop.set()
        self._beat.join()  # no renewal in flight while we delete
        if self.etag is None:  # lost while held (see _renew): the lease is another holder's now
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except (BotoCoreError, ClientError) as e:  # not raised: it would hide the build's own error
            if not isinstance(e, ClientError) or e.response["Error"]["Code"] not in LOST:
                warnings.warn(
                    f"could not release the lease s3://{self.bucket}/{self.key} ({e}); waiters take it over {self.ttl:g} s after its last renewal",
                    stacklevel=2,
                )

    def _renew(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(self.ttl / 4):
            try:
                etag = self._write(IfMatch=self.etag)
                if etag is None:  # still ours after a 409 (a write raced ours) or a retry of a renewal that went through
                    current = self._read()
                    etag = current[0] if current and current[1]["owner"] == self.owner else None
            except (BotoCoreError, ClientError) as e:  # a blip: the next beat tries again before the TTL is out
                warnings.warn(f"could not renew the lease s3://{self.bucket}/{self.key}: {e}")
                continue
            if etag is None:  # unrenewed for a TTL and taken over: the build goes on, its twin's marker may win
                warnings.warn(f"lost the lease s3://{self.bucket}/{self.key} to another node: it may build the same stage")
                self.etag = None
                return
            self.etag = etag

    def _write(self, **condition) -> str | None:
        """Put our lease under `condition`: its ETag, or None if the condition did not hold."""
        from botocore.exceptions import ClientError

        self._renewals += 1
        body = {"owner": self.owner, "ttl": self.ttl, "expires": time.time() + self.ttl, "renewals": self._renewals}
        try:
            return self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=json.dumps(body).encode(), ContentType="application/json", **condition
            )["ETag"]
        except ClientError as e:
            if e.response["Error"]["Code"] in LOST:
                return None
            raise

    def _read(self) -> tuple[str, dict] | None:
        """The current lease's ETag and body, or None if there is none."""
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return got["ETag"], json.loads(got["Body"].read())


def cache_limit(root: Path) -> int:
    """Bytes a node's cache of downloaded artifacts may hold: $FARM_CACHE_MAX_GB, else half of the disk
    it is on (the rest is for checkpoints staged for upload, Ray's object spilling and logs)."""
    value = os.environ.get(CACHE_MAX_GB)
    if value:
        try:
            return int(float(value) * 1e9)
        except ValueError:
            raise ValueError(f"{CACHE_MAX_GB}={value!r} is not a number of GB") from None
    root.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(root).total // 2


def evict(root: Path, budget: int) -> None:
    """Delete the least recently used complete artifacts of a node's cache (`root`: every store's
    copies) until the rest take at most `budget` bytes. An artifact in use (a live `Store` holds a
    shared lock on its `.used` file) is kept; one being downloaded or written is a `.tmp-` folder,
    never a candidate. One eviction at a time per node, so two do not both delete for the same room."""
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".evict.lock")):
        cached = sorted(_cached(root))  # (last use, size, folder), least recent first
        total = sum(size for _, size, _ in cached)
        for _, size, folder in cached:
            if total <= budget:
                break
            if _remove_unused(folder):
                total -= size


def _cached(root: Path):
    for folder in root.glob("*/*"):
        if folder.is_dir() and not folder.name.startswith(".") and (folder / MARKER).exists():
            stamp = used_file(folder)
            last = (stamp if stamp.exists() else folder).stat().st_mtime_ns
            yield last, sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()), folder


def _remove_unused(folder: Path) -> bool:
    """Delete a cached artifact unless a Store uses it (its shared lock makes ours fail at once)."""
    fd = os.open(used_file(folder), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:  # renamed away under the lock: a reader waiting for it then finds it absent and downloads it
        gone = folder.with_name(f".tmp-evicted-{folder.name}-{uuid.uuid4().hex[:8]}")
        os.rename(folder, gone)
    finally:
        os.close(fd)  # releases the lock; the .used file stays (deleting a lock file races its waiters)
    shutil.rmtree(gone, ignore_errors=True)
    return True


def used_file(folder: Path) -> Path:
    return folder.with_name(folder.name + USED)


def _touch(path: Path) -> None:
    now = time.time_ns()  # explicit: some filesystems' own clock for mtimes is coarser than ours
    path.touch()
    os.utime(path, ns=(now, now))


def _unpin(pins: dict) -> None:
    for fd in pins.values():
        os.close(fd)
    pins.clear()
