"""Preflight (farm/preflight.py): every hub repository a study reads is checked before Ray starts, online
against a stand-in of the hub's API and offline against a hub cache (lm-eval's task datasets: the cache of
`datasets`); an empty eval set is refused; the hub token reaches the Ray workers of a running cluster
through the job's runtime env, and no error names it."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray
from hub_mirror import put

from farm import hub, preflight
from farm.cli import main
from farm.data.sources import SourceSpec, hub_files
from farm.grid import expand
from farm.process import WORKER_ENV, start_ray

SECRET = "hf_FarmPreflightSecret0123456789"
GATED, PUBLIC, MISSPELT = (
    "meta-llama/Llama-2-7b-hf",
    "facebook/roberta-hate-speech-dynabench-r4-target",
    "OpenAssistent/reward-model-deberta-v3-large-v2",
)


class FakeHub(BaseHTTPRequestHandler):
    """The hub's API as huggingface_hub reads it (utils/_http.py hf_raise_for_status): auth-check and
    tree listings; a gated repository answers 401 without a token and 403 with one that has no
    access, both with X-Error-Code GatedRepo; an unknown one 401 RepoNotFound, as the hub does for
    an anonymous request."""

    repos = {("models", GATED): ["config.json", "model.safetensors"], ("models", PUBLIC): ["config.json", "vocab.json"]}
    gated = {("models", GATED)}
    authorizations: list = []

    def do_GET(self):
        m = re.fullmatch(r"/api/(models|datasets)/(.+?)/(auth-check|tree/[^/?]+)(/.*)?(\?.*)?", self.path)
        # A repository's info (the commit a revision is, which `farm.preflight.pin` asks first): served for a
        # gated repository too, as the hub does.
        info = re.fullmatch(r"/api/(models|datasets)/([^/?]+/[^/?]+|[^/?]+)(?:/revision/[^/?]+)?(?:\?.*)?", self.path)
        auth = self.headers.get("Authorization")
        self.authorizations.append(auth)
        key = (m or info).group(1, 2) if m or info else None
        if key not in self.repos:
            return self.answer(401, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if info:
            return self.answer(200, json.dumps({"id": key[1], "sha": "1" * 40}).encode(), {})
        if key in self.gated:
            message = "Access to model is restricted. You must have access to it and be authenticated to access it."
            return self.answer(403 if auth else 401, b"", {"X-Error-Code": "GatedRepo", "X-Error-Message": message})
        if m.group(3) == "auth-check":
            return self.answer(200, b"{}", {})
        files = [{"type": "file", "oid": "0" * 40, "size": 1, "path": p} for p in self.repos[key]]
        return self.answer(200, json.dumps(files).encode(), {})

    def answer(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def online_hub(monkeypatch, tmp_path):
    """HF_ENDPOINT at a FakeHub on a free local port, online, with no token anywhere."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    # huggingface_hub reads its settings into `constants` at import: set them there too.
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # a developer's login is not the test's
    FakeHub.authorizations = []
    yield url
    server.shutdown()


def online_study(tiny_doc, write_study):
    """The tiny study on a gated base model, scored by a public classifier, judged by a misspelt reward model."""
    tiny_doc["model"] = {"base": GATED}
    tiny_doc["eval"].update(
        metrics=["preference_accuracy", "generation", "reward_score"], reward_model=MISSPELT, generation={"scorer": "roberta_hate"}
    )
    return write_study(tiny_doc)


def run(path, tmp_path, *extra):
    start = time.time()
    code = main(["run", str(path), "--results", str(tmp_path / "results"), *extra])
    return code, time.time() - start


