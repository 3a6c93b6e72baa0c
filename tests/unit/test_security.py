"""Security rules that can be read off the source: no remote code, no pickles."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pixelmill"


def _sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in PACKAGE.rglob("*.py")}


def test_no_trust_remote_code():
    uses = [(name, m.group(0)) for name, text in _sources().items()
            for m in re.finditer(r"trust_remote_code\s*=\s*\w+", text)]
    assert uses, "the transformers loader should say trust_remote_code=False explicitly"
    assert all(u.replace(" ", "").endswith("=False") for _, u in uses), uses


def test_no_pickle_loading():
    bad = []
    for name, text in _sources().items():
        if re.search(r"^\s*(import pickle|from pickle import|import dill|import cloudpickle)", text, re.M):
            bad.append(f"{name}: imports a pickle module")
        if "allow_pickle=True" in text:
            bad.append(f"{name}: allow_pickle=True")
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.end(): text.find(")", m.end()) + 1]
            if "weights_only=True" not in call:
                bad.append(f"{name}: torch.load without weights_only=True")
        for m in re.finditer(r"\.from_pretrained\(", text):
            call = text[m.end(): m.end() + 400]
            if "use_safetensors=False" in call:
                bad.append(f"{name}: use_safetensors=False")
    assert not bad, bad


def test_pickled_weights_are_refused_saying_why(tmp_path):
    import pytest

    from pixelmill.models.loading import ModelNotFound, check_model_reference

    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelNotFound, match=r"unet/diffusion_pytorch_model.bin.*only \.safetensors"):
        check_model_reference(str(folder))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"{}")
    check_model_reference(str(folder))  # a safetensors file next to it: the pickle is never read
    (tmp_path / "clip.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ModelNotFound, match="is a pickled checkpoint"):
        check_model_reference(str(tmp_path / "clip.pt"), "clip")
