"""Two Ray nodes on loopback sharing one store through a URI: a head (`node_a`) and a second
node (`node_b`) with one CPU each, each with its own local cache ($FARM_CACHE), and a folder
reached as `file://` standing in for an object store. A trial on one node reads the stages
another node trained, the shared stage is trained once, and a rerun trains nothing."""

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import RAY, free_port, TINY, farm, metrics_table
from farm.cache import MARKER
from farm.spec import load_study

pytestmark = pytest.mark.slow


def start_node(name: str, temp_dir: str, cache: Path, log: Path, *args) -> subprocess.Popen:
    """`ray start --block` for one node: stopping that process stops this node only (`ray stop`
    would stop every Ray on the machine). Its workers inherit its $FARM_CACHE."""
    cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", f'--resources={{"{name}": 1}}',
           f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", *args]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "FARM_CACHE": str(cache)},
                            start_new_session=True)
    deadline = time.time() + 120
    while "Ray runtime started" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.5)
    return proc


@pytest.fixture
def two_nodes(tmp_path):
    """(GCS address, {node resource: local cache folder})."""
    gcs = f"127.0.0.1:{free_port()}"
    # Ray's socket paths must stay short: a temp dir under /tmp, shared by both nodes as on one host.
    temp_dir = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")
    caches = {"node_a": tmp_path / "cache-a", "node_b": tmp_path / "cache-b"}
    procs = []
    try:
        procs.append(start_node("node_a", temp_dir, caches["node_a"], tmp_path / "head.log", "--head", f"--port={gcs.split(':')[1]}",
                                "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"))
        procs.append(start_node("node_b", temp_dir, caches["node_b"], tmp_path / "node-b.log", f"--address={gcs}"))
        deadline = time.time() + 60
        while len([n for n in _nodes(gcs) if n.state == "ALIVE"]) < 2:
            assert time.time() < deadline, "the second node did not join"
            time.sleep(1)
        yield gcs, caches
    finally:
        for proc in reversed(procs):
            proc.terminate()  # the node shuts down its raylet, workers (and on the head, the GCS)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def _nodes(gcs):
    from ray.util.state import list_nodes

    try:
        return list_nodes(address=gcs, detail=True)
    except Exception:  # noqa: BLE001 - the dashboard is still starting
        return []


def timeline(gcs, ids) -> list:
    """(start, node, task) of the farm's tasks and Ray Train's training functions, for the log."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=gcs, detail=True, limit=10000, raise_on_missing_output=False)
    shown = [t for t in tasks if t.start_time_ms and t.name.split(".")[-1] in {"evaluate_task", "build_task", "label_task", "run_train_fn"}]
    start = min((t.start_time_ms for t in shown), default=0)
    return sorted(((t.start_time_ms - start) / 1000, ids.get(t.node_id, t.node_id), t.name) for t in shown)


def cached(cache: Path) -> set[str]:
    """The artifacts a node wrote or read: its local copies under $FARM_CACHE/store/<root>/."""
    return {p.name.split("-")[0] for p in cache.glob("store/*/*") if not p.name.startswith(".")}


def test_two_nodes_share_stages_through_a_uri_store(two_nodes, tmp_path, monkeypatch):
    from ray.util.state import list_actors

    gcs, caches = two_nodes
    shared = tmp_path / "shared"
    storage = shared.as_uri()  # file:///...: the object-store code path (upload, marker last)
    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache-driver"))
    trials = load_study(TINY)

    out = farm("run", TINY, "--address", gcs, "--results", tmp_path / "r1", "--storage", storage).stdout
    table = metrics_table(tmp_path / "r1")
    assert len(table) == len(trials) and (table["status"] == "ok").all(), out

    # One artifact per key, each complete; the shared pretrain stage was trained by one fit.
    artifacts = sorted(p.name for p in (shared / "artifacts").iterdir())
    assert all((shared / "artifacts" / a / MARKER).exists() for a in artifacts)
    assert sorted(a.split("-")[0] for a in artifacts) == ["dpo", "dpo", "eval", "eval", "pretrain", "sft", "sft"]
    fits = sorted(p.name for p in (shared / "ray_train").iterdir() if p.is_dir())
    assert len([f for f in fits if "-pretrain-" in f]) == 1, fits
    assert (shared / "tune").is_dir()  # Tune's state went through the URI too

    # Both nodes ran training workers, and each read the one pretrain artifact through the store.
    ids = {n.node_id: next(r for r in caches if r in n.resources_total) for n in _nodes(gcs)}
    workers = list_actors(address=gcs, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
    ran = sorted(ids[w.node_id] for w in workers)
    print("training workers per node:", ran, "\nartifacts per node cache:", {r: sorted(cached(c)) for r, c in caches.items()})
    print("\n".join(f"  {t:6.1f}s {node}: {name}" for t, node, name in timeline(gcs, ids)))
    assert set(ran) == {"node_a", "node_b"}
    assert all("pretrain" in cached(c) and "dpo" in cached(c) for c in caches.values())
    assert not cached(tmp_path / "cache-driver")  # the driver reads markers only

    # A rerun with the same store (fresh results): every stage and eval is reused, nothing trains.
    markers = {a: (shared / "artifacts" / a / MARKER).stat().st_mtime for a in artifacts}
    out = farm("run", TINY, "--address", gcs, "--results", tmp_path / "r2", "--storage", storage).stdout
    assert " step " not in out and sorted(p.name for p in (shared / "ray_train").iterdir() if p.is_dir()) == fits
    assert {a: (shared / "artifacts" / a / MARKER).stat().st_mtime for a in artifacts} == markers
    assert metrics_table(tmp_path / "r2").equals(table)
