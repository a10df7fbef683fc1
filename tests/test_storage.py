"""The store on a URI root: the object-store code path (upload, marker last, a local cache per
node) run on pyarrow's local filesystem through `file://`, and on its in-memory `mock://` one."""

import argparse
import contextlib
import json
import shutil

import pytest
from filelock import FileLock

from farm.cache import MARKER, Store, join


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
    assert isinstance(Store("mock:///bucket").lock("k"), contextlib.nullcontext)  # an object store: none


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
    from farm.cache import cache_limit

    monkeypatch.setenv("FARM_CACHE_MAX_GB", "2.5")
    assert cache_limit(tmp_path) == 2_500_000_000
    monkeypatch.delenv("FARM_CACHE_MAX_GB")
    assert cache_limit(tmp_path) == shutil.disk_usage(tmp_path).total // 2
    monkeypatch.setenv("FARM_CACHE_MAX_GB", "lots")
    with pytest.raises(ValueError, match="FARM_CACHE_MAX_GB='lots' is not a number of GB"):
        cache_limit(tmp_path)
