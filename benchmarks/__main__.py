"""``python -m benchmarks``: see :mod:`benchmarks.run`; ``--scale``: :mod:`benchmarks.scale`;
``--audit``: :mod:`benchmarks.audit`."""

from __future__ import annotations

import sys

if "--scale" in sys.argv[1:]:
    from .scale import main
elif "--audit" in sys.argv[1:]:
    from .audit import main
else:
    from .run import main

sys.exit(main())
