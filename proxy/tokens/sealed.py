"""What a shared store holds for one credential, sealed so that reading the store is not enough to use it.

A credential's key and its encryption key both come from HKDF-SHA256 over the key material (the configured
store key, else the app client's secret) with the credential's identity (token URL, client id, grant, scopes)
as context:

- the store key name is an HMAC of the identity: it says nothing about the client, and two credentials never
  share one;
- the blob is AES-256-GCM with the key name as associated data: someone who can read (or write) the store but
  lacks the key material can neither read the tokens nor move a blob to another credential's key;
- refresh token fingerprints (to tell a person's new login from a replica's old seed) are HMACs too.

Without key material (a public client and no store key), the file store seals with a random key of its own
(``.sealing-key`` in its directory, 0600, made with it): the key name and fingerprints then come from public facts
only, so that they stay those of the records written before the store had a key. A Redis store stays plaintext
only where the operator opted in (``SIDECAR_TOKEN_STORE_PLAINTEXT``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.tokens.token import TokenResponse

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT = 1
_SALT = b"cognito-sidecar token store v1"
_SEALED = b"s1:"
_PLAIN = b"p1:"
# Fingerprints of refresh tokens the stored lineage has had: every origin (a configured value, e.g. a login) is
# kept, so that a replica that still reads an old Secret never takes it for a new login; of rotated ones, the last
# 64 (the refresh token file a process re-reads holds one of these; a sidecar holding one the store never
# recorded knows the store lost its latest writes).
MAX_ORIGINS = 16
MAX_RECENT = 64


class UnreadableRecord(ValueError):
    """The stored blob cannot be opened with this key (another key material, tampering, another format)."""


class Sealer:
    """Seals one credential's records. ``material`` is None for a public client: then ``local_key`` (the file
    store's own) seals, while key names and fingerprints come from the identity alone; with neither, plaintext."""

    def __init__(self, identity: str, material: bytes | None, *, local_key: bytes | None = None) -> None:
        self.sealed = material is not None or local_key is not None
        self._aead: AESGCM | None = None
        if material is not None:
            derived = _derive(material, identity)
            self._aead = _aead(derived[:32])
            self._mac = derived[32:]
        else:
            if local_key is not None:
                self._aead = _aead(_derive(local_key, identity)[:32])
            self._mac = hashlib.sha256(_SALT + identity.encode()).digest()
        self.key = "cognito-sidecar:" + hmac.new(self._mac, identity.encode(), hashlib.sha256).hexdigest()[:32]
        # Where every member says which key it seals with, whatever that key is, and what it says: a keyed check
        # value that tells two keys apart and reveals nothing of either.
        public = hashlib.sha256(_SALT + identity.encode()).digest()
        self.check_key = "cognito-sidecar:check:" + hmac.new(public, identity.encode(), hashlib.sha256).hexdigest()[:32]
        keyed = _derive(material, identity) if material else _derive(local_key, identity) if local_key else public
        self.check_value = hmac.new(keyed, b"key check", hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Sealer(key={self.key!r}, sealed={self.sealed})"

    def upgrade(self, blob: bytes) -> bytes | None:
        """``blob`` sealed, if it is a plaintext record written before this credential's store had a key."""
        if self._aead is None or not blob.startswith(_PLAIN):
            return None
        return self.seal(blob[len(_PLAIN) :])

    def fingerprint(self, value: str) -> str:
        return hmac.new(self._mac, value.encode(), hashlib.sha256).hexdigest()[:32]

    def seal(self, data: bytes) -> bytes:
        if self._aead is None:
            return _PLAIN + data
        nonce = os.urandom(12)
        return _SEALED + nonce + self._aead.encrypt(nonce, data, self.key.encode())

    def open(self, blob: bytes) -> bytes:
        """The sealed data; ``UnreadableRecord`` if this key did not seal it."""
        if blob.startswith(_SEALED):
            if self._aead is None:
                raise UnreadableRecord("the stored set is sealed and this sidecar has no key material")
            from cryptography.exceptions import InvalidTag

            try:
                return self._aead.decrypt(blob[3:15], blob[15:], self.key.encode())
            except InvalidTag:
                raise UnreadableRecord(
                    "the stored set was sealed with another key (SIDECAR_TOKEN_STORE_KEY or the client secret differ)"
                ) from None
        if blob.startswith(_PLAIN):
            if self._aead is not None:
                raise UnreadableRecord("the stored set is in plaintext but this sidecar seals: it is not trusted")
            return blob[3:]
        raise UnreadableRecord("the stored value is not a cognito-sidecar record")

    def seal_record(self, record: Record) -> bytes:
        return self.seal(json.dumps(record.to_json(), separators=(",", ":")).encode())

    def open_record(self, blob: bytes) -> Record:
        try:
            return Record.from_json(json.loads(self.open(blob)))
        except (ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, UnreadableRecord):
                raise
            raise UnreadableRecord(f"the stored record is malformed ({type(exc).__name__})") from None

    def seal_note(self, note: HoldOff) -> bytes:
        return self.seal(json.dumps(dataclasses.asdict(note), separators=(",", ":")).encode())

    def open_note(self, blob: bytes) -> HoldOff:
        try:
            return HoldOff(**json.loads(self.open(blob)))
        except (ValueError, TypeError) as exc:
            if isinstance(exc, UnreadableRecord):
                raise
            raise UnreadableRecord(f"the hold-off note is malformed ({type(exc).__name__})") from None


# cryptography is imported when a store is used, not by every serving process (about 10 MiB).
def _derive(material: bytes, identity: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=64, salt=_SALT, info=identity.encode()).derive(material)


def _aead(key: bytes) -> AESGCM:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


@dataclass(frozen=True)
class HoldOff:
    """Left in the store by a sidecar whose refresh failed: until ``until`` (wall clock), the others do not ask
    the token endpoint either. The rest describes the failure (never a token or a response body). A token set
    saved to the store removes it."""

    until: float
    permanent: bool
    code: str
    summary: str
    flow: str
    status: int | None = None
    error: str | None = None
    # Failed refreshes in a row across the fleet: the next holder's backoff continues from here.
    failures: int = 1
    kind: str = "transient"  # the failure's ``failure_kind``, for the others' metrics
    # The failed refresh token's place in the lineage (``Record.generation``): a member holding a newer one is
    # not held off by this note.
    generation: int = 0


@dataclass(frozen=True)
class Record:
    """One credential's shared state. ``received``: when the answer arrived, on the writer's wall clock;
    ``rotates``: Cognito has rotated this credential's refresh token (from then on it is never refreshed without
    the lease). Only the lease's holder writes it: the store checks the fencing value, the record need not carry it.
    ``generation`` counts the refresh tokens of the lineage (one more at each rotation or new login): of two records
    for one credential, the higher one holds the newer refresh token."""

    received: float
    response: TokenResponse = field(repr=False)
    refresh_token: str | None = field(repr=False)
    rotates: bool
    origins: tuple[str, ...] = ()
    recent: tuple[str, ...] = ()
    generation: int = 0

    def knows(self, fingerprint: str) -> bool:
        return fingerprint in self.origins or fingerprint in self.recent

    def to_json(self) -> dict[str, Any]:
        r = self.response
        return {
            "format": FORMAT,
            "received": self.received,
            "response": {
                "id_token": r.id_token,
                "access_token": r.access_token,
                "expires_in": r.expires_in,
                "token_type": r.token_type,
            },
            "refresh_token": self.refresh_token,
            "rotates": self.rotates,
            "origins": list(self.origins),
            "recent": list(self.recent),
            "generation": self.generation,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        if data["format"] != FORMAT:
            raise ValueError("format")
        answer = data["response"]
        return cls(
            received=float(data["received"]),
            response=TokenResponse(
                id_token=answer.get("id_token"),
                access_token=answer.get("access_token"),
                refresh_token=None,
                expires_in=answer.get("expires_in"),
                token_type=str(answer.get("token_type", "Bearer")),
            ),
            refresh_token=data.get("refresh_token"),
            rotates=bool(data["rotates"]),
            origins=tuple(data.get("origins", ())),
            recent=tuple(data.get("recent", ())),
            generation=int(data.get("generation", 0)),
        )


def lineage(previous: tuple[str, ...], added: str, limit: int) -> tuple[str, ...]:
    """``previous`` plus ``added`` (once, newest last), at most ``limit`` long."""
    kept = (*(item for item in previous if item != added), added)
    return kept[-limit:]
