"""``python -m lowbit.cli``: the ``lowbit`` command."""

import sys

from . import main

sys.exit(main())
