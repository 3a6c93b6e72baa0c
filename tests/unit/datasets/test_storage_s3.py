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
    local = storage.get_dir(root, str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "a" / "note.txt").read_text() == "hello"
    storage.put_dir(local, storage.join(root, "again"))
    assert storage.read_text(storage.join(root, "again", "a", "note.txt")) == "hello"
    # A fresh process finds the server from the AWS files alone (what a Ray worker does).
    code = f"from pixelmill.datasets import storage; print(storage.read_text({storage.join(root, 'a', 'note.txt')!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello"
