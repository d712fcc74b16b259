"""Data: from a dataset on disk, in a bucket or on the Hub to the images and foregrounds a worker
computes on.

Owns: the sources of every format (``table``, ``huggingface``, ``coco``, ``webdataset``,
``imagefolder``) behind one interface (``source``), the structure a COCO file must have
(``coco_schema``), format detection (``detect``), the driver's
one streaming pass over a source (``plan``), Parquet/CSV row ranges (``rows``) and their text and
box columns (``columns``), the records
workers read (``records``), foregrounds from masks, class ids, boxes, COCO segments or a static
region (``foreground``), decoding with bounded reads (``images``), stored rows read back for the
report (``stored``) and the manifest helpers (``manifest``).

May import: ``pipeline.config``, ``pipeline.storage``, ``pipeline.schema``. Never Ray or the
kernel: data knows nothing of occlusion.
"""
