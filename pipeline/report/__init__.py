"""The data-curation report: one self-contained HTML page, its figures and CSV tables.

Owns: collecting what the page shows (``build``), the matplotlib figures (``figures``), the
words and the jinja2 templates of the page (``html``, ``templates/``).

May import: ``pipeline.audit``, ``pipeline.run`` (the run folder), ``pipeline.kernel`` (map
expansion), ``pipeline.data`` (images for the galleries), ``pipeline.storage``,
``pipeline.schema``, ``pipeline.terminal`` (what the subcommands print). Never Ray.
"""

from pipeline.report.build import write_report

__all__ = ["write_report"]
