"""`farm ls`: every name a study file may use, listed from the registries, each with its line."""

import pytest

from farm import registry
from farm.cli import LISTED, main


def test_farm_ls_lists_every_registered_name_with_its_documentation(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for what in LISTED:
        reg = getattr(registry, what)
        assert f"{what}:\n" in out and reg.names()
        for name in reg.names():
            [line] = [line for line in out.splitlines() if line.split()[:1] == [name]]
            assert reg.doc(name) and len(line.split(maxsplit=1)[1]) > 20, f"{reg.kind} {name} has no documentation"
    assert "  label_flip           [comparison] Swap chosen and rejected" in out
    # a metric's line ends with which way its values are better (Metric.higher_is_better)
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["preference_accuracy"].endswith("(↑ preference_accuracy, reward_accuracy, reward_margin)")
    assert lines["perplexity"].endswith(" (↓ perplexity)") and lines["benchmarks"].endswith(" (↑ bench/*)")
    assert all("↑" not in lines[name] and "↓" not in lines[name] for name in registry.transforms.names())
    assert main(["ls", "stages"]) == 0
    assert capsys.readouterr().out.startswith("stages:\n  ai_feedback")
    assert main(["ls", "stage"]) == 2 and "one of sources, transforms" in capsys.readouterr().err


def test_a_name_no_module_could_have_is_unknown_not_an_import_error():
    # get() imports the module of a name first; "x.y" would make Python look for a package x.
    for name in ("x.y", "no-such", ""):
        with pytest.raises(registry.UnknownName, match="allowed: "):
            registry.sources.get(name)
