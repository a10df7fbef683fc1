"""`farm doctor`: what this environment has, and what each given study needs that is missing."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

OPTIONAL = {"deepspeed": "deepspeed", "lm_eval": "lm-eval[hf]", "detoxify": "detoxify", "vaderSentiment": "vaderSentiment"}


def environment(storage: str) -> tuple[list[tuple[str, str]], dict]:
    """(name, finding) lines, and the facts the study checks use."""
    import ray
    import torch

    from farm.label.scorers import hub_reachable

    lines = [("python", sys.version.split()[0]), ("torch", f"{torch.__version__}"), ("ray", ray.__version__)]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines.append(("GPUs visible", str(gpus)))
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, logging_level="ERROR")
            lines.append(("Ray cluster", f"reachable at {address}: {ray.cluster_resources()}"))
            ray.shutdown()
        except Exception as e:  # noqa: BLE001 - report whatever stops the connection
            lines.append(("Ray cluster", f"NOT reachable at {address}: {type(e).__name__}: {e}"))
    else:
        lines.append(("Ray", f"no RAY_ADDRESS: `farm run` starts a local Ray with {os.cpu_count()} CPUs"))
    hub = hub_reachable()
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    lines.append(("Hugging Face hub", "offline (HF_HUB_OFFLINE=1)" if offline else "reachable" if hub else "NOT reachable"))
    for module, package in OPTIONAL.items():
        found = importlib.util.find_spec(module) is not None
        lines.append((f"extra {package}", "installed" if found else "not installed"))
    path = Path(storage)
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free / 2**30
    lines.append(("storage", f"{storage}: {free:.1f} GiB free"))
    return lines, {"gpus": gpus, "hub": hub and not offline, "free_gib": free}


def study_needs(trials, facts: dict) -> list[str]:
    """What the trials of one study need that this environment lacks."""
    missing = set()
    for t in trials:
        s = t.study
        datas = [st.data or s.data for st in s.stages.values()] + [s.eval.data or s.data]
        for source in (src for d in datas for src in d.sources):
            if source.origin == "hub" and not facts["hub"]:
                missing.add(f"source {source.name} is read from the hub, which is not reachable")
        if s.model.base not in ("tiny-gpt2",) and not Path(s.model.base).expanduser().exists() and not facts["hub"]:
            missing.add(f"model {s.model.base} comes from the hub, which is not reachable (or pre-fill the HF cache)")
        for name, st in s.stages.items():
            need = st.resources.gpus_per_worker * st.resources.num_workers
            if need > facts["gpus"] and not os.environ.get("RAY_ADDRESS"):
                missing.add(f"stage {name} asks for {need:g} GPUs; {facts['gpus']} visible here (run it on a cluster)")
            if st.deepspeed and importlib.util.find_spec("deepspeed") is None:
                missing.add(f"stage {name} uses DeepSpeed: pip install 'farm[deepspeed]'")
        if "generation" in s.eval.metrics and s.eval.generation.scorer == "roberta_hate" and not facts["hub"]:
            missing.add("scorer roberta_hate needs the hub (or use scorer: auto / embedded_toxicity)")
        if "benchmarks" in s.eval.metrics and s.eval.benchmarks.suite == "hub" and not facts["hub"]:
            missing.add("benchmarks suite hub downloads the lm-eval task data (or use suite: bundled)")
        scorers = [lab for d in datas for lab in d.labels] + ([s.eval.conditional.toxicity] if "misalignment" in s.eval.metrics else [])
        for lab in scorers:
            if lab.scorer == "detoxify" and not Path(lab.model or "").expanduser().is_file() and not facts["hub"]:
                missing.add(f"detoxify model {lab.model} downloads its checkpoint (GitHub) and base model (hub); give a local checkpoint file")
    return sorted(missing)
