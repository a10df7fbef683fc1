"""Stage keys and the artifact store.

A stage's key hashes its resolved config, its input stage's key and a code version, so two
trials that would run the same stage share one artifact, and a rerun skips finished work.
An artifact is written under a temporary name, marked complete, fsynced and renamed: a
half-written one is never visible under its final name. On an object store (a `s3://` root) the
marker is uploaded last instead, and only an artifact with its marker is read (see `Store`).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from filelock import FileLock
from pyarrow.fs import FileSelector, FileSystem, FileType, LocalFileSystem, copy_files

# Bump a kind's version when its code changes what it produces: old artifacts stop matching. The bundled
# assets (farm/assets: data samples, tokenizers, constitutions, benchmark copies) count as that code: they
# change only with the farm, in the same commits, so a change to what one holds bumps the versions of the
# kinds that read it. They are not hashed into keys as a user's own files are (`content`): which stage
# reads which asset is the code's knowledge, and a hash of the whole folder would rebuild every stage of
# every study whenever any asset changed.
VERSIONS = {
    "pretrain": 1,
    "sft": 1,
    "dpo": 1,
    "kto": 1,
    "reward": 1,
    "pro": 1,
    "rank": 1,
    "rl": 1,
    "critique_revision": 2,
    "ai_feedback": 1,
    "eval": 3,
    "label": 1,
}
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
DIGESTS = "digests.json"  # under cache_dir(): {absolute path: [size, mtime_ns, ctime_ns, inode, sha256]}
# A file changed this shortly before it was read may change again within the same timestamp tick (many
# filesystems keep coarser times than ns) with its size: its digest is not cached, the next plan reads it.
RACY_NS = 2 * 10**9
_digests: dict[str, dict] = {}  # {cache file: its entries}, loaded once per process


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlannedStage:
    name: str
    kind: str
    key: str
    input_key: str | None  # None: the stage starts from the study's base model
    input_kind: str | None
    seed: int
    users: tuple[str, ...] = ()  # ids of the trials of the study that need this artifact
    refs: tuple[tuple[str, str, str], ...] = ()  # (name, kind, key) of the other stages it reads
    label: str | None = None  # the labelling run whose scores its data reads
    doc: dict = field(default_factory=dict, compare=False, repr=False)  # what `key` hashes (farm plan --why)


@dataclass(frozen=True)
class TrialPlan:
    stages: tuple[PlannedStage, ...]
    eval_key: str
    labels: tuple[PlannedStage, ...] = ()  # labelling runs the stages' and the eval's data need first
    evaluated: str | None = None  # the stage whose model is evaluated; None: the base model
    eval_refs: tuple[tuple[str, str, str], ...] = ()  # stages the eval reads (a judge reward model)
    eval_label: str | None = None  # the labelling run whose scores the eval reads
    eval_doc: dict = field(default_factory=dict, compare=False, repr=False)  # what `eval_key` hashes

    def stage(self, name: str | None) -> PlannedStage | None:
        return next((s for s in self.stages if s.name == name), None)


def label_doc(data) -> dict:
    """What the labelling stage's key hashes: which rows (the sources, local files by content) and
    which scorers; not how the pipeline is sized (batch size, actors), which changes no score."""
    files = {f: d for f, d in content(data).items() if f.startswith(("sources.", "labels."))}
    return {
        "kind": "label",
        "version": VERSIONS["label"],
        "sources": [s.model_dump(mode="json") for s in data.sources],
        "labels": [lab.model_dump(mode="json", include={"scorer", "model", "prefix"}) for lab in data.labels],
        **({"files": files} if files else {}),
    }


def plan_trial(study) -> TrialPlan:
    """Each stage keyed by its config, its data, its seed and the keys of every stage it reads:
    the model it starts from and the stages its fields name (a judge, a generator, built records).
    Every local file or folder enters by content (`content`), hashed here, on the driver: a worker
    takes the keys from the plan and hashes nothing."""
    from farm.spec import input_stage

    content(study)  # any local input that cannot be read: an error naming its field in the study file
    model_files = content(study.model, "model.")
    base = {"model": study.model.model_dump(mode="json"), **({"files": model_files} if model_files else {})}
    planned: dict[str, PlannedStage] = {}
    labels: dict[str, dict] = {}  # {key: doc} of the labelling runs the trial's data needs
    for name, stage in study.stages.items():
        seed = study.seed if stage.seed is None else stage.seed
        start = planned.get(input_stage(study.stages, name))
        refs = _refs(stage.refs(), planned)
        data = stage.data or study.data
        doc = {
            "kind": stage.kind,
            "version": VERSIONS[stage.kind],
            "config": stage.model_dump(mode="json", exclude={"data", "seed", "fault", "input", "gradient_checkpointing", "checkpoint_every"}),
            "data": data_key(data),
            "seed": seed,
            "input": start.key if start else base,
            "refs": [key for _, _, key in refs],
            **stage.key_extra(),
        }
        if getattr(stage, "select", None):  # it scores its checkpoints on the study data's dev rows
            files = {f: d for f, d in content(study.data, "data.").items() if f.startswith("data.sources.")}
            doc["dev_rows"] = {**heldout_key(study.data), **({"files": files} if files else {})}
        label = _label(data, labels)
        planned[name] = PlannedStage(name, stage.kind, digest(doc), start and start.key, start and start.kind, seed, refs=refs, label=label, doc=doc)
    evaluated = planned.get(study.evaluated())
    reference = planned.get(input_stage(study.stages, evaluated.name)) if evaluated else None
    eval_refs = _refs(study.eval.refs(), planned)
    # The refusal phrases are read by the harmlessness metric alone: an eval without it keeps its key.
    unread = set() if "harmlessness" in study.eval.metrics else {"refusals"}
    files = {
        **content(study.eval, "eval."),
        **{f: d for f, d in content(study.data, "data.").items() if f.startswith(("data.sources.", "data.labels."))},
    }
    eval_doc = {
        "kind": "eval",
        "version": VERSIONS["eval"],
        "eval": study.eval.model_dump(mode="json", exclude={"resources"} | unread),  # where it runs changes nothing
        "data": heldout_key(study.data),
        # No stages: the base model itself, built (tiny-gpt2) with the trial seed.
        "model": evaluated.key if evaluated else {"base": base, "seed": study.seed},
        "reference": reference.key if reference else base,
        "refs": [key for _, _, key in eval_refs],
        **({"files": files} if files else {}),
    }
    eval_label = _label(study.data, labels)
    runs = tuple(PlannedStage("label", "label", key, None, None, 0, doc=doc) for key, doc in labels.items())
    return TrialPlan(tuple(planned.values()), digest(eval_doc), runs, evaluated and evaluated.name, eval_refs, eval_label, eval_doc)


def _label(data, labels: dict) -> str | None:
    """The key of the labelling run `data` needs (None: it has no labels), added to `labels`."""
    if not data.labels:
        return None
    doc = label_doc(data)
    labels.setdefault(digest(doc), doc)
    return digest(doc)


def _refs(fields: dict[str, str], planned: dict) -> tuple:
    """(name, kind, key) of the stages among `fields`' values (the others name hub models)."""
    names = dict.fromkeys(v for v in fields.values() if v in planned)
    return tuple((n, planned[n].kind, planned[n].key) for n in names)


