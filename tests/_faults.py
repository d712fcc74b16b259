"""Real broken inputs and real fault plumbing for the runner tests.

Bad files are written byte by byte (random bytes, cut-off PNG/JPEG), the NaN model is a
TorchScript archive so Ray workers load it without importing test code, and the Ray helpers keep
a test's Ray from leaking into (or picking up) other Ray instances on the same machine.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn


def write_random_bytes(path: Path, n: int = 600, seed: int = 0) -> Path:
    """A file of random bytes (no image signature) under an image's name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(n))
    return path


def write_truncated(path: Path, size: tuple[int, int] = (24, 24), keep: float = 0.5) -> Path:
    """A real PNG or JPEG (by ``path``'s suffix) of random pixels, cut after ``keep`` of its bytes.

    Random pixels do not compress, so the cut lands inside the pixel data, not in a header.
    """
    arr = (np.random.default_rng(1).random((*size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(arr).save(buf, format=fmt)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_png(path: Path, arr: np.ndarray) -> Path:
    """``arr`` (``(H, W)`` or ``(H, W, 3)`` uint8) as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


class NanWhenDark(nn.Module):
    """A small conv classifier whose scores are NaN for images darker than ``threshold``.

    Shapes: ``(N, 3, H, W)`` in ``[0, 1]`` -> ``(N, 2)``. A black image (and every occluded copy
    of it) has mean 0, so all its scores are NaN; a random-noise image has mean ~0.5 and stays
    finite whatever one window is filled with.
    """

    def __init__(self, threshold: float = 0.05) -> None:
        super().__init__()
        self.threshold = threshold
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))  # (N, 2)
        dark = x.mean(dim=(1, 2, 3)) < self.threshold  # (N,)
        return torch.where(dark[:, None], torch.full_like(y, float("nan")), y)


def save_nan_model(path: Path, threshold: float = 0.05, seed: int = 0) -> Path:
    """Script and save :class:`NanWhenDark`; the archive needs no test code to load."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream, yet TorchScript stays a supported model input.
        warnings.filterwarnings("ignore", message=r".*torch\.jit", category=DeprecationWarning)
        torch.jit.save(torch.jit.script(NanWhenDark(threshold).eval()), str(path))
    return path


class Picky(nn.Module):
    """A classifier that raises on a blank input and on one marked image.

    Shapes: ``(N, 3, H, W)`` -> ``(N, 2)``. The marked image has a magenta top-left pixel
    ``(1, 0, 1)``; any batch holding it (unoccluded) raises, as does any batch holding an
    all-zero image (what zero padding of batches used to feed models).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.flatten(1).abs().sum(dim=1) == 0).any()):
            raise RuntimeError("blank input")
        corner = x[:, :, 0, 0]  # (N, 3)
        if bool(((corner[:, 0] > 0.99) & (corner[:, 1] < 0.01) & (corner[:, 2] > 0.99)).any()):
            raise RuntimeError("the marked image")
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def save_picky_model(path: Path, seed: int = 0) -> Path:
    """Script and save :class:`Picky`; the archive needs no test code to load."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit", category=DeprecationWarning)
        torch.jit.save(torch.jit.script(Picky().eval()), str(path))
    return path


@contextlib.contextmanager
def private_ray_tmpdir() -> Iterator[Path]:
    """Point ``RAY_TMPDIR`` at a fresh short folder for the duration.

    ``ray.cluster_utils.Cluster`` writes its address to ``$RAY_TMPDIR/ray/ray_current_cluster``
    and never removes it; with the default ``/tmp`` every later ``ray.init()`` on the machine
    would try to join that (dead) cluster. The folder is short because Ray's Unix socket paths
    live under it and are limited to ~107 bytes.
    """
    old = os.environ.get("RAY_TMPDIR")
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    os.environ["RAY_TMPDIR"] = str(tmp)
    try:
        yield tmp
    finally:
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)


class Background:
    """Call ``fn()`` in a daemon thread; ``join`` returns its value or re-raises its error.

    A daemon thread, so that a driver stuck waiting on an actor that never comes back cannot
    keep the test process alive after the test has failed.
    """

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:  # handed to the test thread by join()
            self._error = e

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"still running after {timeout:.0f}s")
        if self._error is not None:
            raise self._error
        return self._value


def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; return whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def shard_files(run_dir: Path) -> list[Path]:
    """The complete shard files of a run (temporary files excluded)."""
    return sorted((run_dir / "maps").glob("part-*.parquet"))


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """``occlusion-audit ARGV`` in this process (:func:`pipeline.cli.main`): its exit code and
    what it printed, as a finished subprocess would hold them.

    Several seconds cheaper than a subprocess (no Python, torch and Ray imports). A run joins the
    Ray this process is connected to (the ``local_ray`` fixture), else starts an embedded one.
    An error the CLI does not turn into its one line propagates, failing the test, where a
    subprocess would print a traceback.
    """
    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return subprocess.CompletedProcess(
        ["occlusion-audit", *argv], code, out.getvalue(), err.getvalue()
    )


def run_cli(cfg_path: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m pipeline run CFG --no-report --quiet`` in its own process group (so that a
    test can SIGKILL the driver and the Ray it started together), output in ``stdout``; ``env``:
    the driver's environment (default this process's)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(cfg_path), "--no-report", "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
