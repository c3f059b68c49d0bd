"""``python -m sqlalchemy_cmk.cli``: the ``sqlalchemy-cmk`` command."""

import sys

from . import main

sys.exit(main())
