"""An editing method for the stage-timeout tests: SDEdit that never returns on the rows it is told to.

``sdedit_hangs`` is SDEdit (same pipeline, same rows) except that a batch holding one of
``sdedit_hangs.hang_ids`` sleeps for an hour, as a call does whose driver or storage read
never returns; while the file ``sdedit_hangs.hang_setup_while`` exists, its set-up (model
loading) does too. With ``hang_while: FILE``, once the output has a committed shard every
call waits while FILE exists, touching ``FILE.reached`` when it starts waiting: a run held
mid-way until the test removes FILE (the cancellation tests). Configs name this module in
``plugins:``; the Ray workers import it when they unpickle the stage class (the tests'
``PYTHONPATH`` holds the repository).
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel, Field

from pixelmill.registry import register
from pixelmill.tasks.edit.sdedit import SDEditEditor, check_sdedit


class HangSettings(BaseModel):
    hang_ids: list[str] = Field(default_factory=list)
    hang_setup_while: str | None = None
    hang_while: str | None = None


@register("edit", "sdedit_hangs", text="prompt", needs_model=True, settings=HangSettings, check=check_sdedit)
class HangingSDEdit(SDEditEditor):
    method = "sdedit_hangs"

    def setup(self) -> None:
        flag = (self.config.get("sdedit_hangs") or {}).get("hang_setup_while")
        if flag and os.path.exists(flag):
            time.sleep(3600)
        super().setup()

    def __call__(self, batch):
        hold = (self.config.get("sdedit_hangs") or {}).get("hang_while")
        if hold and os.path.exists(hold):
            from pixelmill.datasets import read_manifest

            m = read_manifest(self.config["output"])
            if m and m.shards:  # a shard is committed: hold every later call
                open(hold + ".reached", "w").close()
                while os.path.exists(hold):
                    time.sleep(0.2)
        return super().__call__(batch)

    def row_inputs(self, row: dict, image) -> dict:
        hang = set((self.config.get("sdedit_hangs") or {}).get("hang_ids") or ())
        return {"hang": str(row["id"]) in hang}

    def edit_chunk(self, chunk: list[tuple]) -> list[dict]:
        if any(x[4].get("hang") for x in chunk):
            time.sleep(3600)
        return super().edit_chunk(chunk)
