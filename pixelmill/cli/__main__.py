"""``python -m pixelmill.cli``."""

from pixelmill.cli import run

run()
