"""storage.py against a real S3 API (moto's server on 127.0.0.1), reached only through the AWS files."""

from __future__ import annotations

import subprocess
import sys

from pixelmill.datasets import storage


def test_storage_round_trip_on_s3(s3_server, tmp_path):
    root = s3_server.url("unit", "storage")
    storage.write_text_atomic(storage.join(root, "a", "note.txt"), "hello")
    storage.write_bytes(storage.join(root, "a", "b.bin"), b"\x00\x01")
    assert storage.listdir(storage.join(root, "a")) == ["b.bin", "note.txt"]
    storage.move(storage.join(root, "a", "b.bin"), storage.join(root, "c", "b.bin"))
    assert not storage.exists(storage.join(root, "a", "b.bin"))
    assert storage.read_bytes(storage.join(root, "c", "b.bin")) == b"\x00\x01"
    assert storage.local_path(root) is None
    # a folder moves whole (a checkpoint's commit), its marker copied last
    storage.write_bytes(storage.join(root, "tmp-ckpt", "model.safetensors"), b"m")
    storage.write_text_atomic(storage.join(root, "tmp-ckpt", "sub", "state.json"), "{}")
    storage.move(storage.join(root, "tmp-ckpt"), storage.join(root, "step-1"), last=("state.json",))
    assert not storage.exists(storage.join(root, "tmp-ckpt"))
    assert storage.read_text(storage.join(root, "step-1", "sub", "state.json")) == "{}"
    assert storage.read_bytes(storage.join(root, "step-1", "model.safetensors")) == b"m"
    storage.remove(storage.join(root, "step-1"))
    local = storage.get_dir(root, str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "a" / "note.txt").read_text() == "hello"
    storage.sync_dir(local, storage.join(root, "again"), last="")
    assert storage.read_text(storage.join(root, "again", "a", "note.txt")) == "hello"
    # A fresh process finds the server from the AWS files alone (what a Ray worker does).
    code = f"from pixelmill.datasets import storage; print(storage.read_text({storage.join(root, 'a', 'note.txt')!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello"


def test_listings_are_fresh_when_another_process_writes(s3_server):
    """A long-lived process (a Ray worker) sees files another process added since it last listed."""
    root = s3_server.url("unit", "fresh")
    storage.write_bytes(storage.join(root, "a"), b"1")
    assert storage.listdir(root) == ["a"]
    s3_server.filesystem().pipe_file(storage.resolve(storage.join(root, "b"))[1], b"2")  # another client
    assert storage.listdir(root) == ["a", "b"]
    assert storage.exists(storage.join(root, "b"))


def test_remote_models_and_adapters_are_copied_once_per_content(s3_server, tmp_path):
    import pytest

    from pixelmill.models.adapters import LORA_FILE, AdapterError, adapter_fingerprint, adapter_kind
    from pixelmill.models.loading import ModelNotFound, check_model_reference, model_fingerprint

    adapter = s3_server.url("unit", "adapter", "artifacts")
    storage.write_bytes(storage.join(adapter, LORA_FILE), b"v1")
    first = storage.local_copy(adapter)
    assert first.startswith(str(storage.cache_dir())) and open(f"{first}/{LORA_FILE}", "rb").read() == b"v1"
    assert storage.local_copy(adapter) == first  # unchanged: no new copy
    assert adapter_kind(s3_server.url("unit", "adapter")) == "lora"  # a job folder finds its artifacts/
    fp1, mfp1 = adapter_fingerprint(adapter), model_fingerprint(adapter)
    storage.write_bytes(storage.join(adapter, LORA_FILE), b"v2")  # retrained: rewritten in place
    second = storage.local_copy(adapter)
    assert second != first and open(f"{second}/{LORA_FILE}", "rb").read() == b"v2"
    assert adapter_fingerprint(adapter) != fp1 and model_fingerprint(adapter) != mfp1
    with pytest.raises(AdapterError, match="not found"):
        adapter_kind(s3_server.url("unit", "no-such-adapter"))
    with pytest.raises(ModelNotFound, match="model_index.json"):
        check_model_reference(adapter)  # a folder, but not a pipeline
    with pytest.raises(ModelNotFound):
        model_fingerprint(s3_server.url("unit", "no-such-model"))
