"""``python -m locoprop``: the command line (see :mod:`locoprop.harness.cli`)."""

import sys

from .harness.cli import main

sys.exit(main())
