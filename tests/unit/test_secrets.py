"""Secret files: written atomically and privately, and warned about when others can reach them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proxy.secrets import FileUseLock, exposure, read_secret_file, write_secret_file


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
    assert lock.path.read_text() == str(os.getpid())
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