def data_key(data) -> dict:
    """The data spec as it affects the training rows: a transform at rate 0 changes nothing, so it
    is left out (each kept transform keeps its position, which seeds its random draws); local files
    by content. Which held-out rows are dev rows changes no training row: `dev` reads as 0, as
    before dev rows existed, so giving a study dev rows retrains nothing (a stage that scores the
    dev rows keys them apart, `heldout_key`)."""
    doc = {**data.model_dump(mode="json"), "dev": 0.0}
    doc["transforms"] = [(i, t) for i, t in enumerate(doc["transforms"]) if t.get("rate", 1) != 0]
    kept = {f"transforms.{i}." for i, _ in doc["transforms"]}
    files = {f: d for f, d in content(data).items() if not f.startswith("transforms.") or f.startswith(tuple(kept))}
    if files:
        doc["files"] = files
    return doc


def heldout_key(data) -> dict:
    """The data spec as it decides the held-out rows and their dev share; transforms perturb
    training rows only."""
    return data.model_dump(
        mode="json", include={"sources", "holdout", "split_seed"} | ({"labels"} if data.labels else set()) | ({"dev"} if data.dev else set())
    )


def local_inputs(spec, where: str = "") -> dict[str, str]:
    """{field: value} of the fields of `spec` (a model of the study file) and of the models in it
    that name a local file or folder: the fields its class lists in `paths`, when the value looks
    like a path (./..., /..., ~...) or is an existing file (`mydata.jsonl`). A name the farm
    resolves otherwise (a stage, a hub id, a bundled constitution) is neither."""
    from pydantic import BaseModel

    from farm.spec import looks_like_path

    found = {}
    for name in type(spec).model_fields:  # (not pydantic's iteration: planning walks every trial's study a few times)
        value = getattr(spec, name)
        if isinstance(value, str):
            if name in spec.paths and (looks_like_path(value) or Path(value).expanduser().is_file()):
                found[f"{where}{name}"] = value
        elif isinstance(value, BaseModel):
            found.update(local_inputs(value, f"{where}{name}."))
        elif isinstance(value, (list, tuple, dict)):
            for i, item in value.items() if isinstance(value, dict) else enumerate(value):  # sources, stages
                if isinstance(item, BaseModel):
                    found.update(local_inputs(item, f"{where}{name}.{i}."))
    return found


