"""How the occluded copies of one call are split into forward passes.

A batched forward pass may round differently at another batch size (CPU kernels pick their
blocking by it), so for a map to be bitwise the same whichever shard or neighbours its image
has, every copy of the image must go through passes of the same size in every call. Padding
every pass to ``max_batch`` rows does that, but wastes the engine's work whenever an image has
fewer copies than ``max_batch``: 169 copies padded to 256 rows cost 1.41x. Here the pass size
fits the number of copies per image instead; it depends only on that number and ``max_batch``,
which are the same for every image of a run (one window grid, one number of draws), never on
the shard or on how many images a call holds. Plain Python.
"""

from __future__ import annotations

__all__ = ["pass_rows", "pass_spans"]


def pass_rows(copies: int, max_batch: int) -> int:
    """Rows of every occluded pass when passes are fixed, for ``copies`` copies per image.

    - ``copies >= max_batch``: each image's copies are split into ``p = ceil(copies /
      max_batch)`` passes of ``ceil(copies / p)`` rows (the last of an image's passes padded to
      that), and a pass never holds two images;
    - ``copies < max_batch``: ``floor(max_batch / copies)`` whole images per pass, ``m * copies``
      rows; only the call's last pass is padded.

    Either way a pass has at most ``max_batch`` rows and more than ``max_batch / 2``, and the
    size is a function of ``(copies, max_batch)`` alone: one image with 169 copies and
    ``max_batch`` 256 is one pass of 169 rows, 300 copies two passes of 150.

    Args:
        copies: ``c = K * P`` occluded copies per image (draws times windows), >= 1.
        max_batch: the most rows of a pass, >= 1.

    Raises:
        ValueError: ``copies`` or ``max_batch`` below 1.

    Example:
        >>> pass_rows(169, 256), pass_rows(300, 256), pass_rows(50, 256), pass_rows(256, 256)
        (169, 150, 250, 256)
    """
    if copies < 1 or max_batch < 1:
        raise ValueError(f"copies and max_batch must be >= 1, got {copies} and {max_batch}")
    if copies >= max_batch:
        passes = -(-copies // max_batch)  # ceil
        return -(-copies // passes)
    return (max_batch // copies) * copies


def pass_spans(n: int, copies: int, max_batch: int, fixed: bool) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of the ``n * copies`` copies, enumerated image-major, that go
    through the model together.

    Args:
        n: images in the call.
        copies: copies per image (``c``), the same for every image.
        max_batch: the most rows of a pass.
        fixed: passes of :func:`pass_rows` rows (the caller pads each to that), so that an
            image's passes are the same in every call; else ``max_batch`` copies at a time,
            mixing images (the fewest passes, no padding).

    Returns:
        Consecutive ranges covering ``range(n * copies)``, each at most ``max_batch`` long
        (at most ``pass_rows(copies, max_batch)`` when ``fixed``).
    """
    total = n * copies
    if not fixed:
        return [(q, min(q + max_batch, total)) for q in range(0, total, max_batch)]
    rows = pass_rows(copies, max_batch)
    if rows <= copies:  # an image's copies fill whole passes of their own
        return [
            (i * copies + j, i * copies + min(j + rows, copies))
            for i in range(n)
            for j in range(0, copies, rows)
        ]
    return [(q, min(q + rows, total)) for q in range(0, total, rows)]
