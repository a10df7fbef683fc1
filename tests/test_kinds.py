"""A stage kind is one module with one registration: its config class (fields, validation), its
`run`, its version, its cost and what it makes. The study schema, the keys, `farm plan` and
`farm ls` read every kind from the registry, so a kind of one's own is a module and nothing else."""

import os
import subprocess
from typing import Literal

import yaml
from conftest import FARM

from farm.grid import expand
from farm.plan import plan_trial
from farm.registry import stages
from farm.schema import StageSpec

# A kind of a user's own, in a package of theirs: SFT on demonstrations under another name, with a
# cost of its own. Its distribution names the module by an entry point of the group `farm.stages`.
PROBE = '''
from typing import ClassVar, Literal

from farm.registry import stages
from farm.schema import TrainingStage
from farm.stages.sft import run


@stages.register("sft_probe")
class SFTProbe(TrainingStage):
    """A probe kind: supervised fine-tuning registered from outside the farm."""

    kind: Literal["sft_probe"]
    run: ClassVar = staticmethod(run)
    max_prompt_length: int = 96
    shape: ClassVar[str] = "demonstration"
    version: ClassVar[int] = 7

    def work(self, seqs, train, base, params, study):
        return [(train, 3 * seqs * self.max_length, base)]
'''


def test_every_kind_is_one_registration_that_the_schema_and_the_keys_read():
    for name in stages.names():
        cls = stages.get(name)
        assert issubclass(cls, StageSpec) and cls.__module__.startswith("farm.stages.")
        assert cls.model_fields["kind"].annotation == Literal[name]
        assert callable(cls.run) and isinstance(cls.version, int) and cls.produces in ("model", "reward_model", "records")
        assert (cls.builds is not None) == (cls.produces == "records"), f"{name}: a records stage says which shape it builds"
        assert stages.doc(name), f"{name}: its class's docstring is what farm ls shows"


def test_a_kinds_version_is_in_its_key_and_in_no_other_kinds(tiny_doc, monkeypatch):
    study = expand({**tiny_doc, "grid": {}}, "s.yaml")[0].study
    before = {s.name: s.key for s in plan_trial(study).stages}
    monkeypatch.setattr(stages.get("dpo"), "version", stages.get("dpo").version + 1)
    after = {s.name: s.key for s in plan_trial(study).stages}
    assert after["dpo"] != before["dpo"] and all(after[n] == before[n] for n in before if n != "dpo")


def test_a_kind_of_ones_own_is_its_module_alone(tmp_path, tiny_doc):
    """As `pip install` of a package with `[project.entry-points."farm.stages"] sft_probe = "mykinds.probe"`
    leaves it: the package and its dist-info (importlib.metadata reads entry points from it)."""
    site = tmp_path / "site"
    (site / "mykinds").mkdir(parents=True)
    (site / "mykinds" / "__init__.py").write_text("")
    (site / "mykinds" / "probe.py").write_text(PROBE)
    dist = site / "mykinds-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mykinds\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[farm.stages]\nsft_probe = mykinds.probe\n")
    doc = {**tiny_doc, "grid": {}}
    doc["stages"] = {"pretrain": doc["stages"]["pretrain"], "probe": {"kind": "sft_probe", "max_steps": 2}}
    study = tmp_path / "probe.yaml"
    study.write_text(yaml.safe_dump(doc, sort_keys=False))

    def farm(*args, plugin=True):
        path = os.pathsep.join([str(site)] * plugin + [os.environ.get("PYTHONPATH", "")])
        return subprocess.run([*FARM, *args], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}, cwd=tmp_path)

    listed = farm("ls", "stages").stdout
    assert "sft_probe" in listed and "registered from outside the farm" in listed
    why = farm("plan", str(study), "--results", str(tmp_path / "results"), "--why", "probe")
    assert why.returncode == 0, why.stderr
    assert '"kind": "sft_probe"' in why.stdout and '"version": 7' in why.stdout
    plan = farm("plan", str(study), "--results", str(tmp_path / "results"))
    assert plan.returncode == 0, plan.stderr
    # Its cost is its own `work`: 3 x 2 steps x 8 rows (batch_size) x 128 tokens (max_length, defaults).
    [line] = [line for line in plan.stdout.splitlines() if line.split()[:2] == ["probe", "sft_probe"] and "K" in line]
    assert line.split()[3] == "6.14K"
    without = farm("plan", str(study), plugin=False)
    assert without.returncode == 2 and "unknown stage kind 'sft_probe'" in without.stderr  # the module is the kind