def test_online_a_misspelt_model_and_a_gated_one_are_named_before_ray(online_hub, tiny_doc, write_study, tmp_path, capsys):
    path = online_study(tiny_doc, write_study)
    code, seconds = run(path, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and seconds < 10, err
    assert not ray.is_initialized() and not (tmp_path / "results").exists()
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 2, err  # the public classifier passes
    assert any(
        f"model {GATED} is gated and no hub token is set" in p
        and "huggingface.co/meta-llama/Llama-2-7b-hf" in p
        and p.endswith("(needed by model.base)")
        for p in problems
    ), err
    assert any(f"model {MISSPELT} is not on the hub: check the spelling" in p and "eval.reward_model" in p for p in problems), err
    assert "--no-preflight skips the hub checks" in err


def test_online_a_token_without_access_is_told_apart_and_never_printed(online_hub, tiny_doc, write_study, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    code, _ = run(online_study(tiny_doc, write_study), tmp_path)
    out, err = capsys.readouterr()
    assert code == 2 and f"model {GATED} is gated and your token has no access yet: request it at" in err, err
    assert SECRET not in out + err
    assert f"Bearer {SECRET}" in FakeHub.authorizations  # the checks ran with the environment's token


def test_offline_a_repository_or_file_set_missing_from_the_hub_cache_is_named(tiny_doc, write_study, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    test_split = SourceSpec(name="hh_rlhf", origin="hub", subset="harmless-base", split="test")
    repo, revision, patterns = hub_files(test_split)
    put(cache, "dataset", repo, {p.replace("*", "0"): "{}\n" for p in patterns}, revision or "main")  # the test split only
    put(cache, "model", "owner/present", {"config.json": "{}"})
    tiny_doc["model"] = {"base": "owner/present"}
    tiny_doc["data"]["sources"] = [{"name": "hh_rlhf", "origin": "hub", "subset": "harmless-base", "split": "train"}]
    tiny_doc["eval"].update(
        data={"sources": [test_split.model_dump(exclude_defaults=True)]},
        metrics=["preference_accuracy", "reward_score"],
        reward_model="owner/missing",
    )
    code, seconds = run(write_study(tiny_doc), tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and seconds < 10 and not ray.is_initialized(), err
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 2, err  # the base model and the test split are in the cache
    assert any(
        "model owner/missing is not in the local hub cache" in p and "hf download owner/missing" in p and "eval.reward_model" in p for p in problems
    ), err
    assert any(f"dataset {repo}" in p and "has no file matching" in p and "data.sources.0 [hh_rlhf]" in p for p in problems), err

    # --no-preflight: past the hub checks (then stopped by a failing Ray start, to stay a unit test).
    monkeypatch.setattr("farm.run.start_ray", lambda *a: (_ for _ in ()).throw(RuntimeError("Ray would start here")))
    with pytest.raises(RuntimeError, match="Ray would start here"):
        run(write_study(tiny_doc), tmp_path, "--no-preflight")


def test_an_empty_eval_set_is_refused_naming_the_field(tiny_doc, write_study, tmp_path, capsys):
    tiny_doc["data"]["holdout"] = 0.0
    code, _ = run(write_study(tiny_doc), tmp_path, "--no-preflight")  # needs no hub: refused with the hub checks off too
    err = capsys.readouterr().err
    assert code == 2 and not ray.is_initialized()
    assert "data.holdout is 0.0, so the eval set is empty, and eval.metrics preference_accuracy, perplexity need eval rows" in err
    assert "give eval.data" in err
    # Separate eval data, or metrics that bring their own (safety_score), need no held-out rows.
    tiny_doc["eval"]["data"] = {"sources": [{"name": "hh_rlhf", "limit": 10}]}
    assert preflight.eval_problems(expand(tiny_doc, "s.yaml")) == []
    del tiny_doc["eval"]["data"]
    tiny_doc["eval"]["metrics"] = ["safety_score"]
    assert preflight.eval_problems(expand(tiny_doc, "s.yaml")) == []
    # A stage that trains on the held-out rows of a split that holds none out.
    tiny_doc["stages"]["sft"]["data"] = {"sources": [{"name": "hh_rlhf", "limit": 50}], "holdout": 0.0, "rows": "heldout"}
    assert preflight.eval_problems(expand(tiny_doc, "s.yaml"))[0].startswith("stages.sft.data.rows: heldout trains stage sft on the held-out rows")


def test_lm_eval_task_datasets_come_from_the_harness_configs(tiny_doc, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # online: checked on the hub (offline: the next test)
    tiny_doc["eval"]["metrics"] = ["benchmarks"]
    tiny_doc["eval"]["benchmarks"] = {"suite": "hub", "tasks": ["toxigen", "mmlu", "arc_challenge", "nosuchtask"]}
    repos, problems = preflight.needs(expand(tiny_doc, "s.yaml"))
    datasets = {r.repo_id: fields for r, fields in repos.items() if r.repo_type == "dataset"}
    assert datasets == {
        "skg/toxigen-data": ["eval.benchmarks.tasks [toxigen]"],
        "cais/mmlu": ["eval.benchmarks.tasks [mmlu]"],
        "allenai/ai2_arc": ["eval.benchmarks.tasks [arc_challenge]"],
    }  # mmlu: a group of 57 subject tasks
    assert len(problems) == 1 and "has no task 'nosuchtask'" in problems[0]


def test_offline_lm_eval_datasets_are_looked_for_in_the_datasets_cache(hub_mirror_env, tiny_doc, tmp_path, monkeypatch):
    """lm-eval reads its datasets through `datasets`, which offline reads its own cache, not the hub cache:
    the mirror's datasets cache (prepared by `datasets`, tests/hub_mirror/lm_eval.py) less one MMLU subject."""
    import shutil

    import datasets.config

    cache = tmp_path / "datasets"
    shutil.copytree(hub_mirror_env["HF_DATASETS_CACHE"], cache)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    tiny_doc["eval"]["metrics"] = ["benchmarks"]
    tiny_doc["eval"]["benchmarks"] = {"suite": "hub", "tasks": ["toxigen", "mmlu", "arc_challenge", "piqa"]}
    trials = expand(tiny_doc, "s.yaml")
    assert preflight.hub_problems(trials) == []  # every config there, and the hub cache not asked
    shutil.rmtree(cache / "cais___mmlu" / "anatomy")
    shutil.rmtree(cache / "baber___piqa")  # a dataset with no config name
    problems = preflight.hub_problems(trials)
    assert len(problems) == 2, problems
    mmlu = next(p for p in problems if "cais/mmlu" in p)
    assert mmlu.startswith(f"dataset cais/mmlu (config anatomy) is not in the datasets cache ({cache})"), mmlu
    assert "lm-eval reads its datasets through `datasets`, which offline reads only its own cache (HF_DATASETS_CACHE)" in mmlu
    assert "run the study once there" in mmlu and "datasets.load_dataset('cais/mmlu', 'anatomy')" in mmlu
    assert mmlu.endswith("(needed by eval.benchmarks.tasks [mmlu])")
    piqa = next(p for p in problems if "baber/piqa" in p)
    assert piqa.startswith("dataset baber/piqa is not") and "datasets.load_dataset('baber/piqa')" in piqa and "[piqa]" in piqa


HUB_ENV = ("HF_TOKEN", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def test_runtime_env_leaves_the_jobs_own_variables_to_it(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    for key in HUB_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example")
    assert hub.runtime_env({"A": "1"}) == {"env_vars": {"A": "1", "HF_TOKEN": SECRET, "HF_ENDPOINT": "http://mirror.example"}}
    # Under `ray job submit --runtime-env-json '{"env_vars": {"HF_TOKEN": ...}}'` Ray refuses a driver env that repeats it.
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": {"env_vars": {"HF_TOKEN": SECRET}}, "metadata": {}}))
    assert hub.runtime_env({"A": "1"}) == {"env_vars": {"A": "1", "HF_ENDPOINT": "http://mirror.example"}}


def test_the_token_reaches_the_workers_of_a_running_cluster(monkeypatch):
    """A one-node cluster started without the token (as `ray start` on a cluster's nodes), joined the
    way `farm run` joins one, from a driver that `ray job submit` started with HF_ENDPOINT in the
    job's runtime env and HF_TOKEN in its own environment only."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.cluster_utils import Cluster

    for key in (*HUB_ENV, *WORKER_ENV, "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        monkeypatch.setenv("HF_TOKEN", SECRET)
        monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example")  # the job's env is the driver's too
        monkeypatch.setenv(
            RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": {"env_vars": {"HF_ENDPOINT": "http://mirror.example"}}, "metadata": {}})
        )
        start_ray(cluster.address)

        @ray.remote
        def seen():
            import os

            return {k: os.environ.get(k) for k in ("HF_TOKEN", "HF_ENDPOINT", "TOKENIZERS_PARALLELISM")}

        # (Ray's runtime env agent logs a job's runtime env, this one and `ray job submit`'s alike, in
        # each node's session logs: the README says so.)
        assert ray.get(seen.remote()) == {"HF_TOKEN": SECRET, "HF_ENDPOINT": "http://mirror.example", "TOKENIZERS_PARALLELISM": "false"}
    finally:
        ray.shutdown()
        cluster.shutdown()
