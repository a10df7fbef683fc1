"""`farm doctor`: what this environment has, and what each given study needs that is missing."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from farm import preflight
from farm.label.scorers import hub_reachable
from farm.schema import TrainingStage

OPTIONAL = {"deepspeed": "deepspeed", "lm_eval": "lm-eval[hf]", "detoxify": "detoxify", "vaderSentiment": "vaderSentiment"}


def environment(storage: str) -> tuple[list[tuple[str, str]], dict]:
    """(name, finding) lines, and the facts the study checks use."""
    import ray
    import torch

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
    from huggingface_hub import get_token

    # Whether there is one, never what it is.
    lines.append(
        (
            "hub token",
            "set"
            if get_token()
            else "none: gated repositories (Llama-2, GAIR/lima, skg/toxigen-data) will be refused; see the README's 'Gated repositories'",
        )
    )
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
    """What the trials of one study need that this environment lacks: `farm run`'s preflight
    (every hub repository it reads, an empty eval set) and what it needs of this machine."""
    missing = set(preflight.eval_problems(trials) + preflight.hub_problems(trials))
    for t in trials:
        s = t.study
        datas = [data for _, data in preflight.datas(s)]
        for name, st in s.stages.items():
            need = st.resources.gpus_per_worker * st.resources.num_workers
            if need > facts["gpus"] and not os.environ.get("RAY_ADDRESS"):
                missing.add(f"stage {name} asks for {need:g} GPUs; {facts['gpus']} visible here (run it on a cluster)")
            # Only training stages take a DeepSpeed config (rank, critique_revision, ai_feedback do not).
            if isinstance(st, TrainingStage) and st.deepspeed and importlib.util.find_spec("deepspeed") is None:
                missing.add(f"stage {name} uses DeepSpeed: pip install 'farm[deepspeed]'")
        scorers = [lab for d in datas for lab in d.labels] + ([s.eval.conditional.toxicity] if "misalignment" in s.eval.metrics else [])
        for lab in scorers:
            # Its base model is among the hub checks; the released checkpoint itself comes from GitHub.
            if lab.scorer == "detoxify" and not Path(lab.model or "").expanduser().is_file() and not facts["hub"]:
                missing.add(
                    f"detoxify model {lab.model or 'original'} downloads its checkpoint from GitHub (torch hub cache); give a local checkpoint file"
                )
    return sorted(missing)
