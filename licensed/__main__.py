"""``python -m licensed``: the same command line as ``licensed``."""

import sys

from .cli import main

sys.exit(main())
