"""Secret files: written atomically and privately, and warned about when others can reach them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proxy.files import link_inside
from proxy.secrets import FileUseLock, Secret, exposure, read_secret_file, write_secret_file


def test_atomic_secret_file_is_private_and_whole(tmp_path: Path):
    target = tmp_path / "refresh-token"
    target.write_text("old\n")
    target.chmod(0o644)
    write_secret_file(target, "new-token")
    assert read_secret_file(target) == "new-token"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refresh-token"]  # no temporary left behind


def test_secret_files_open_to_other_users_are_warned_about(tmp_path: Path):
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o700)
    secret = folder / "client_secret"
    secret.write_text("s\n")
    secret.chmod(0o600)
    assert exposure(secret) is None
    secret.chmod(0o644)
    assert "has mode 0644" in (exposure(secret) or "")
    secret.chmod(0o640)  # readable by the file's group, which is this process's own (Kubernetes' fsGroup): fine
    assert exposure(secret) is None
    secret.chmod(0o600)
    folder.chmod(0o777)
    assert "directory" in (exposure(secret) or "")
    folder.chmod(0o1777)  # sticky, like /tmp: others cannot replace the file, but can plant names beside it
    assert "shared directory other users can create files in" in (exposure(secret) or "")
    folder.chmod(0o755)  # others may list names only: fine
    assert exposure(secret) is None


def test_the_lock_beside_a_refresh_token_never_follows_a_planted_link(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    token = tmp_path / "refresh_token"
    token.write_text("r\n")
    lock = FileUseLock(token)
    lock.path.symlink_to(victim)  # planted by someone who can create entries in the directory
    said = lock.acquire()
    assert said is not None and "left untouched" in said and str(tmp_path) in said
    assert victim.read_text() == "precious\n"
    lock.path.unlink()
    os.link(victim, lock.path)  # a hard link to another file: its content is not the lock's to truncate
    assert "left untouched" in (lock.acquire() or "")
    assert victim.read_text() == "precious\n"
    lock.path.unlink()
    assert lock.acquire() is None  # a lock file of its own: taken, and it holds this process's pid
    assert lock.path.read_text().split()[0] == str(os.getpid())
    assert lock.path.stat().st_mode & 0o777 == 0o600
    lock.release()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another user needs root")
def test_a_lock_file_of_another_user_is_left_alone(tmp_path: Path):
    token = tmp_path / "refresh_token"
    token.write_text("r\n")
    lock = FileUseLock(token)
    lock.path.write_text("theirs")
    os.chown(lock.path, 65534, 65534)
    assert "left untouched" in (FileUseLock(token).acquire() or "")
    assert lock.path.read_text() == "theirs"


def test_only_a_change_of_the_file_is_a_new_value(tmp_path: Path):
    path = tmp_path / "token"
    path.write_text("v0\n")
    secret = Secret("v0", path)
    secret.replace("v1")  # rotated; the file could not take it
    assert not secret.reload() and secret.value == "v1"  # the unchanged file does not undo the rotation
    path.write_text("v1\n")
    secret.replace("v1", written=True)
    path.write_text("v0\n")  # an old copy came back
    assert not secret.reload(retired=lambda value: value == "v0") and secret.value == "v1"
    path.write_text("login\n")  # a person's new value
    assert secret.reload(retired=lambda value: value == "v0") and secret.value == "login"
    assert secret.restore() and secret.value == "v1"  # refused: back to the one before
    assert not secret.reload()  # the refused value is not taken again from the same file


def test_a_link_inside_its_directory_is_written_through(tmp_path: Path):
    stamped = tmp_path / "..2026_12_06"
    stamped.mkdir()
    (stamped / "token").write_text("old\n")
    (tmp_path / "..data").symlink_to(stamped.name)
    (tmp_path / "token").symlink_to("..data/token")
    assert link_inside(tmp_path / "token") == stamped.resolve() / "token"
    assert write_secret_file(tmp_path / "token", "new") == stamped.resolve() / "token"
    assert (tmp_path / "token").is_symlink() and read_secret_file(tmp_path / "token") == "new"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "token").write_text("x\n")
    (stamped / "away").symlink_to(outside / "token")
    assert link_inside(stamped / "away") is None  # leads out of its directory: replaced, as any file
    assert link_inside(stamped / "token") is None  # not a link


def test_a_later_process_on_the_same_file_is_seen_by_the_first_unless_they_share_a_store(tmp_path: Path):
    token = tmp_path / "refresh_token"
    token.write_text("r\n")
    first, member, outsider = FileUseLock(token), FileUseLock(token), FileUseLock(token)
    assert first.acquire("store-a") is None
    assert first.contender() is None
    assert member.acquire("store-a") is None  # the same token store: sharing the file is the point
    assert first.contender() is None
    said = outsider.acquire("")
    assert said is not None and "through another token store or store key" in said
    seen = first.contender()
    assert seen is not None and f"pid {os.getpid()}" in seen
    outsider.release()  # gone: the kernel dropped its lock
    assert first.contender() is None
    for lock in (first, member):
        lock.release()
