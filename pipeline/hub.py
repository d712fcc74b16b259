"""Hugging Face Hub files: a pinned reference to one file, and fetching it through the cache.

Files go to ``HF_HUB_CACHE`` (else ``HF_HOME/hub``), read at call time; with
``HF_HUB_OFFLINE=1`` they come from that cache only (:func:`pipeline.uri.hf_local_path`).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pipeline.uri import hf_local_path, parse_hf

__all__ = ["HubFile", "UnpinnedRevisionWarning", "fetch"]

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
        if self.repo_id.count("/") != 1 or "" in self.repo_id.split("/"):
            raise ValueError(f"hub.repo_id must look like 'owner/name', got {self.repo_id!r}")
        if not self.filename or self.filename.startswith("/"):
            raise ValueError(f"hub.filename must be a path inside the repo, got {self.filename!r}")
        if self.revision == "":
            raise ValueError("hub.revision is empty; give a commit hash or leave it out")
        if self.repo_type not in _REPO_TYPES:
            raise ValueError(f"hub.repo_type must be one of {_REPO_TYPES}, got {self.repo_type!r}")

    @classmethod
    def parse(cls, uri: str) -> HubFile:
        """Parse ``hf://[datasets/|spaces/]owner/name[@revision]/path/in/repo``.

        The address form of huggingface_hub's ``HfFileSystem``; a revision with ``/`` in it is
        URL-encoded (``refs%2Fpr%2F1``).
        """
        p = parse_hf(uri)
        return cls(p.repo_id, p.filename, p.revision, p.repo_type)

    @property
    def pinned(self) -> bool:
        """Whether ``revision`` is a full commit hash, the only immutable Hub reference."""
        return self.revision is not None and _COMMIT.fullmatch(self.revision) is not None

    def __str__(self) -> str:
        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        at = f"@{quote(self.revision, safe='')}" if self.revision else ""
        return f"{_HF}{kind}{self.repo_id}{at}/{self.filename}"


def fetch(hub: HubFile) -> Path:
    """Local path of ``hub`` in the Hub cache, downloaded first unless ``HF_HUB_OFFLINE`` is set.

    Warns with :class:`UnpinnedRevisionWarning` when the revision is not a commit hash.

    Raises:
        FileNotFoundError: the file is not in the repository or, offline, not in the cache.
    """
    if not hub.pinned:
        warnings.warn(
            f"{hub} is not pinned (revision={hub.revision!r}), so its bytes may change between "
            "runs; set the revision to a 40-hex commit hash for a reproducible audit",
            UnpinnedRevisionWarning,
            stacklevel=4,
        )
    try:
        return Path(hf_local_path(str(hub)))
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}. Check repo_id, filename and revision; with HF_HUB_OFFLINE set, fetch the file "
            f"once where there is network (hf download {hub.repo_id} {hub.filename} --revision "
            f"{hub.revision or 'main'}) or point HF_HUB_CACHE at a cache that holds it"
        ) from err
