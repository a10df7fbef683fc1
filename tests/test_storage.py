"""The store on a URI root: the object-store code path (upload, marker last, a local cache per
node) run on pyarrow's local filesystem through `file://`, on its in-memory `mock://` one, and on S3
(a local moto server, `tests/s3.py`), where `Store.lock` is a lease object."""

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
from filelock import FileLock
from s3 import moto_server

from farm import store as farm_store
from farm.files import join
from farm.store import MARKER, Store

pytestmark = pytest.mark.timeout(60)  # a lease that is never granted hangs a test rather than failing it


@pytest.fixture
def node_cache(tmp_path, monkeypatch):
    """Point this "node"'s local cache ($FARM_CACHE) at a fresh folder; returns a switcher."""

    def use(name: str):
        monkeypatch.setenv("FARM_CACHE", str(tmp_path / name))
        return tmp_path / name

    use("node-a")
    return use


def files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def write_artifact(store, kind="sft", key="k1", weights=b"full", twin=False):
    record = {"stage": kind}
    with store.writing(kind, key, record) as out:
        (out / "weights.bin").write_bytes(weights)
        (out / "tokenizer").mkdir()
        (out / "tokenizer" / "vocab.json").write_text("{}")
        assert store.done(kind, key) == twin  # invisible until the block ends (unless a twin finished)
        record["metrics"] = {"train_loss": 1.0}


def test_uri_store_publishes_complete_artifacts_and_other_nodes_read_them(tmp_path, node_cache):
    shared = tmp_path / "shared"
    root = shared.as_uri()  # file:///...: the object-store path without a cloud
    store = Store(root)
    with pytest.raises(RuntimeError):
        with store.writing("sft", "k1", {}) as out:
            (out / "weights.bin").write_bytes(b"half")
            raise RuntimeError("killed while writing")
    assert not store.done("sft", "k1") and not store.path("sft", "k1").exists()
    assert not list((tmp_path / "node-a").rglob("weights.bin"))  # no temporary leftovers

    write_artifact(store)
    assert store.done("sft", "k1") and store.marker("sft", "k1")["metrics"] == {"train_loss": 1.0}
    remote = shared / "artifacts" / "sft-k1"
    assert json.loads((remote / MARKER).read_text())["key"] == "k1"
    local = store.path("sft", "k1")
    assert local.is_relative_to(tmp_path / "node-a") and files(local) == files(remote) != {}

    node_cache("node-b")  # another node: same shared root, its own empty cache
    other = Store(root)
    assert other.done("sft", "k1") and other.marker("sft", "k1") == store.marker("sft", "k1")
    copy = other.path("sft", "k1")
    assert copy.is_relative_to(tmp_path / "node-b") and files(copy) == files(remote)
    assert sorted(p.name for p in copy.parent.iterdir()) == ["sft-k1", "sft-k1.used"]  # renamed into place, its use stamped
    assert other.path("sft", "k1") == copy  # downloaded once, then read locally


def test_a_crash_between_upload_and_marker_leaves_nothing_trusted(tmp_path, node_cache, monkeypatch):
    root = (tmp_path / "shared").as_uri()
    store = Store(root)

    def crash(rel, text):
        raise OSError("node lost before the marker was written")

    monkeypatch.setattr(store, "write_text", crash)
    with pytest.raises(OSError):
        write_artifact(store, weights=b"first")
    assert (tmp_path / "shared" / "artifacts" / "sft-k1" / "weights.bin").exists()  # uploaded...
    assert not store.done("sft", "k1")  # ...but not complete
    node_cache("node-b")
    other = Store(root)
    assert not other.done("sft", "k1") and not other.path("sft", "k1").exists()  # nothing downloaded

    write_artifact(other, weights=b"second")  # the retry overwrites the leftovers and completes
    assert other.done("sft", "k1") and files(other.path("sft", "k1"))["weights.bin"] == b"second"


def test_a_flat_artifact_uploads(tmp_path, node_cache):
    store = Store((tmp_path / "shared").as_uri())
    with store.writing("eval", "e1", {"metrics": {}}) as out:  # no subfolder to create its folder
        (out / "answers.json").write_text("[]")
    node_cache("node-b")
    assert (Store(store.root).path("eval", "e1") / "answers.json").read_text() == "[]"


