"""The Hugging Face hub, as the farm reaches it: repository files by id, the commit a revision is,
and access checks whose errors name the repository and the fix.

Everything goes through `huggingface_hub`, so its settings hold as they do for `transformers`:
`HF_TOKEN` (or `huggingface-cli login`), `HF_ENDPOINT` (a mirror), `HF_HOME`/`HF_HUB_CACHE` (a cache
filled elsewhere) and `HF_HUB_OFFLINE=1` (read that cache only). The tests use the last two over a
cache written in the hub's own layout (tests/hub_mirror).
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

PARQUET = "refs/convert/parquet"  # the hub's parquet conversion of a dataset (script-only ones too)


class HubError(ValueError):
    """A repository the farm needs cannot be read; the message says which and how to fix it."""


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def page(repo_id: str, repo_type: str) -> str:
    return f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"


def explain(e: Exception, repo_id: str, repo_type: str, revision: str | None = None) -> HubError:
    """The hub's exception as a HubError naming `repo_id` and the fix."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    what = f"{repo_type} {repo_id}" + (f" (revision {revision})" if revision else "")
    if isinstance(e, GatedRepoError):
        if get_token() is None:
            fix = (
                f"accept its licence at {page(repo_id, repo_type)} with your hub account, then give the farm a token: "
                "export HF_TOKEN=hf_... (with `ray job submit`, pass it in the job's runtime env; see the README's 'Gated repositories')"
            )
            return HubError(f"{what} is gated and no hub token is set: {fix}")
        return HubError(
            f"{what} is gated and your token has no access yet: request it at {page(repo_id, repo_type)} (approval can take a while), or use a token of an account that has it"
        )
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{what}: the hub has no such revision; check the `revision:` the study pins")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"{what} is not on the hub: check the spelling (owner/name); a private repository also needs HF_TOKEN")
    if isinstance(e, LocalEntryNotFoundError) or offline():
        from huggingface_hub import constants

        return HubError(
            f"{what} is not in the local hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1: "
            f"fill the cache where the hub is reachable (`hf download {repo_id}{' --repo-type dataset' if repo_type == 'dataset' else ''}` "
            "with the same HF_HOME), or unset HF_HUB_OFFLINE"
        )
    return HubError(f"{what}: the hub could not be read ({type(e).__name__}: {e}); `farm doctor` checks the connection")


def snapshot(repo_id: str, repo_type: str = "dataset", revision: str | None = None, patterns: list[str] | None = None) -> Path:
    """A local folder holding the repository's files that match `patterns` (all if None): the
    cached snapshot offline, downloaded (and cached) online."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - every hub failure is explained, none swallowed
        raise explain(e, repo_id, repo_type, revision) from e


def commit(repo_id: str, repo_type: str = "model", revision: str | None = None, cached: bool = False) -> str:
    """The commit that `revision` (a branch, tag or commit; None: the default branch) of the repository
    is: the hub's answer online; offline or with `cached`, the hub cache's (a branch's or tag's refs/
    file, a commit's snapshot folder), the commit that a load from that cache reads."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

    try:
        if not (cached or offline()):
            return HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision).sha  # a commit the hub lacks fails here
        if revision and REGEX_COMMIT_HASH.fullmatch(revision):
            # A commit names itself (resolve_revision returns it unchecked): only its snapshot shows the cache has it.
            if not (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "snapshots" / revision).is_dir():
                raise LocalEntryNotFoundError(f"no snapshot of commit {revision} in the cache")
            return revision
        return HfApi().resolve_revision(repo_id, repo_type=repo_type, revision=revision, local_files_only=True).resolved
    except Exception as e:  # noqa: BLE001
        raise explain(e, repo_id, repo_type, revision) from e


def files(repo_id: str, repo_type: str = "dataset", revision: str | None = None) -> list[str]:
    """The repository's file names (at `revision`): from the hub, or from the cached snapshot offline."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        if offline():
            root = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision))
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return sorted(HfApi().list_repo_files(repo_id, repo_type=repo_type, revision=revision))
    except Exception as e:  # noqa: BLE001
        raise explain(e, repo_id, repo_type, revision) from e


def matching(names: list[str], patterns: list[str]) -> list[str]:
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]


def check(repo_id: str, repo_type: str = "model", revision: str | None = None, patterns: list[str] | None = None) -> None:
    """Raise HubError unless the repository can be read with this environment's token (online: the
    hub's own access check; offline: the cache) and holds a file matching each of `patterns`."""
    from huggingface_hub import HfApi

    if not offline():
        try:
            HfApi().auth_check(repo_id, repo_type=repo_type)
        except Exception as e:  # noqa: BLE001
            raise explain(e, repo_id, repo_type) from e
    if patterns or offline():
        names = files(repo_id, repo_type, revision)
        missing = [p for p in patterns or [] if not matching(names, [p])]
        if missing:
            raise HubError(
                f"{repo_type} {repo_id}{f' (revision {revision})' if revision else ''} has no file matching {missing[0]!r}: is it the repository the study means?"
            )


def token_env() -> dict[str, str]:
    """The hub settings of this process that Ray workers need too (the token among them): passed
    through the job's runtime env, never written anywhere."""
    keys = ("HF_TOKEN", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return {k: os.environ[k] for k in keys if os.environ.get(k)}


def runtime_env(env: dict[str, str]) -> dict:
    """Ray's runtime env for `ray.init`: `env` and this process's hub settings (`farm.hub.token_env`:
    HF_TOKEN, HF_ENDPOINT, HF_HOME, offline flags) for every worker of the job, on every node. The
    token travels only there: it is never written by the farm.

    Under `ray job submit`, the job's own runtime env (`--runtime-env-json`, set in the driver's
    environment too) already reaches every worker, and Ray refuses a driver env that repeats one of
    its variables (ray._private.worker: "Failed to merge the Job's runtime env"), so those are left
    to the job's env."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}").get("runtime_env") or {}
    taken = job.get("env_vars") or {}
    return {"env_vars": {k: v for k, v in {**env, **token_env()}.items() if k not in taken}}
