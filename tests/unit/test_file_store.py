"""The directory store on a temporary directory: leases, fencing, hold-off notes, and the directory checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.errors import StoreError
from proxy.store import open_store
from proxy.store.file import FileStore


def store_in(tmp_path: Path) -> FileStore:
    store = open_store(f"file:{tmp_path / 'store'}")
    assert isinstance(store, FileStore)
    return store


async def test_one_lease_at_a_time_and_fences_grow(tmp_path: Path):
    store = store_in(tmp_path)
    first = await store.acquire("k", 5)
    assert first is not None and not first.takeover
    assert await store.acquire("k", 5) is None  # held
    assert (await store.holder("k") or "").endswith(f":{os.getpid()}")
    assert await store.save("k", first, b"blob-1")
    await store.release("k", first)
    assert await store.holder("k") is None
    second = await store.acquire("k", 5)
    assert second is not None and second.fence == first.fence + 1 and not second.takeover
    assert await store.load("k") == (b"blob-1", None)
    await store.release("k", second)
    assert not await store.save("k", second, b"late")  # a released lease writes nothing
    assert await store.load("k") == (b"blob-1", None)


async def test_a_lease_never_released_is_a_takeover(tmp_path: Path):
    store = store_in(tmp_path)
    lost = await store.acquire("k", 5)
    assert lost is not None
    assert isinstance(lost.handle, int)
    os.close(lost.handle)  # the holder died: the kernel dropped its flock, no release was written
    taken = await store.acquire("k", 5)
    assert taken is not None and taken.takeover
    await store.release("k", taken)


async def test_a_new_token_set_ends_a_hold_off(tmp_path: Path):
    store = store_in(tmp_path)
    await store.hold_off("k", b"note")
    assert await store.load("k") == (None, b"note")
    lease = await store.acquire("k", 5)
    assert lease is not None
    assert await store.save("k", lease, b"blob")
    assert await store.load("k") == (b"blob", None)
    await store.release("k", lease)


async def test_what_it_writes_is_private(tmp_path: Path):
    store = store_in(tmp_path)
    lease = await store.acquire("k", 5)
    assert lease is not None
    await store.save("k", lease, b"blob")
    await store.release("k", lease)
    assert (tmp_path / "store").stat().st_mode & 0o777 == 0o700
    for name in ("k.state", "k.lock", "k.fence"):
        assert (tmp_path / "store" / name).stat().st_mode & 0o077 == 0, name


def test_a_directory_others_may_write_is_refused(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StoreError, match="other users could write it; chmod 700 it"):
        open_store(f"file:{shared}")
    shared.chmod(0o1777)  # sticky, as /tmp: others could still plant a token set or a link where a file belongs
    with pytest.raises(StoreError, match="other users could write it"):
        open_store(f"file:{shared}")
    shared.chmod(0o700)
    assert isinstance(open_store(f"file:{shared}"), FileStore)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory of another user needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(StoreError, match="belongs to uid 65534"):
        open_store(f"file:{theirs}")


async def test_a_planted_lock_link_is_never_followed(tmp_path: Path):
    store = store_in(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "store" / "k.lock").symlink_to(victim)
    with pytest.raises(StoreError, match="opening the lock file"):
        await store.acquire("k", 5)
    with pytest.raises(StoreError, match="reading the lock file"):
        await store.holder("k")
    assert victim.read_text() == "precious"


def test_store_specs():
    assert open_store("memory") is None
    with pytest.raises(StoreError, match="unknown kind of store"):
        open_store("etcd://x")


def test_the_sealing_key_is_made_once_private_and_shared(tmp_path: Path):
    first = store_in(tmp_path)
    key = first.sealing_key()
    assert len(key) == 32 and first.key_made
    path = tmp_path / "store" / ".sealing-key"
    assert path.stat().st_mode & 0o777 == 0o600
    second = store_in(tmp_path)
    assert second.sealing_key() == key and not second.key_made
    assert [p.name for p in (tmp_path / "store").iterdir()] == [".sealing-key"]  # no temporary left


def test_a_sealing_key_that_is_not_private_or_is_a_link_is_refused(tmp_path: Path):
    store = store_in(tmp_path)
    store.sealing_key()
    path = tmp_path / "store" / ".sealing-key"
    path.chmod(0o644)
    with pytest.raises(StoreError, match=r"is not a private 32-byte key \(mode 0644"):
        store.sealing_key()
    path.unlink()
    planted = tmp_path / "planted"
    planted.write_bytes(b"p" * 32)
    path.symlink_to(planted)
    with pytest.raises(StoreError, match=r"opening \.sealing-key"):
        store.sealing_key()


def test_reseal_rewrites_only_what_the_upgrade_changes(tmp_path: Path):
    store = store_in(tmp_path)
    (tmp_path / "store" / "k.state").write_bytes(b"old")
    (tmp_path / "store" / "k.hold").write_bytes(b"keep")
    store.reseal("k", lambda blob: b"new" if blob == b"old" else None)
    assert (tmp_path / "store" / "k.state").read_bytes() == b"new"
    assert (tmp_path / "store" / "k.hold").read_bytes() == b"keep"


async def test_check_ins_are_kept_for_their_window(tmp_path: Path):
    store = store_in(tmp_path)
    assert await store.check_in("c", "mine", 1000.0, 60) == {"mine": 1000.0}
    assert await store.check_in("c", "theirs", 1030.0, 60) == {"mine": 1000.0, "theirs": 1030.0}
    assert await store.check_in("c", "mine", 1080.0, 60) == {"mine": 1080.0, "theirs": 1030.0}
    assert await store.check_in("c", "mine", 1100.0, 60) == {"mine": 1100.0}  # theirs is 70 s old: gone


async def test_offers_are_one_per_member_and_readable_by_all(tmp_path: Path):
    store = store_in(tmp_path)
    assert await store.offers("k") == []
    await store.offer("k", b"first")
    await store.offer("k", b"second")  # the same member: replaces its offer
    assert await store.offers("k") == [b"second"]
    assert await store.offers("other") == []


async def test_an_expired_offer_is_not_returned_and_is_removed(tmp_path: Path):
    store = store_in(tmp_path)
    await store.offer("k", b"old")
    (offer,) = (tmp_path / "store").glob("k.offer-*")
    os.utime(offer, (0, 0))  # written long ago
    assert await store.offers("k") == []
    assert not offer.exists()
