"""The Ray stage: a stateful worker that loads the model once and processes whole shards.

This module does not import Ray; the runner wraps :class:`ShardWorker` with ``ray.remote`` and
the resources of the cluster it finds.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import torch

from pipeline.config import AuditConfig
from pipeline.data.detect import open_source
from pipeline.data.source import ShardRef, Source
from pipeline.run.bank import Banks
from pipeline.run.folder import RunFolder
from pipeline.run.heap import tune_heap
from pipeline.run.offer import actor_threads
from pipeline.run.settings import worker_setup
from pipeline.run.shard import load_bank, load_shard, process_shard

__all__ = ["FAKE_GPUS_ENV", "ShardWorker"]


# Testing only: on a machine without CUDA, a worker that Ray gave a (simulated) GPU computes on
# the CPU instead of refusing to start. No config key or command sets it; the tests of the GPU
# pool set it in the environment of the Ray they start.
FAKE_GPUS_ENV = "OCCLUSION_AUDIT_TEST_FAKE_GPUS"


def _ray_placement() -> tuple[list[str], str | None, dict[str, float], dict[str, float]]:
    """Assigned GPU ids, Ray node id, the resources Ray assigned to this actor and its node's
    total resources (``[], None, {}, {}`` outside a Ray worker)."""
    try:
        import ray
    except ImportError:
        return [], None, {}, {}
    if not ray.is_initialized():
        return [], None, {}, {}
    ctx = ray.get_runtime_context()
    node_id = ctx.get_node_id()
    node = next((n.get("Resources", {}) for n in ray.nodes() if n.get("NodeID") == node_id), {})
    assigned = {k: float(v) for k, v in ctx.get_assigned_resources().items()}
    return [str(g) for g in ray.get_gpu_ids()], node_id, assigned, dict(node)


def _device(gpu_ids: list[str]) -> tuple[torch.device, bool]:
    """The torch device of a worker that Ray gave ``gpu_ids``, and whether it computes on the
    CPU in place of a simulated GPU (the test setting :data:`FAKE_GPUS_ENV`).

    Raises:
        RuntimeError: Ray gave a GPU but torch sees no CUDA device (a CPU-only torch in the
            image, a driver that does not match): one line, never a silent CPU run.
    """
    if not gpu_ids:
        return torch.device("cpu"), False
    if torch.cuda.is_available():
        # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs, so "cuda" is this worker's GPU.
        return torch.device("cuda"), False
    if os.environ.get(FAKE_GPUS_ENV) == "1":
        return torch.device("cpu"), True
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
    raise RuntimeError(
        f"Ray gave this actor GPU {', '.join(gpu_ids)} on {socket.gethostname()}, but torch "
        f"{torch.__version__} ({build} build) sees no CUDA device "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
        "install a CUDA build of torch that matches the node's driver, or set "
        "cluster.device: cpu"
    )


class ShardWorker:
    """Loads the model once; computes and atomically writes one shard per call.

    On a GPU actor calls may run on two threads at once (Ray ``max_concurrency=2``): decoding
    the next shard overlaps the current shard's compute, which a lock keeps to one shard at a
    time. A CPU actor runs one call at a time on its main thread.

    Args:
        cfg: the run's config, as validated by the driver.
        threads: torch intra-op threads; None: this actor's share of its node's CPUs
            (:func:`pipeline.run.pool.actor_threads`), decided on the node it landed on.
        identity: the digest of the run's identity, recorded in every shard it writes.
        fence: the run's lock token; a shard is written only while the lock holds it.

    Raises:
        RuntimeError: Ray gave a GPU that torch cannot see (see :func:`_device`).
    """

    def __init__(
        self,
        cfg: AuditConfig,
        threads: int | None = None,
        identity: str | None = None,
        fence: str | None = None,
    ) -> None:
        self.identity, self.fence = identity, fence
        self.gpu_ids, self.node_id, assigned, node = _ray_placement()
        self.device, self.fake_gpu = _device(self.gpu_ids)
        if threads is None and node:
            threads = actor_threads(assigned.get("GPU", 0.0), assigned.get("CPU", 0.0), node)
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        # CPU forward passes reuse freed activation buffers instead of page-faulting fresh ones
        self.heap_tuned = tune_heap()
        self.cfg = cfg
        self.folder = RunFolder(str(cfg.output.dir))
        self.model, self.compute = worker_setup(cfg, self.device)
        self._compute = threading.Lock()
        self.source: Source | None = None

    def info(self) -> dict[str, Any]:
        """Where this worker runs: pid, host, Ray node id, assigned GPU ids, torch device,
        torch threads, whether calls run on the process's main thread, and the engine."""
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": self.node_id,
            "gpu_ids": self.gpu_ids,
            "device": str(self.device),
            "fake_gpu": self.fake_gpu,  # the test setting FAKE_GPUS_ENV: CPU in place of a GPU
            "threads": torch.get_num_threads(),
            # Ray runs a plain actor's calls on the main thread, a threaded actor's on a pool
            "main_thread": threading.current_thread() is threading.main_thread(),
            "engine": self.compute.engine_name,
            "engine_note": self.compute.engine_note,
            "heap_tuned": self.heap_tuned,
            "max_batch": self.compute.options.max_batch,
        }

    def process(self, shard: int, ref: ShardRef, banks: Banks | None = None) -> dict[str, Any]:
        """Read shard ``shard``'s rows (``ref``) from the source, compute them and store the
        shard in the run folder. ``banks``: the run's counterfactual banks, or None.

        Returns:
            counts and timing: ``{"shard", "images", "ok", "error", "failures", "seconds",
            "waited_seconds", "phases", "pid"}``; ``seconds`` is this shard's decode, compute
            and write time, without ``waited_seconds`` spent waiting for the other shard's
            compute; ``phases`` splits it (``read_decode_s``, ``kernel_s``, ``evidence_s``,
            ``metrics_s``, ``table_s``, ``write_s``).
        """
        t0 = time.perf_counter()
        phases: dict[str, float] = {}
        if self.source is None:  # opened on first use: actors start without reading data
            self.source = open_source(self.cfg.dataset)
        records = self.source.read(ref)
        evidence = banks.for_shard(records) if banks is not None else None
        loaded = load_shard(records, self.cfg)
        bank = load_bank(evidence, self.cfg) if evidence is not None else None
        t_wait = time.perf_counter()
        phases["read_decode_s"] = t_wait - t0
        with self._compute:
            # time spent waiting for the other call's compute is not this shard's work
            waited = time.perf_counter() - t_wait
            table = process_shard(
                self.model,
                records,
                self.cfg,
                shard,
                self.compute.options,
                loaded,
                evidence,
                bank,
                phases,
            )
        t_write = time.perf_counter()
        self.folder.write_shard(shard, table, identity=self.identity, fence=self.fence)
        phases["write_s"] = time.perf_counter() - t_write
        status = table.column("status").to_pylist()
        errors = table.column("error").to_pylist()
        ids = table.column("image_id").to_pylist()
        failures = [
            {"image_id": i, "error": e}
            for i, s, e in zip(ids, status, errors, strict=True)
            if s != "ok"
        ]
        return {
            "shard": shard,
            "images": len(ids),
            "ok": len(ids) - len(failures),
            "error": len(failures),
            "failures": failures,
            "seconds": time.perf_counter() - t0 - waited,
            "waited_seconds": waited,
            "phases": phases,
            "pid": os.getpid(),
        }
