"""The data-curation report: an index page, a page per group, their figure files, a static
script and CSV tables; the compare, history and export outputs.

Owns: choosing what the pages show (``build``, ``scan``, ``group_pages``, ``review``), drawing
images and maps as files (``assets``) and charts (``figures``, ``run_charts``, ``pool_chart``),
the words, tables and jinja2 templates of the pages (``html``, ``names``, ``table``,
``templates/``, ``static/report.js``), report folders local or in a bucket (``outdir``).

May import: ``pipeline.audit``, ``pipeline.run`` (the run folder), ``pipeline.kernel`` (window
geometry, swaps), ``pipeline.data`` (images for the figures), ``pipeline.storage``,
``pipeline.schema``, ``pipeline.terminal`` (what the subcommands print). Never Ray.
"""

from pipeline.report.build import Limits, write_report

__all__ = ["Limits", "write_report"]