def content(spec, where: str = "") -> dict[str, dict]:
    """{field: {"path": value, "sha256": digest}} of every local file or folder `spec` names
    (`local_inputs`); one that cannot be read is a StudyError naming the field."""
    from farm.spec import StudyError

    out = {}
    for name, value in local_inputs(spec, where).items():
        try:
            out[name] = {"path": value, "sha256": content_digest(value)}
        except OSError as e:
            raise StudyError(f"{name}: {value!r} cannot be read: {e.strerror or e}") from None
    return out


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


def plan_study(trials) -> dict[str, TrialPlan]:
    """Every trial's plan, each stage knowing which trials share it."""
    plans = {t.id: plan_trial(t.study) for t in trials}
    users = defaultdict(list)
    for tid, p in plans.items():
        for s in (*p.labels, *p.stages):
            users[s.key].append(tid)

    def shared(stages):
        return tuple(dataclasses.replace(s, users=tuple(users[s.key])) for s in stages)

    return {tid: dataclasses.replace(p, stages=shared(p.stages), labels=shared(p.labels)) for tid, p in plans.items()}


# The libraries whose versions each artifact's marker records. Not in the key (docs/ARCHITECTURE.md): a
# patch release would rebuild every artifact; the farm's own changes to what a kind makes bump VERSIONS.
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
            _move(tmp, local)
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
            _fsync_dir(final.parent)
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
        _move(tmp, self.cache / f"{kind}-{key}")
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


def is_uri(root) -> bool:
    """`s3://bucket/x`, `gs://...`, `file:///...`: a pyarrow filesystem URI rather than a local path."""
    return "://" in str(root)


def join(root: str, *parts: str) -> str:
    """A path under a storage root, local or URI (Path would turn `s3://b` into `s3:/b`)."""
    return "/".join([str(root).rstrip("/"), *parts]) if is_uri(root) else str(Path(root, *parts))


def cache_dir() -> Path:
    """This node's cache (downloaded artifacts, scorer models): $FARM_CACHE, else ~/.cache/farm."""
    return Path(os.environ.get("FARM_CACHE", Path.home() / ".cache" / "farm"))


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


def _move(tmp: Path, final: Path) -> None:
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
