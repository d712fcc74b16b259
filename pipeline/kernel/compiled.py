"""Full forward passes through ``torch.compile`` (``occlusion.compile``, ``ComputeOptions``).

Inductor fuses a CNN's pointwise work into its convolutions: the seed-shaped CNN's full passes
(batch 32, 224x224, 2-core CPU) ran 1.4x faster compiled, with the same scores. The cost is a
compile per process (about 10-20 s for that CNN on a cold cache, well under a second when
inductor's on-disk cache has it) and a toolchain on the machine: a C++ compiler on CPU, Triton on
CUDA. So it is off by default, and a worker compiles while it starts (:func:`warm_up`), where a
missing compiler stops the run with one clear line instead of failing every shard.

Dynamo caches compiled code per code object and guards, so ``torch.compile(model)`` again for
the same model reuses what an earlier call compiled. An engine's layer-by-layer passes
(incremental, approximate) stay eager; with an engine only the unoccluded passes are compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.kernel.defaults import Precision
from pipeline.kernel.options import precision_context

__all__ = ["CompileError", "compiled", "warm_up"]

Model = Callable[[torch.Tensor], torch.Tensor]


class CompileError(ValueError):
    """``torch.compile`` could not compile the model (no C++ compiler, an unsupported op)."""


def compiled(model: Model) -> Model:
    """``model`` through ``torch.compile`` (inductor, shapes specialised until a second batch
    size is seen, then dynamic)."""
    return torch.compile(model)  # type: ignore[return-value]


@torch.inference_mode()
def warm_up(
    model: Model,
    image_shape: tuple[int, int, int],
    batches: Sequence[int],
    device: torch.device,
    precision: Precision | str,
    channels_last: bool,
) -> Model:
    """Compile ``model`` for the passes a worker runs, before its first shard.

    One pass per batch size in ``batches`` (the occluded and the unoccluded pass sizes), in the
    memory format and autocast of the real passes, so the first shard finds the code compiled.

    Args:
        model: the pixel-space model.
        image_shape: ``(C, H, W)``, pixels.
        batches: rows of the passes to compile for.
        device, precision, channels_last: as the passes run.

    Returns:
        The compiled model.

    Raises:
        CompileError: compiling or running the compiled model failed; the message names
            ``occlusion.compile`` and torch's reason.
    """
    import torch._inductor.config as inductor

    fast = compiled(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    # Inductor compiles in a pool of min(32, CPUs) processes by default; every actor on a large
    # node would start its own. The worker's torch threads are the CPUs Ray gave it.
    threads = max(1, torch.get_num_threads())
    try:
        with inductor.patch(compile_threads=min(threads, inductor.compile_threads)):
            for b in dict.fromkeys(batches):  # each size once, in order
                x = torch.rand((b, *image_shape), generator=gen).to(device)
                x = x.contiguous(memory_format=fmt)
                with precision_context(device, precision):
                    fast(x)
    except Exception as e:  # inductor raises many types (BackendCompilerFailed, CppCompileError)
        raise CompileError(
            "occlusion.compile: torch.compile could not compile the model "
            f"({_reason(e)}); set occlusion.compile: false"
        ) from e
    return fast


def _reason(e: BaseException) -> str:
    """``Type: first informative line`` of the error behind ``e`` (dynamo wraps the backend's
    error, whose own first line may only say that it raised)."""
    inner = getattr(e, "inner_exception", None) or e
    lines = [s.strip() for s in str(inner).splitlines() if s.strip()]
    useful = [s for s in lines if not s.endswith(("raised:", "error:", "error"))] or lines
    return f"{type(inner).__name__}: {useful[0][:300] if useful else ''}"
