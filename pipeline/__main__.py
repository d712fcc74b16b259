"""``python -m pipeline`` is the ``occlusion-audit`` command."""

import sys

from pipeline.cli import main

sys.exit(main())
