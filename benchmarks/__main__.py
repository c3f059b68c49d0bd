"""``python -m benchmarks``: see :mod:`benchmarks.run`; ``--scale``: :mod:`benchmarks.scale`."""

from __future__ import annotations

import sys

if "--scale" in sys.argv[1:]:
    from .scale import main
else:
    from .run import main

sys.exit(main())
