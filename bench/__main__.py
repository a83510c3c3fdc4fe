"""``python -m bench``: the whole proxy benchmark suite (:mod:`bench.proxy`)."""

import sys

from bench.proxy import main

sys.exit(main())
