"""``python -m linearize.cli`` is the ``linearize`` command."""

import sys

from linearize.cli import main

sys.exit(main())
