"""``python -m ppfr.study``: the same as ``ppfr study``."""

import sys

from ppfr.study.cli import main

sys.exit(main())
