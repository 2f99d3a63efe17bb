"""Secret files: written atomically and privately, and warned about when others can reach them."""

from __future__ import annotations

import stat
from pathlib import Path

from proxy.secrets import exposure, read_secret_file, write_secret_file


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
    folder.chmod(0o1777)  # sticky, like /tmp: others cannot replace the file
    assert exposure(secret) is None
    folder.chmod(0o755)  # others may list names only: fine
    assert exposure(secret) is None
