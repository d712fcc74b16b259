"""Storage: where bytes live and how they are written.

Owns: local paths and ``s3://``, ``gs://``, ``hf://`` and ``http(s)://`` addresses (``uri``),
pyarrow filesystems with their credentials and endpoints, Hugging Face Hub file references and
the Hub cache (``hub``), and the one atomic write every writer of the package uses (``atomic``).

May import: nothing else of ``pipeline`` (it is the bottom layer). Never Ray, torch or pandas.
"""