def test_a_twin_that_finishes_second_skips_its_upload(tmp_path, node_cache):
    root = (tmp_path / "shared").as_uri()
    write_artifact(Store(root), weights=b"first")
    node_cache("node-b")
    write_artifact(Store(root), weights=b"second", twin=True)
    assert (tmp_path / "shared" / "artifacts" / "sft-k1" / "weights.bin").read_bytes() == b"first"
    assert files(Store(root).path("sft", "k1"))["weights.bin"] == b"first"


def test_mock_filesystem_round_trip(node_cache):
    # pyarrow's in-memory filesystem: nothing of the root may be read as a local path.
    store = Store("mock:///bucket/prefix")
    assert not store.done("sft", "k1")
    write_artifact(store)
    assert store.done("sft", "k1")
    shutil.rmtree(store.path("sft", "k1"))  # drop the writer's local copy: path() downloads it again
    assert files(store.path("sft", "k1")) == {"weights.bin": b"full", "tokenizer/vocab.json": b"{}"}
    store.write_text("faults/k1-t1", "2")
    assert store.read_text("faults/k1-t1") == "2"
    with pytest.raises(FileNotFoundError):
        store.read_text("faults/absent")


def test_locks_where_the_filesystem_has_them(tmp_path):
    assert isinstance(Store(tmp_path).lock("k"), FileLock)
    assert isinstance(Store((tmp_path / "nfs").as_uri()).lock("k"), FileLock)  # a mount: locks work
    assert (tmp_path / "nfs" / "locks").is_dir()
    with pytest.warns(UserWarning, match="no lock on a mock store: trials on several nodes may each build a shared stage; use an s3:// root"):
        assert isinstance(Store("mock:///bucket").lock("k"), contextlib.nullcontext)  # an object store without leases


def test_storage_uris_are_kept_as_given(tmp_path):
    from farm.cli import _storage

    assert _storage(argparse.Namespace(storage="s3://bucket/prefix/", results="r")) == "s3://bucket/prefix"
    assert _storage(argparse.Namespace(storage=None, results=str(tmp_path))) == str(tmp_path / ".store")
    assert join("s3://bucket/prefix", "tune") == "s3://bucket/prefix/tune"
    assert join(str(tmp_path), "tune") == str(tmp_path / "tune")


