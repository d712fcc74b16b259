"""Data: from a dataset on disk or in a bucket to the images and masks a worker computes on.

Owns: reading and validating manifests and turning their rows into records (``manifest``),
decoding and resizing images, masks and boxes with bounded reads (``images``).

May import: ``pipeline.config``, ``pipeline.storage``, ``pipeline.schema``. Never Ray or the
kernel: data knows nothing of occlusion.
"""
