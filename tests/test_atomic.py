"""Atomic writes (diffemb_jax/atomic.py): all or nothing, the user's umask modes, fsync'd first.

Oracle: the file system itself (os.stat modes against what the umask allows, listings after a
failed write) and the calls made to os.fsync."""

from __future__ import annotations

import os
import stat

import pytest

from diffemb_jax import atomic


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_a_file_gets_the_umask_modes_and_is_synced_before_the_rename(tmp_path, monkeypatch, umask_027):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(len(synced)), real_replace(a, b))[1])
    out = atomic.write_file(tmp_path / "v.txt", lambda f: f.write("hello"), text=True)
    assert out.read_text() == "hello"
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # 0666 under umask 027; mkstemp alone gives 0600
    assert renamed == [1] and len(synced) == 2  # the file before the rename, its folder after
    assert [p.name for p in tmp_path.iterdir()] == ["v.txt"]


def test_a_directory_gets_the_umask_modes_and_every_file_is_synced(tmp_path, monkeypatch, umask_027):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])

    def fill(tmp):
        (tmp / "a.bin").write_bytes(b"1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"2")

    out = atomic.write_directory(tmp_path / "model", fill)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # 0777 under umask 027; mkdtemp alone gives 0700
    assert (out / "sub" / "b.bin").read_bytes() == b"2"
    assert sum(p.endswith(("a.bin", "b.bin")) for p in synced) == 2
    assert sum(p.endswith("/sub") for p in synced) == 1


def test_a_failed_write_leaves_nothing(tmp_path):
    def fail(_):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic.write_file(tmp_path / "v.npy", fail)
    with pytest.raises(RuntimeError):
        atomic.write_directory(tmp_path / "model", fail)
    assert list(tmp_path.iterdir()) == []


def test_another_may_win_keeps_the_copy_already_in_place(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "theirs").write_text("first")
    atomic.write_directory(tmp_path / "cache", lambda tmp: (tmp / "mine").write_text("second"), another_may_win=True)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    with pytest.raises(OSError):
        atomic.write_directory(tmp_path / "cache", lambda tmp: (tmp / "mine").write_text("x"))
