"""bench/gpu_check.py runs in its CPU mode: real architectures cut to 2 narrow layers, the same
steps and estimates as on a GPU, a table of ratios and a JSON file of finite numbers."""

import json
import math
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_runs_on_the_cpu_and_writes_its_figures():
    out = ROOT / "bench" / "results" / "gpu_check-cpu-tiny.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, ROOT / "bench" / "gpu_check.py", "--cpu-tiny"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ratios measured / estimated: " in proc.stdout
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu-tiny"
    steps = {(c["model"], c["step"]) for c in result["cases"]}
    assert steps == {(m, s) for m in ("llama-2-7b-tiny", "opt-1.3b-tiny") for s in ("lora_sft", "lora_dpo", "generate")} | {
        ("opt-1.3b-tiny", "full_sft")
    }
    for case in result["cases"]:
        numbers = [v for v in case.values() if isinstance(v, (int, float))]
        assert numbers and all(math.isfinite(v) for v in numbers), case
        # The proxy sees the weights, optimizer state and saved activations: most of the estimate, never far above it.
        assert 0.3 < case["ratio"] < 1.3, case
        assert f"{case['ratio']:.2f}" in proc.stdout