def test_local_root_files_round_trip(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(FileNotFoundError):
        store.read_text("faults/k-t")
    store.write_text("faults/k-t", "1")
    assert store.read_text("faults/k-t") == "1" and (tmp_path / "faults" / "k-t").read_text() == "1"


# The node's cache of downloaded artifacts is bounded ($FARM_CACHE_MAX_GB): least recently used first,
# never one that a live Store handed out.


def cached(node: "Path") -> list[str]:
    return sorted(p.name for p in node.glob("store/*/*") if p.is_dir() and not p.name.startswith("."))


def publish(root: str, keys, size: int) -> None:
    """Write artifacts of about `size` bytes each from a node of their own, then forget that node's copies."""
    for key in keys:
        write_artifact(Store(root), key=key, weights=b"w" * size)


def test_the_node_cache_evicts_the_least_recently_used_artifact(tmp_path, node_cache, monkeypatch):
    root = (tmp_path / "shared").as_uri()
    node_cache("writer")
    publish(root, ["a", "b", "c"], size=1000)
    node = node_cache("node")
    monkeypatch.setenv("FARM_CACHE_MAX_GB", str(2500 / 1e9))  # room for two of them
    for key in ["a", "b", "a"]:  # a used last
        Store(root).path("sft", key)  # each Store is gone at once: nothing stays in use
    assert cached(node) == ["sft-a", "sft-b"]
    Store(root).path("sft", "c")
    assert cached(node) == ["sft-a", "sft-c"]  # b was the least recently used

    leftover = node / "store" / Store(root).id / ".tmp-sft-d-1234"  # a download in progress (or cut short)
    leftover.mkdir()
    (leftover / "weights.bin").write_bytes(b"w" * 5000)
    monkeypatch.setenv("FARM_CACHE_MAX_GB", "0")
    Store(root).path("sft", "b")  # more than the limit: it is still downloaded, the others go
    assert cached(node) == ["sft-b"] and (leftover / "weights.bin").exists()


def test_an_artifact_in_use_is_not_evicted(tmp_path, node_cache, monkeypatch):
    root = (tmp_path / "shared").as_uri()
    node_cache("writer")
    publish(root, ["a", "b"], size=1000)
    node = node_cache("node")
    monkeypatch.setenv("FARM_CACHE_MAX_GB", str(1500 / 1e9))  # room for one
    reader = Store(root)
    model = reader.path("sft", "a")  # a stage reading it: the Store lives while it reads
    Store(root).path("sft", "b")
    assert cached(node) == ["sft-a", "sft-b"] and (model / "weights.bin").exists()  # over the limit, a kept
    del reader  # done with it
    Store(root).path("sft", "b")  # a use that downloads nothing evicts nothing
    assert cached(node) == ["sft-a", "sft-b"]
    node_cache("writer")
    publish(root, ["c"], size=1000)
    node_cache("node")
    Store(root).path("sft", "c")
    assert cached(node) == ["sft-c"]  # a and b are free to go now


def test_a_node_that_only_writes_keeps_its_cache_bounded(tmp_path, node_cache, monkeypatch):
    node = node_cache("node")
    monkeypatch.setenv("FARM_CACHE_MAX_GB", str(2500 / 1e9))
    publish((tmp_path / "shared").as_uri(), ["a", "b", "c"], size=1000)  # the writer keeps its copies...
    assert cached(node) == ["sft-b", "sft-c"]  # ...within the limit


def test_the_cache_limit(tmp_path, monkeypatch):
    from farm.store import cache_limit

    monkeypatch.setenv("FARM_CACHE_MAX_GB", "2.5")
    assert cache_limit(tmp_path) == 2_500_000_000
    monkeypatch.delenv("FARM_CACHE_MAX_GB")
    assert cache_limit(tmp_path) == shutil.disk_usage(tmp_path).total // 2
    monkeypatch.setenv("FARM_CACHE_MAX_GB", "lots")
    with pytest.raises(ValueError, match="FARM_CACHE_MAX_GB='lots' is not a number of GB"):
        cache_limit(tmp_path)


# On S3 `Store.lock` is a lease object, `<root>/locks/<key>.lease`, taken and kept by conditional writes.


@pytest.fixture
def s3(node_cache, monkeypatch):
    """A fresh local S3 store root reachable from this process; leases expire after 1 s, not minutes."""
    with moto_server() as (root, env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(farm_store, "LEASE_TTL", 1.0)
        monkeypatch.setattr(farm_store, "LEASE_POLL", 0.05)
        yield root


def objects(root: str, under: str) -> dict[str, bytes]:
    """The objects under `<root>/<under>/` as S3 itself lists them (boto3, not pyarrow)."""
    bucket, _, prefix = root.removeprefix("s3://").partition("/")
    client = boto3.client("s3")
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{under}/").get("Contents", [])
    return {o["Key"].removeprefix(f"{prefix}/{under}/"): client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def test_s3_store_round_trip_through_pyarrow(s3, node_cache):
    store = Store(s3)
    assert not store.done("sft", "k1") and store.fs.type_name == "s3"
    write_artifact(store)
    uploaded = objects(s3, "artifacts/sft-k1")
    assert uploaded["weights.bin"] == b"full" and json.loads(uploaded[MARKER])["metrics"] == {"train_loss": 1.0}
    node_cache("node-b")
    copy = Store(s3).path("sft", "k1")  # downloaded from S3 into node b's cache
    assert copy.is_relative_to(node_cache("node-b")) and files(copy) == {"weights.bin": b"full", "tokenizer/vocab.json": b"{}"}
    store.write_text("faults/k1-t1", "2")
    assert store.read_text("faults/k1-t1") == "2"
    with pytest.raises(FileNotFoundError):
        store.read_text("faults/absent")


def build_once(store, key, builds, log, name, seconds=0.0):
    """What farm.tune does with a shared stage: check, lock, check again, build and publish."""
    if not store.done("sft", key):
        with store.lock(key):
            log.append(("in", name, time.monotonic()))
            if not store.done("sft", key):
                builds.append(name)
                time.sleep(seconds)  # the build: the other trial waits on the lease meanwhile
                write_artifact(store, key=key, weights=name.encode())
            log.append(("out", name, time.monotonic()))
    return files(store.path("sft", key))["weights.bin"]


def in_threads(*calls) -> list:
    results, errors = [None] * len(calls), []

    def run(i, call):
        try:
            results[i] = call()
        except BaseException as e:  # noqa: BLE001  (re-raised below, in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def assert_one_holder_at_a_time(log) -> None:
    held = [(e[0], e[1]) for e in sorted(log, key=lambda e: e[2])]
    assert held == [("in", held[0][1]), ("out", held[0][1]), ("in", held[2][1]), ("out", held[2][1])], held


def test_two_nodes_racing_for_a_stage_on_s3_build_it_once(s3):
    builds, log, start = [], [], threading.Barrier(2)

    def node(name):
        store = Store(s3)  # each with its own S3 clients, as on two machines
        start.wait()
        return build_once(store, "shared", builds, log, name, seconds=0.5)

    first, second = in_threads(lambda: node("a"), lambda: node("b"))
    assert len(builds) == 1 and first == second == builds[0].encode()  # built once; both read that artifact
    assert_one_holder_at_a_time(log)  # the other waited on the lease, then found the artifact published
    assert objects(s3, "locks") == {}  # released


HOLD = """
import sys, time
from farm import store as farm_store
farm_store.LEASE_TTL = 1.0
lease = farm_store.Store(sys.argv[1]).lock("shared")
lease.__enter__()
print(lease.owner, flush=True)
time.sleep(600)  # killed meanwhile: never released
"""


def test_a_dead_holders_lease_is_taken_over_once_it_expires(s3):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, s3], stdout=subprocess.PIPE, text=True)  # env: the moto server's
    try:
        owner = holder.stdout.readline().strip()
        assert owner and json.loads(objects(s3, "locks")["shared.lease"])["owner"] == owner
    finally:
        holder.send_signal(signal.SIGKILL)  # a crashed node: no release, no heartbeat
        holder.wait()
    builds, log, died = [], [], time.monotonic()
    with pytest.warns(UserWarning, match=f"took over the lease s3://.*/locks/shared.lease of {owner}, unrenewed for 1 s"):
        results = in_threads(*(lambda n=n: build_once(Store(s3), "shared", builds, log, n) for n in "ab"))
    assert len(builds) == 1 and results == [builds[0].encode()] * 2
    assert_one_holder_at_a_time(log)  # of the two waiters, one took the lease over
    assert min(t for _, _, t in log) - died >= 1.0  # not before the dead holder's lease expired
    assert objects(s3, "locks") == {}


def test_a_lease_is_renewed_while_a_build_outlasts_its_ttl(s3):
    store, waiter = Store(s3), Store(s3)
    log, renewals, held = [], [], threading.Event()

    def long_build():
        with store.lock("shared"):
            held.set()
            for _ in range(6):  # 3 s: three times the lease's TTL
                renewals.append(json.loads(objects(s3, "locks")["shared.lease"])["renewals"])
                time.sleep(0.5)
            log.append(("out", "holder", time.monotonic()))

    def wait():
        held.wait()
        with waiter.lock("shared"):
            log.append(("in", "waiter", time.monotonic()))

    in_threads(long_build, wait)
    assert [e[1] for e in sorted(log, key=lambda e: e[2])] == ["holder", "waiter"]  # it never expired under the build
    assert renewals == sorted(renewals) and renewals[-1] - renewals[0] >= 5  # every TTL / 4: about ten in those 2.5 s


def test_an_endpoint_in_the_uri_reaches_the_leases_too(s3, monkeypatch):
    endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the URI names the server now, as pyarrow allows
    store = Store(f"{s3}?endpoint_override={endpoint}&scheme=http")
    with store.lock("k"):
        store.write_text("faults/k-t1", "1")  # pyarrow through the same URI
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{endpoint}")  # for `objects`
        assert set(objects(s3, "locks")) == {"k.lease"} and objects(s3, "faults")["k-t1"] == b"1"
    assert objects(s3, "locks") == {}


def test_without_boto3_an_s3_store_warns_that_builds_may_repeat(s3, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 now fails
    with pytest.warns(
        UserWarning, match=r"no lock on s3://.* without boto3: trials on several nodes may each build a shared stage; pip install 'farm\[s3\]'"
    ):
        assert isinstance(Store(s3).lock("k"), contextlib.nullcontext)


def test_a_lease_whose_reply_was_lost_is_still_ours(s3):
    """botocore retries a request whose reply never came; if the first try went through, the retried
    conditional write fails on our own lease, which we hold nonetheless (without waiting out its TTL)."""
    lease = Store(s3).lock("k")
    put = lease.client.put_object

    def retried(**request):
        put(**request)  # applied on the server, the reply lost on the way back
        return put(**request)  # the retry: its condition no longer holds

    lease.client.put_object = retried
    started = time.monotonic()
    with lease:
        assert time.monotonic() - started < farm_store.LEASE_TTL
        time.sleep(0.6)  # two heartbeats, each failing its If-Match on the renewal that went through
        assert json.loads(objects(s3, "locks")["k.lease"])["owner"] == lease.owner and lease.etag
    assert objects(s3, "locks") == {}  # released: the ETag we kept is the lease's
