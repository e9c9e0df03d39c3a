"""``python -m ppfr.deploy.gallery import SRC DST``: ``ppfr gallery``."""

from ppfr.deploy.gallery.importer import main

raise SystemExit(main())
