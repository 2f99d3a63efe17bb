"""One refresh at a time across every sidecar that shares a credential through a store.

``SharedRefresh.fetch`` is what a ``TokenProvider`` calls instead of asking the token endpoint itself:

1. a token set in the store that is newer than the caller's and not yet due is taken as it is (no token
   request at all: this is how N sidecars make one token request per token lifetime);
2. otherwise the caller takes the store's lease, looks again (someone may have just finished), and refreshes
   with the store's refresh token, renewing the lease every third of its length while the token endpoint
   works, so that the lease never runs out under a slow refresh. The answer is written to the store (a
   rotated refresh token with it) before anything uses it, then the lease is released by compare-and-delete;
3. everyone else polls the store until the new set appears, never calling the token endpoint. A holder that
   died leaves a lease that expires (Redis) or is dropped by the kernel (file store); the next caller takes it
   over and refreshes with the newest refresh token that was written, which is the newest Cognito accepted;
4. a holder whose refresh failed leaves a hold-off note for the backoff's wait, its failure count carried on
   from the previous note: the others take the failure from it instead of asking the token endpoint in turn, so
   an outage or a refusal costs the fleet the token requests of one sidecar on one backoff schedule. A sidecar
   whose secret files changed looks past the note once.

When the store cannot be reached, the caller keeps the token it holds until its real expiry (the provider's
usual backoff applies); a credential known to rotate is never refreshed without the lease (the provider then
reports ``store_unavailable``), one that does not rotate is refreshed locally and the fallback is counted,
logged and shown by readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.errors import (
    STORE_RETRY,
    HeldOffError,
    PermanentTokenError,
    StoreError,
    StoreUnavailableError,
    TokenEndpointError,
    TokenError,
)
from proxy.logs import event
from proxy.store.base import DEFAULT_STORE_LEASE, Lease, Store
from proxy.tokens.grants import Grant
from proxy.tokens.keycheck import KeyCheck
from proxy.tokens.schedule import RefreshSchedule
from proxy.tokens.sealed import MAX_ORIGINS, MAX_RECENT, HoldOff, Record, Sealer, UnreadableRecord, lineage
from proxy.tokens.spec import TokenSpec
from proxy.tokens.token import TokenResponse, TokenSet

log = logging.getLogger("proxy.shared")

# How often a sidecar waiting for another's refresh looks at the store (and at whether the lease is gone).
POLL_INTERVAL = 0.05
# How long the member seeding a store that lost its data waits for the others' offers of newer refresh tokens: a
# member holding one it could not write offers it at every ``STORE_RETRY``.
OFFER_WINDOW = 2 * STORE_RETRY + 0.5


# What a record holds when a rotated refresh token must be kept but no usable answer came with it.
EMPTY_RESPONSE = TokenResponse(id_token=None, access_token=None, refresh_token=None, expires_in=None, token_type="")


class SharedRefresh:
    """The store side of one credential's refresh. Counters are read by /-/metrics."""

    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        grant: Grant,
        *,
        lease_seconds: float = DEFAULT_STORE_LEASE,
        poll_interval: float = POLL_INTERVAL,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.grant = grant
        self._lease_seconds = lease_seconds
        self._poll = poll_interval
        self._clock = clock
        self.rotates = False  # Cognito has rotated this credential's refresh token (told by the store or the grant)
        self._unsaved: Record | None = None  # a record the store refused or could not take: written first next time
        self.lock_waits = 0
        self.takeovers = 0
        self.errors = 0
        self.fallbacks = 0
        self.adopted = 0
        self.problem: str | None = None  # the store's trouble while it lasts, for readiness
        self._look_past_note = False
        self._distrust_held = False
        self.key_check = KeyCheck(store, sealer, clock=clock)
        self.generation = 0  # of the refresh token this member holds (see ``Record.generation``)
        self._seeded_from: Record | None = None  # the offer a refused re-seed went on with
        self._offering: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"SharedRefresh(store={self.store.name!r}, key={self.sealer.key!r})"

    @property
    def identity(self) -> str:
        """Tells members of this store and credential, under this key, from any other sharing (a digest)."""
        return hashlib.sha256(f"{self.store.name}\n{self.sealer.key}".encode()).hexdigest()[:16]

    async def fetch(self, spec: TokenSpec, schedule: RefreshSchedule, held: TokenSet | None) -> TokenSet:
        """A token set: the store's when it is newer and not due, else one refreshed under the lease."""
        waited = False
        while True:
            try:
                await self.key_check.look()
                record, note = await self._load()
                if record is not None and (tokens := self._adopt(record, spec, held)) is not None:
                    return tokens
                self._honour(note)
                lease = await self.store.acquire(self.sealer.key, self._lease_seconds)
            except StoreError as exc:
                return await self._without_store(exc, spec)
            if lease is not None:
                if lease.forced:
                    self._store_failed(
                        StoreError(
                            self.store.name,
                            "a refresh lock with no expiry (or longer than two leases), which no sidecar sets, was in "
                            "the way and was removed: someone who can write to the store without the key tried to "
                            "stop every refresh. Check who can reach the store (its password, its network)",
                        )
                    )
                return await self._refresh_holding(lease, spec, schedule, held)
            if record is not None and (tokens := spec.servable(record, held)) is not None:
                self.adopted += 1
                self._follow(record)
                return tokens  # due, but valid: served while the lease's holder refreshes
            if not waited:
                waited = True
                self.lock_waits += 1
                if record is None:
                    await self.offer_held()  # the store lost its data: the member seeding it may need this token
            await asyncio.sleep(self._poll)

    def credentials_changed(self) -> None:
        """Secret files changed: the next refresh looks past a hold-off note (it may have been about the old ones)."""
        self._look_past_note = True

    async def _load(self) -> tuple[Record | None, HoldOff | None]:
        blob, note_blob = await self.store.load(self.sealer.key)
        self._stored_ok()
        record = note = None
        try:
            if blob is not None:
                record = self.sealer.open_record(blob)
                self.rotates = self.rotates or record.rotates
            if note_blob is not None:
                note = self.sealer.open_note(note_blob)
        except UnreadableRecord as exc:
            log.warning(
                "the token store's record for this credential cannot be used (%s); it will be replaced",
                exc,
                extra=event("store_record_unreadable", store=self.store.name),
            )
        return record, note

    def _honour(self, note: HoldOff | None) -> None:
        """Raise the failure a hold-off note describes while it lasts, unless secrets changed since or this member
        holds a newer refresh token than the one that failed."""
        if note is None or self._look_past_note or note.generation < self.generation:
            return
        left = note.until - self._clock.time()
        if left <= 0:
            return
        if note.permanent:
            # status None: the answer was the other sidecar's (``TokenEndpointError`` would quote it as this one's).
            raise PermanentTokenError(
                flow=note.flow,
                status=None,
                error=note.error,
                body="",
                summary=f"Another sidecar sharing this credential was refused: {note.summary}",
                fix="fix the credential (see that sidecar's log), then update the secret files of every sidecar "
                "sharing it; each looks again once its files change.",
            )
        raise HeldOffError(
            flow=note.flow,
            error=note.error,
            summary=f"Another sidecar sharing this credential just failed to refresh it ({note.summary}); this "
            f"one waits {left:.1f} s with it instead of asking too.",
            fix="see the token endpoint's health; the sidecars keep trying.",
            retry_after=left,
            code=note.code,
            kind=note.kind,
        )

    def _adopt(self, record: Record, spec: TokenSpec, held: TokenSet | None) -> TokenSet | None:
        tokens = spec.adoptable(record, held)
        if tokens is None:
            return None
        self.adopted += 1
        self._follow(record)
        return tokens

    def _follow(self, record: Record) -> None:
        """Hold the store's refresh token in memory (the newest; it re-seeds a store that lost its data)."""
        configured = self.grant.configured
        if record.refresh_token and configured is not None and record.knows(self.sealer.fingerprint(configured)):
            self.grant.adopt(record.refresh_token)
            self.generation = record.generation

    async def _refresh_holding(
        self, lease: Lease, spec: TokenSpec, schedule: RefreshSchedule, held: TokenSet | None
    ) -> TokenSet:
        try:
            if lease.takeover:
                self.takeovers += 1
                log.warning(
                    "took over the refresh lease: the previous holder's lease ended without a release (it was "
                    "killed or hung mid-refresh); refreshing with the newest stored refresh token",
                    extra=event("store_lease_takeover", store=self.store.name, fence=lease.fence),
                )
            try:
                record, note = await self._load()
                reseeding = record is None
                record = await self._newest(lease, record)
            except StoreError as exc:
                return await self._without_store(exc, spec)
            if record is not None and (tokens := self._adopt(record, spec, held)) is not None:
                return tokens
            self._honour(note)
            self._look_past_note = False  # looked past once: this refresh is the new look
            origins = self._choose_refresh_token(record)
            used = self.grant.refresh_token
            renewer = asyncio.create_task(self._renew(lease), name="store-lease-renewal")
            try:
                response = await self._fetch(reseeding)
            except TokenError as exc:
                if self.grant.refresh_token != used:
                    # Rotated, then found wanting (an answer without a usable token): the new refresh token is
                    # all that works now, and must not be lost.
                    previous = record.response if record is not None else EMPTY_RESPONSE
                    await self._save(lease, self._record(previous, record, origins, rotated=True))
                await self._hold_off(exc, note, schedule)
                raise
            finally:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
            rotated = self.grant.refresh_token != used
            if self._seeded_from is not None:  # an offered refresh token worked: the lineage goes on from it
                record, self._seeded_from = self._seeded_from, None
            await self._save(lease, self._record(response, record, origins, rotated=rotated))
            try:
                return spec.token_set(response)
            except TokenError as exc:  # clock skew, an unusable token: the others would meet it too
                await self._hold_off(exc, note, schedule)
                raise
        finally:
            with contextlib.suppress(StoreError):
                await self.store.release(self.sealer.key, lease)

    async def _hold_off(self, error: TokenError, previous: HoldOff | None, schedule: RefreshSchedule) -> None:
        """Leave a note that holds the fleet off for the backoff of one schedule: failures count across holders."""
        failures = (previous.failures if previous is not None else 0) + 1
        seconds = schedule.hold_for(error, failures)
        endpoint = error if isinstance(error, TokenEndpointError) else None
        note = HoldOff(
            failures=failures,
            kind=error.failure_kind,
            until=self._clock.time() + seconds,
            permanent=error.permanent,
            code=error.code,
            summary=endpoint.summary if endpoint else str(error),
            flow=self.grant.flow,
            status=endpoint.status if endpoint else None,
            error=endpoint.error if endpoint else None,
            generation=self.generation,
        )
        try:
            await self.store.hold_off(self.sealer.key, self.sealer.seal_note(note))
        except StoreError as exc:
            self._store_failed(exc)

    def _choose_refresh_token(self, record: Record | None) -> tuple[str, ...]:
        """Point the grant at the refresh token to use; the lineage's origins for the record to be written."""
        configured = self.grant.configured
        if configured is None:
            return ()  # client_credentials: no refresh token
        mine = self.sealer.fingerprint(configured)
        if record is None or record.refresh_token is None:
            log.info(
                "the token store holds nothing for this credential (first start, or the store lost its data): "
                "seeding it with this sidecar's refresh token",
                extra=event("store_seeded", store=self.store.name),
            )
            return (mine,)
        if record.knows(mine):
            held = self.grant.refresh_token
            if (
                held is not None
                and held not in (configured, record.refresh_token)
                and not record.knows(self.sealer.fingerprint(held))
                and not self._distrust_held
            ):
                # This sidecar holds a refresh token the store never recorded, newer than the stored one: the store
                # went back in time (a Redis that lost its last writes). Cognito accepts only the newer one.
                log.warning(
                    "the token store's refresh token is older than the one this sidecar holds (the store lost its "
                    "latest writes): refreshing with this sidecar's",
                    extra=event("store_rolled_back", store=self.store.name),
                )
                self._distrust_held = True  # once: if Cognito refuses it, the store's is tried next
                return record.origins
            self._distrust_held = False
            self.grant.adopt(record.refresh_token)
            return record.origins
        log.warning(
            "the configured refresh token is not one the store has seen: taking it as a new login that replaces "
            "the stored one",
            extra=event("store_new_login", store=self.store.name),
        )
        self.grant.adopt(configured)
        self.generation = record.generation + 1
        return lineage(record.origins, mine, MAX_ORIGINS)

    def _record(
        self, response: TokenResponse, previous: Record | None, origins: tuple[str, ...], *, rotated: bool
    ) -> Record:
        refresh_token = self.grant.refresh_token
        self.rotates = self.rotates or rotated or (previous is not None and previous.rotates)
        self.generation = max(previous.generation if previous is not None else 0, self.generation) + int(rotated)
        recent = previous.recent if previous is not None else ()
        for token in (previous.refresh_token if previous is not None else None, refresh_token):
            if token:  # the previous one too: an offered record may not have it in its lineage yet
                recent = lineage(recent, self.sealer.fingerprint(token), MAX_RECENT)
        return Record(
            received=self._clock.time(),
            response=response,
            refresh_token=refresh_token,
            rotates=self.rotates,
            origins=origins,
            recent=recent,
            generation=self.generation,
        )

    async def _save(self, lease: Lease, record: Record) -> None:
        try:
            saved = await self.store.save(self.sealer.key, lease, self.sealer.seal_record(record))
        except StoreError as exc:
            self._store_failed(exc)
            saved = False
        else:
            if not saved:
                log.error(
                    "the refresh lease was lost before the new token set could be written (the store was out of "
                    "reach for longer than the lease); it is kept here and written at the next refresh",
                    extra=event("store_lease_lost", store=self.store.name, fence=lease.fence),
                )
        self._unsaved = None if saved else record
        if self._unsaved is not None and self._offering is None:
            self._offering = asyncio.create_task(self._keep_offering(), name="store-unsaved-record")

    async def _newest(self, lease: Lease, record: Record | None) -> Record | None:
        """The stored record, or one newer that must replace it, written now under ``lease``: this member's own
        unsaved one, or (when a store that lost its data is seeded again) the newest another member offers."""
        candidates = [r for r in (record, self._unsaved) if r is not None]
        if record is None and (self.rotates or self.grant.rotations):
            candidates += [offer for offer in await self._offered() if offer.generation > self.generation]
        newest = max(candidates, key=lambda r: r.generation, default=None)
        if newest is None or newest is record:
            self._unsaved = None  # the store holds this member's record already, or a newer one
            return record
        if newest is not self._unsaved:
            log.warning(
                "seeding the token store with the newest refresh token a member offered (generation %d; this "
                "sidecar holds %d)",
                newest.generation,
                self.generation,
                extra=event("store_seeded_from_offer", store=self.store.name),
            )
            self._follow(newest)
        await self._save(lease, newest)
        return newest

    async def _fetch(self, reseeding: bool) -> TokenResponse:
        """The refresh. Right after seeding a store that lost its data, an ``invalid_grant`` first tries the other
        refresh tokens members offered, newest first: only when none works does it hold the fleet off."""
        try:
            return await self.grant.fetch()
        except PermanentTokenError as exc:
            if not reseeding or exc.error != "invalid_grant":
                raise
            refused: PermanentTokenError = exc
        tried = {self.grant.refresh_token}
        with contextlib.suppress(StoreError):
            for offer in sorted(await self._offered(wait=False), key=lambda r: -r.generation):
                if offer.refresh_token is None or offer.refresh_token in tried:
                    continue
                tried.add(offer.refresh_token)
                log.warning(
                    "the refresh token this sidecar seeded the store with was refused; trying the one another member "
                    "offered (generation %d)",
                    offer.generation,
                    extra=event("store_seed_retried", store=self.store.name),
                )
                self._follow(offer)
                try:
                    response = await self.grant.fetch()
                    self._seeded_from = offer
                    return response
                except PermanentTokenError as exc:
                    if exc.error != "invalid_grant":
                        raise
                    refused = exc
        raise refused

    async def offer_held(self) -> None:
        """Offer the refresh token this member holds (a rotating credential's) to whoever seeds the store."""
        token = self.grant.refresh_token
        if token is None or not (self.rotates or self.grant.rotations):
            return
        held = Record(
            received=0.0,
            response=EMPTY_RESPONSE,
            refresh_token=token,
            rotates=True,
            origins=(self.sealer.fingerprint(self.grant.configured),) if self.grant.configured else (),
            generation=self.generation,
        )
        with contextlib.suppress(StoreError):
            await self.store.offer(self.sealer.key, self.sealer.seal_record(held))

    async def _offered(self, *, wait: bool = True) -> list[Record]:
        """What members offer within ``OFFER_WINDOW`` (at once unless ``wait``); as soon as one is newer than this
        member's token, that."""
        deadline = asyncio.get_running_loop().time() + (OFFER_WINDOW if wait else 0.0)
        while True:
            found = []
            for blob in await self.store.offers(self.sealer.key):
                with contextlib.suppress(UnreadableRecord):
                    found.append(self.sealer.open_record(blob))
            if any(r.generation > self.generation for r in found) or asyncio.get_running_loop().time() >= deadline:
                return found
            await asyncio.sleep(self._poll)

    async def _keep_offering(self) -> None:
        """Until the store takes this member's unsaved record (or holds a newer one): every ``STORE_RETRY``, write
        it under the lease, or offer it to whoever holds the lease."""
        try:
            while self._unsaved is not None:
                await asyncio.sleep(STORE_RETRY)
                unsaved = self._unsaved
                if unsaved is None:
                    break
                with contextlib.suppress(StoreError):
                    lease = await self.store.acquire(self.sealer.key, self._lease_seconds)
                    if lease is None:
                        await self.store.offer(self.sealer.key, self.sealer.seal_record(unsaved))
                        continue
                    try:
                        record, _ = await self._load()
                        if record is not None and record.generation >= unsaved.generation:
                            self._unsaved = None  # the store holds it, or a newer one
                        else:
                            await self._save(lease, unsaved)
                    finally:
                        await self.store.release(self.sealer.key, lease)
        finally:
            self._offering = None

    async def aclose(self) -> None:
        if self._offering is not None:
            self._offering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._offering

    async def _renew(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(self._lease_seconds / 3)
            try:
                held = await self.store.renew(self.sealer.key, lease, self._lease_seconds)
            except StoreError as exc:
                self._store_failed(exc)
                continue
            if not held:
                log.error(
                    "the refresh lease expired while the token endpoint was answering",
                    extra=event("store_lease_lost", store=self.store.name, fence=lease.fence),
                )
                return

    async def _without_store(self, error: StoreError, spec: TokenSpec) -> TokenSet:
        self._store_failed(error)
        if self.rotates or self.grant.rotations:
            self.rotates = True
            raise StoreUnavailableError(error, self.grant.flow)
        self.fallbacks += 1
        self.problem = (
            f"{error}; refreshing without it (this credential's refresh token does not rotate, so that is safe, "
            "but each sidecar now asks the token endpoint itself)"
        )
        log.warning("%s", self.problem, extra=event("store_fallback", store=self.store.name))
        return spec.token_set(await self.grant.fetch())

    def _store_failed(self, error: StoreError) -> None:
        self.errors += 1
        if self.problem is None:
            log.error("%s", error, extra=event("store_error", store=self.store.name, reason=error.reason))
        self.problem = str(error)

    def _stored_ok(self) -> None:
        if self.problem is not None:
            log.info("the token store %s answers again", self.store.name, extra=event("store_recovered"))
            self.problem = None
