"""Allow ``python -m noatimefs``."""

from __future__ import annotations

import sys

from noatimefs.cli import main

sys.exit(main())
