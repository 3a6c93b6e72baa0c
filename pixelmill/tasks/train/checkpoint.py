"""Job storage: checkpoints, the job record and the loss log, on any fsspec URL.

A checkpoint is a folder ``checkpoints/step-NNNNNN/`` holding safetensors files and
JSON, never pickles: the method's tensors, the optimiser's tensors (its non-tensor
state in JSON), the EMA averages. It is written under a temporary name and renamed
once complete, and ``state.json`` is written last, so a job killed mid-write leaves
no checkpoint that looks whole.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pixelmill.datasets import storage

STEP_PREFIX = "step-"


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "state_meta": meta}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["state_meta"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


class JobStore:
    """The files of one job under ``url`` (``jobs/<id>/`` of a campaign)."""

    def __init__(self, url: str) -> None:
        self.url = str(url)

    def path(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    # -- job record -------------------------------------------------------------------
    def record(self) -> dict[str, Any] | None:
        """``job.json``: status, step, attempts, artifacts, metrics; None for a new job."""
        url = self.path("job.json")
        if not storage.exists(url):
            return None
        return json.loads(storage.read_text(url))

    def update_record(self, **fields: Any) -> dict[str, Any]:
        rec = self.record() or {}
        rec.update(fields)
        rec["updated"] = time.time()
        storage.write_text_atomic(self.path("job.json"), json.dumps(rec, indent=2, default=str))
        return rec

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint_steps(self) -> list[int]:
        """Steps with a complete checkpoint (``state.json`` present), ascending."""
        steps = []
        for name in storage.listdir(self.path("checkpoints")):
            if name.startswith(STEP_PREFIX) and storage.exists(self.path("checkpoints", name, "state.json")):
                steps.append(int(name[len(STEP_PREFIX):]))
        return sorted(steps)

    def save_checkpoint(self, step: int, model: dict[str, torch.Tensor], optimizer: dict[str, Any],
                        ema: dict[str, torch.Tensor] | None, extra: dict[str, Any], keep: int) -> str:
        final = self.path("checkpoints", f"{STEP_PREFIX}{step:06d}")
        tmp = self.path("checkpoints", f".tmp-{step:06d}-{uuid.uuid4().hex[:8]}")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        storage.write_bytes(storage.join(tmp, "model.safetensors"),
                            st_save({k: v.detach().cpu().contiguous() for k, v in model.items()}))
        storage.write_bytes(storage.join(tmp, "optimizer.safetensors"), st_save(opt_tensors))
        storage.write_text_atomic(storage.join(tmp, "optimizer.json"), json.dumps(opt_meta))
        if ema is not None:
            storage.write_bytes(storage.join(tmp, "ema.safetensors"),
                                st_save({k: v.contiguous() for k, v in ema.items()}))
        storage.write_text_atomic(storage.join(tmp, "state.json"), json.dumps({"step": step, **extra}))
        storage.remove(final)
        storage.move(tmp, final, last=("state.json",))
        for old in self.checkpoint_steps()[:-keep]:
            storage.remove(self.path("checkpoints", f"{STEP_PREFIX}{old:06d}"))
        return final

    def load_checkpoint(self, step: int) -> dict[str, Any]:
        base = self.path("checkpoints", f"{STEP_PREFIX}{step:06d}")
        out = {
            "state": json.loads(storage.read_text(storage.join(base, "state.json"))),
            "model": st_load(storage.read_bytes(storage.join(base, "model.safetensors"))),
            "optimizer": _unflatten_optimizer(
                st_load(storage.read_bytes(storage.join(base, "optimizer.safetensors"))),
                json.loads(storage.read_text(storage.join(base, "optimizer.json"))),
            ),
            "ema": None,
        }
        if storage.exists(storage.join(base, "ema.safetensors")):
            out["ema"] = st_load(storage.read_bytes(storage.join(base, "ema.safetensors")))
        return out

    # -- loss log -------------------------------------------------------------------------
    def read_log(self) -> list[dict[str, Any]]:
        url = self.path("loss.jsonl")
        if not storage.exists(url):
            return []
        return [json.loads(line) for line in storage.read_text(url).splitlines() if line.strip()]

    def write_log(self, rows: list[dict[str, Any]]) -> None:
        storage.write_text_atomic(self.path("loss.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
