"""``python -m ppfr.cli VERB ...``: the same as the ``ppfr`` script."""

import sys

from ppfr.cli import main

sys.exit(main())
