"""``python -m pixelmill.cli``."""

import sys

from pixelmill.cli import main

sys.exit(main())
