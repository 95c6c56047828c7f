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


def _write(text):
    def fill(tmp):
        (tmp / "adapter.txt").write_text(text)
    return fill


def test_replace_directory_swaps_whole_copies(tmp_path):
    out = tmp_path / "adapter"
    atomic.replace_directory(out, _write("old"))
    atomic.replace_directory(out, _write("new"))
    assert (out / "adapter.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing left aside


def test_replace_directory_keeps_the_old_copy_when_writing_fails(tmp_path):
    """The fault injected: the new adapter's writing dies half-way."""
    out = tmp_path / "adapter"
    atomic.replace_directory(out, _write("old"))

    def dies(tmp):
        (tmp / "adapter.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.replace_directory(out, dies)
    assert (out / "adapter.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_replace_directory_puts_the_old_copy_back_when_the_swap_fails(tmp_path, monkeypatch):
    """The fault injected: the rename of the new copy into place fails after the old one moved aside."""
    out = tmp_path / "adapter"
    atomic.replace_directory(out, _write("old"))
    real, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("killed")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="killed"):
        atomic.replace_directory(out, _write("new"))
    assert (out / "adapter.txt").read_text() == "old"
