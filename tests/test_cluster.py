"""cluster.yaml: valid for the installed Ray's cluster launcher, closed to the internet but for
SSH, GPU workers that say so, and setup commands that install the farm."""

import ast
import copy
import itertools
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from conftest import ROOT

RAY_DIR = Path(ray.autoscaler.__file__).parent
SCHEMA = json.loads((RAY_DIR / "ray-schema.json").read_text())


@pytest.fixture
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema_and_checks(config):
    jsonschema.validate(config, SCHEMA)
    # What `ray up` does before it launches anything: defaults filled in, then the schema and
    # Ray's own cross-checks (head type listed, min_workers within max_workers).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.update(max_worker=c.pop("max_workers")),  # a misspelled top-level key
        lambda c: c.update(max_workers="10"),  # a string where Ray wants an integer
        lambda c: c["available_node_types"]["gpu_a10g"]["resources"].update(GPU=0.5),  # resources are integers
        lambda c: c["provider"]["security_group"].update(Ports=[8265]),  # not a field of the group
    ],
    ids=["misspelled-key", "max-workers-string", "fractional-gpu", "unknown-security-group-field"],
)
def test_a_broken_config_fails_the_schema(config, break_it):
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, SCHEMA)


def _rays_default_inbound_rules():
    """Ray's own functions that build the inbound rules of the group it creates, read from the
    installed Ray's source (importing that module needs boto3, which the tests do not)."""
    source = (RAY_DIR / "_private" / "aws" / "config.py").read_text()
    wanted = {"_create_default_inbound_rules", "_create_default_intracluster_inbound_rules", "_create_default_ssh_inbound_rules"}
    funcs = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {f.name for f in funcs} == wanted, "Ray renamed its security group helpers: read them again"
    namespace = {"itertools": itertools}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), "ray_aws_config", "exec"), namespace)
    return namespace["_create_default_inbound_rules"]


def _open_to_addresses(rule: dict) -> bool:
    return bool(rule.get("IpRanges") or rule.get("Ipv6Ranges") or rule.get("PrefixListIds"))


def test_only_ssh_is_open_to_the_internet(config):
    group = config["provider"]["security_group"]
    for rule in group["IpPermissions"]:  # ours: port 22 only, if any
        assert (rule["FromPort"], rule["ToPort"]) == (22, 22), rule
    # Everything Ray will authorize on the group: its defaults plus ours. A rule that admits
    # addresses must be SSH; the rest only admit the cluster's own group (node to node).
    rules = _rays_default_inbound_rules()({"sg-cluster"}, group["IpPermissions"])
    assert any(r.get("FromPort") == 22 for r in rules)
    for rule in rules:
        if _open_to_addresses(rule):
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule
        else:
            assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == ["sg-cluster"], rule
    # AWS refuses the whole call if a rule repeats one of Ray's (the default SSH rule).
    keys = [json.dumps(r, sort_keys=True) for r in rules]
    assert len(keys) == len(set(keys))


def test_the_check_would_catch_an_open_dashboard(config):
    config["provider"]["security_group"]["IpPermissions"] = [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    ]
    with pytest.raises(AssertionError):
        test_only_ssh_is_open_to_the_internet(config)


def test_no_start_command_opens_ports_beyond_rays_own(config):
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "--ray-client-server-port" not in start and "--dashboard-port" not in start


def test_workers_are_gpu_nodes_and_the_head_trains_nothing(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert len(workers) >= 2
    gpus = {t["node_config"]["InstanceType"]: t["resources"]["GPU"] for t in workers.values()}
    assert gpus.get("g5.2xlarge") == 1
    assert gpus.get("p4d.24xlarge") == 8 or gpus.get("p5.48xlarge") == 8
    for t in workers.values():  # autoscaling: from none to a ceiling, within the cluster's
        assert t["min_workers"] == 0 < t["max_workers"] <= config["max_workers"]


def test_setup_installs_the_farm_from_its_file_mount(config):
    mounts = config["file_mounts"]
    remote = next(r for r, local in mounts.items() if Path(local) == Path("."))
    commands = config["setup_commands"]
    install = [c for c in commands if "pip install" in c and remote in c]
    assert install and "[deepspeed,s3]" in install[0]  # s3: the lease that builds a shared stage once on an s3:// store
    torch = [c for c in commands if "torch" in c]
    assert torch and commands.index(torch[0]) < commands.index(install[0])  # DeepSpeed builds against torch
    assert "boto3" in " ".join(config["head_setup_commands"])  # the autoscaler launches EC2 nodes
    image = config["docker"]["image"]
    assert image.startswith("rayproject/ray:") and image.endswith("-py311-gpu")
    assert image.split(":")[1].split("-")[0] == ray.__version__  # one Ray version on laptop and cluster
