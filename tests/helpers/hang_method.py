"""A training method for the timeout tests: LoRA whose steps stop after the first few.

``after_step`` sleeps for an hour once ``HANG_AFTER`` steps have run in this process, as a
job does whose GPU collective, driver or storage read never returns.
"""

from __future__ import annotations

import time

from pixelmill.registry import register
from pixelmill.tasks.train.methods import LoRA

HANG_AFTER = 2


@register("train", "lora_hangs", settings=("rank", "alpha", "target_modules"))
class HangingLoRA(LoRA):
    steps_run = 0

    def after_step(self) -> None:
        super().after_step()
        HangingLoRA.steps_run += 1
        if HangingLoRA.steps_run >= HANG_AFTER:
            time.sleep(3600)
