"""Hugging Face Hub files: one reference type, and fetching through the Hub cache.

:class:`HubFile` is the only shape of a Hub file reference in the package: the ``model.hub``
config section builds one, and ``hf://`` addresses parse into one. Files go to ``HF_HUB_CACHE``
(else ``HF_HOME/hub``), read at call time because huggingface_hub reads them once at import; with
``HF_HUB_OFFLINE=1`` they come from that cache only.
"""

from __future__ import annotations

import os
import re
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

from pipeline.storage.paths import split_uri

__all__ = [
    "HubFile",
    "UnpinnedRevisionWarning",
    "fetch",
    "fetch_snapshot",
    "hf_local_path",
    "hub_cache_dir",
    "hub_offline",
]

_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_TYPES = ("model", "dataset", "space")
_HF = "hf://"


class UnpinnedRevisionWarning(UserWarning):
    """A Hub file was asked for without a commit hash, so a later run may load other weights."""


@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face Hub repository.

    Example:
        >>> HubFile.parse("hf://owner/name@" + "a" * 40 + "/models/x/model.pth").filename
        'models/x/model.pth'
    """

    repo_id: str  # "owner/name"
    filename: str  # path inside the repository, "/"-separated
    revision: str | None = None  # a 40-hex commit pins the bytes; a branch or tag can move
    repo_type: str = "model"  # model | dataset | space

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", self.repo_id):
            raise ValueError(f"repo_id must look like 'owner/name', got {self.repo_id!r}")
        if not self.filename or self.filename.startswith("/"):
            raise ValueError(f"filename must be a path inside the repo, got {self.filename!r}")
        if self.revision == "":
            raise ValueError("revision is empty; give a commit hash or leave it out")
        if self.repo_type not in _REPO_TYPES:
            raise ValueError(f"repo_type must be one of {_REPO_TYPES}, got {self.repo_type!r}")

    @classmethod
    def parse(cls, uri: str) -> HubFile:
        """Parse ``hf://[datasets/|spaces/]owner/name[@revision]/path/in/repo``.

        The address form of huggingface_hub's ``HfFileSystem``; a revision with ``/`` in it is
        URL-encoded (``refs%2Fpr%2F1``).

        Example:
            >>> HubFile.parse("hf://datasets/me/rooms@main/val/m.parquet").repo_type
            'dataset'
        """
        scheme, rest = split_uri(uri)
        if scheme != "hf":
            raise ValueError(f"not an hf:// URI: {uri!r}")
        parts = rest.split("/")
        repo_type = "model"
        if parts[0] in ("datasets", "spaces"):
            repo_type = parts[0][:-1]
            parts = parts[1:]
        if len(parts) < 3 or not all(parts):
            raise ValueError(
                f"malformed hf:// URI {uri!r}; expected "
                "hf://datasets/owner/name[@revision]/path/to/file (or hf://owner/name/... for "
                "models)"
            )
        name, _, revision = parts[1].partition("@")
        return cls(
            repo_id=f"{parts[0]}/{name}",
            filename="/".join(parts[2:]),
            revision=urllib.parse.unquote(revision) if revision else None,
            repo_type=repo_type,
        )

    @property
    def pinned(self) -> bool:
        """Whether ``revision`` is a full commit hash, the only immutable Hub reference."""
        return self.revision is not None and _COMMIT.fullmatch(self.revision) is not None

    def __str__(self) -> str:
        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        at = f"@{urllib.parse.quote(self.revision, safe='')}" if self.revision else ""
        return f"{_HF}{kind}{self.repo_id}{at}/{self.filename}"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> str | None:
    """``HF_HUB_CACHE``, else ``HF_HOME/hub``, read now (None: huggingface_hub's default)."""
    cache_dir = os.environ.get("HF_HUB_CACHE")
    if cache_dir is None and "HF_HOME" in os.environ:
        cache_dir = os.path.join(os.environ["HF_HOME"], "hub")
    return cache_dir


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now: the cache only."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def hf_local_path(uri: str) -> str:
    """Local path of an ``hf://`` file in the hub cache, downloading it unless offline.

    Raises:
        FileNotFoundError: the repository, revision or file does not exist (or, offline, is
            not in the cache).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    ref = HubFile.parse(uri)
    cache_dir, offline = hub_cache_dir(), hub_offline()
    try:
        return str(
            hf_hub_download(
                ref.repo_id,
                ref.filename,
                repo_type=ref.repo_type,
                revision=ref.revision,
                cache_dir=cache_dir,
                local_files_only=offline,
            )
        )
    except EntryNotFoundError as e:  # includes LocalEntryNotFoundError (offline, not cached)
        where = "in the hub cache (HF_HUB_OFFLINE is set)" if offline else "on the hub"
        raise FileNotFoundError(f"{uri}: not found {where}") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403, 404):  # unknown repo/revision, or no access: a data problem
            raise FileNotFoundError(f"{uri}: {e}") from e
        raise


def fetch(hub: HubFile) -> Path:
    """Local path of ``hub`` in the Hub cache, downloaded first unless ``HF_HUB_OFFLINE`` is set.

    Warns with :class:`UnpinnedRevisionWarning` when the revision is not a commit hash.

    Raises:
        FileNotFoundError: the file is not in the repository or, offline, not in the cache.
    """
    _warn_unpinned(str(hub), hub.revision)
    try:
        return Path(hf_local_path(str(hub)))
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}. Check repo_id, filename and revision; with HF_HUB_OFFLINE set, fetch the file "
            f"once where there is network (hf download {hub.repo_id} {hub.filename} --revision "
            f"{hub.revision or 'main'}) or point HF_HUB_CACHE at a cache that holds it"
        ) from err


def _warn_unpinned(what: str, revision: str | None) -> None:
    if revision is None or _COMMIT.fullmatch(revision) is None:
        warnings.warn(
            f"{what} is not pinned (revision={revision!r}), so its bytes may change between "
            "runs; set the revision to a 40-hex commit hash for a reproducible audit",
            UnpinnedRevisionWarning,
            stacklevel=4,
        )


def fetch_snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """Local folder of a Hub model repository's files matching ``patterns``, downloaded into the
    Hub cache first unless ``HF_HUB_OFFLINE`` is set (then the cache only).

    Warns with :class:`UnpinnedRevisionWarning` when the revision is not a commit hash.

    Raises:
        FileNotFoundError: the repository or revision does not exist or, offline, is not in
            the cache; the message says how to fill the cache.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    _warn_unpinned(f"hub repo {repo_id}", revision)
    offline = hub_offline()
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=hub_cache_dir(),
                allow_patterns=patterns,
                local_files_only=offline,
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        where = "in the hub cache (HF_HUB_OFFLINE is set)" if offline else "on the hub"
        raise FileNotFoundError(
            f"hub repo {repo_id}@{revision or 'main'}: not found {where} "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); fetch it once where "
            f"there is network (hf download {repo_id} --revision {revision or 'main'}) or point "
            "HF_HUB_CACHE at a cache that holds it"
        ) from e
