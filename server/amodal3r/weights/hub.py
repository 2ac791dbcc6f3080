"""Finding the model folder: a local path, or a Hugging Face id resolved through the local cache."""

from __future__ import annotations

from pathlib import Path

from amodal3r.api.errors import CheckpointError
from amodal3r.weights.layout import CHECKPOINT_FOLDER, HUB_PATTERNS, PIPELINE_FILE


def resolve_model(name_or_path: str | Path, allow_download: bool = True) -> Path:
    """A local folder as it is; otherwise the Hugging Face snapshot of that id (the cached one first,
    then a download when allowed). Offline without a cached copy, say exactly what to put where."""
    path = Path(name_or_path).expanduser()
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        if not (path / PIPELINE_FILE).is_file():
            raise CheckpointError(
                f"{path}: no {PIPELINE_FILE} here. Give the folder of the Amodal3R weights "
                f"({PIPELINE_FILE} plus {CHECKPOINT_FOLDER}/)"
            )
        return path
    repo_id = str(name_or_path)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(
            f"{repo_id!r} is not a local folder and huggingface_hub is not installed: "
            "pip install huggingface_hub, or pass --model with a local folder"
        ) from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception as cached_error:  # noqa: BLE001 - any failure here means "not in the cache"
        if not allow_download:
            raise _missing(repo_id) from cached_error
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - offline, refused, interrupted: one clear message
        raise _missing(repo_id, e) from e


def _missing(repo_id: str, error: Exception | None = None) -> CheckpointError:
    why = f" ({type(error).__name__}: {error})" if error is not None else ""
    return CheckpointError(
        f"the model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded{why}. "
        f"Download https://huggingface.co/{repo_id} on a connected machine ({PIPELINE_FILE} and the "
        f"{CHECKPOINT_FOLDER} folder), copy it here and pass --model /path/to/that/folder"
    )
