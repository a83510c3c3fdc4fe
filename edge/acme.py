"""Certificates for verified custom domains: the leader's ACME (RFC 8555) HTTP-01 loop.

Every edge's master may run a :class:`CertificateManager`; it only works while its edge is
the leader (:mod:`edge.leader`). A pass (:meth:`CertificateManager.run_once`) finds the
verified domains that have no certificate, or one with less than a third of its lifetime
left, and whose backoff is over, and orders a certificate for each: the HTTP-01 challenge's
key authorization goes into ``acme_challenges``, where every edge answers the CA's request
for it (the validation may reach any edge node), and the order is finalized with a fresh
ECDSA P-256 key. The chain is stored with the key encrypted under the operator's secret
(:mod:`edge.secrets`); the edges' TLS side serves it from there. A failed order is recorded
on the domain (failures in a row, the error, the next attempt after a backoff doubling from
a minute to a day) for the admin API and the metrics.

The account key is in the database too (encrypted), one account per ACME directory, so any
leader uses the same account. The ``acme`` library (certbot's) speaks the protocol; it
blocks (requests), so its calls run in a worker thread while the database work stays on the
event loop. Passes run every ``interval`` seconds and when a domain gets verified (LISTEN
``zeitwork_acme``), one domain after another.

Limits: one name per certificate (no SANs grouping, no wildcards: those need DNS-01); a
certificate whose renewal keeps failing is served until it expires; a domain removed
mid-order gets no certificate stored. An order runs at most ``order_timeout`` seconds, plus
``challenge_delay`` for the edges to load its challenges; orders of a pass run one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import requests
from acme import challenges, crypto_util, errors, messages
from acme.client import ClientNetwork, ClientV2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC
from prometheus_client import CollectorRegistry, Counter, Gauge

from edge.config import LETS_ENCRYPT
from edge.leader import Leadership, Notifications, cancel_task
from edge.ratelimit import LogThrottle
from edge.secrets import SecretError, decrypt, encrypt
from edge.store import acme as store
from edge.store import certificates
from edge.store.errors import TRANSLATED, StoreError, translate, translated

log = logging.getLogger("edge.acme")

CHANNEL = "zeitwork_acme"
USER_AGENT = "zeitwork-edge (acme-python)"
_FAILURES: tuple[type[BaseException], ...] = (StoreError, *TRANSLATED)
_ERROR_LOG_INTERVAL = 30.0
_MAX_ERROR = 2000


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    """What the ACME loop needs; built from the edge's flags without side effects."""

    # The certificate secret (edge.secrets.load_secret): encrypts the keys at rest.
    secret: str = field(repr=False)
    # The CA's ACME directory (--acme-directory).
    directory_url: str = LETS_ENCRYPT
    # Contact of the account (--acme-email): the CA's expiry and policy mail goes there.
    email: str | None = None
    # PEM file of the roots that the ACME server's own HTTPS chains to (--acme-ca-bundle);
    # None: the system's.
    ca_bundle: str | None = None
    # Renew when less than this fraction of the certificate's lifetime is left.
    renew_fraction: float = 1 / 3
    # Seconds between passes (a verified domain also wakes the loop at once).
    interval: float = 60.0
    # Longest an order may take (authorizations, finalization), in seconds.
    order_timeout: float = 90.0
    # Seconds between storing a challenge and telling the CA to validate it: the time every
    # edge needs to load it (each reloads on the change notification, debounced).
    challenge_delay: float = 1.0
    # Timeout of each request to the ACME server, in seconds.
    request_timeout: int = 30
    # The first failure's backoff, doubled with each failure in a row up to max_backoff.
    backoff: float = 60.0
    max_backoff: float = 86400.0
    # Orders in one pass at most; the rest wait for the next.
    max_orders_per_pass: int = 20


@dataclass(frozen=True, slots=True)
class OrderResult:
    """What became of one domain's order in a pass."""

    domain: str
    ok: bool
    error: str | None = None
    not_after: dt.datetime | None = None


class AcmeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.orders = Counter(
            "zeitwork_acme_orders_total",
            "Certificate orders this edge made as leader, by result (ok, failed).",
            ["result"],
            registry=registry,
        )
        self.certificates = Gauge(
            "zeitwork_certificates",
            "Verified custom domains by certificate status (issued, pending: waiting for the"
            " first, failed: the last order failed and no valid certificate is left).",
            ["status"],
            registry=registry,
        )
        self.expiry = Gauge(
            "zeitwork_certificate_expiry_seconds",
            "Seconds until the soonest expiry among the verified domains' certificates"
            " (negative: expired; +Inf: none).",
            registry=registry,
        )
        self.expiry.set(float("inf"))


@dataclass(slots=True)
class _Challenge:
    """One HTTP-01 challenge of an order: what the CA asks for and what edges answer."""

    challb: messages.ChallengeBody
    response: challenges.ChallengeResponse
    token: str
    key_authorization: str


class _Session:
    """The ACME client of one pass. Blocking (requests): every method runs in a thread."""

    def __init__(self, settings: AcmeSettings, account_key: JWK) -> None:
        self.settings = settings
        self.key = account_key
        self.net = ClientNetwork(
            account_key,
            alg=ES256,
            user_agent=USER_AGENT,
            timeout=settings.request_timeout,
        )
        if settings.ca_bundle:
            # requests takes a CA bundle's path where acme's annotation says bool.
            cast(Any, self.net).verify_ssl = settings.ca_bundle
        directory = ClientV2.get_directory(settings.directory_url, self.net)
        self.client = ClientV2(directory, self.net)

    def close(self) -> None:
        self.net.session.close()

    def use_account(self, uri: str) -> None:
        self.net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())

    def register(self, email: str | None) -> str:
        """The account's URI: a new account for the key, or the one it has already (with
        its contact updated to ``email``)."""
        registration = messages.NewRegistration.from_data(email=email, terms_of_service_agreed=True)
        try:
            return self.client.new_account(registration).uri
        except errors.ConflictError as exc:
            # RFC 8555 7.3.1: the key has an account; its URL comes back.
            self.use_account(exc.location)
            contact = messages.Registration.from_data(email=email, contact=())
            account = self.net.account
            assert account is not None
            return self.client.update_registration(account, contact).uri

    def order(self, domain: str, csr_pem: bytes) -> tuple[messages.OrderResource, list[_Challenge]]:
        """A new order for ``domain``, and the HTTP-01 challenges it needs answered."""
        order = self.client.new_order(csr_pem)
        pending = []
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # the CA still trusts an earlier validation
            for challb in authz.body.challenges:
                if isinstance(challb.chall, challenges.HTTP01):
                    response, validation = challb.response_and_validation(self.key)
                    token = challb.chall.encode("token")
                    pending.append(_Challenge(challb, response, token, validation))
                    break
            else:
                offered = ", ".join(c.chall.typ for c in authz.body.challenges)
                raise errors.Error(
                    f"the CA offers no http-01 challenge for {authz.body.identifier.value}"
                    f" (only {offered or 'none'})"
                )
        return order, pending

    def finish(
        self, order: messages.OrderResource, pending: Sequence[_Challenge], timeout: float
    ) -> str:
        """Answer the challenges (their key authorizations must be served by then), wait for
        the validation, finalize; the PEM chain issued."""
        for challenge in pending:
            self.client.answer_challenge(challenge.challb, challenge.response)
        # acme compares the deadline with naive local time.
        deadline = dt.datetime.now() + dt.timedelta(seconds=timeout)
        finished = self.client.poll_and_finalize(order, deadline)
        if not finished.fullchain_pem:
            raise errors.Error("the CA finalized the order without a certificate")
        return str(finished.fullchain_pem)


def describe(exc: BaseException, timeout: float | None = None) -> str:
    """The one line an operator reads in ``last_error`` for a failed order."""
    if isinstance(exc, errors.ValidationError):
        problems = []
        for authz in exc.failed_authzrs:
            for challb in authz.body.challenges:
                if challb.error is not None:
                    problems.append(
                        f"{authz.body.identifier.value}: {challb.chall.typ} validation failed:"
                        f" {_problem(challb.error)}"
                    )
        return "; ".join(problems) or "the CA found the challenges invalid"
    if isinstance(exc, errors.IssuanceError):
        return f"the CA refused to issue the certificate: {_problem(exc.error)}"
    if isinstance(exc, errors.TimeoutError):
        within = f" within {timeout:g} s" if timeout is not None else ""
        return f"the order did not complete{within} (the CA is still validating or issuing)"
    if isinstance(exc, messages.Error):
        return f"the ACME server answered an error: {_problem(exc)}"
    if isinstance(exc, requests.RequestException):
        return f"cannot reach the ACME server: {exc}"
    if isinstance(exc, SecretError):
        return f"cannot use the ACME account key: {exc}"
    if isinstance(exc, errors.Error) and str(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _problem(error: messages.Error) -> str:
    kind = error.code or error.typ
    text = f"{kind}: {error.detail}" if error.detail else str(kind)
    for sub in error.subproblems or ():
        text += f"; {_problem(sub)}"
    return text


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_chain(domain: str, chain_pem: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The leaf of the chain, once it is known to be for ``domain`` and ``key``."""
    chain = x509.load_pem_x509_certificates(chain_pem.encode())
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(
        serialization.Encoding.DER, public
    ) != key.public_key().public_bytes(serialization.Encoding.DER, public):
        raise errors.Error("the CA issued a certificate for another key")
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if domain not in names.get_values_for_type(x509.DNSName):
        raise errors.Error(f"the CA issued a certificate that does not name {domain}")
    return leaf


class CertificateManager:
    """Orders and renews the verified domains' certificates while this edge leads.

    Wiring (the edge's master process)::

        secret = edge.secrets.load_secret(config.certificate_secret_file)  # or the env var
        if secret is not None:
            acme = CertificateManager(
                db.pool,
                AcmeSettings(
                    secret=secret,
                    directory_url=config.acme_directory,  # default: Let's Encrypt
                    email=config.acme_email,
                    ca_bundle=config.acme_ca_bundle,
                ),
                leader=leader_lock,  # edge.leader.LeaderLock
                dsn=db.dsn,  # for LISTEN zeitwork_acme; None: ticks only
                registry=registry,  # the admin port's CollectorRegistry
            )
            acme.start()
            ...
            await acme.stop()

    Without a secret nothing can be stored safely, so the master should not start it (and
    say so once in the log). ``leader=None`` makes the loop work unconditionally (a single
    edge, tests); :meth:`run_once` never looks at leadership.
    """

    def __init__(
        self,
        pool: Any,
        settings: AcmeSettings,
        *,
        leader: Leadership | None = None,
        dsn: str | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.leader = leader
        self.dsn = dsn
        self.metrics = AcmeMetrics(registry) if registry is not None else None
        self._clock = clock
        self._wake = asyncio.Event()
        self._notifications = (
            Notifications(dsn, (CHANNEL,), self._wake) if dsn is not None else None
        )
        self._task: asyncio.Task[None] | None = None
        self._errors = LogThrottle(_ERROR_LOG_INTERVAL)
        self._was_leader = False

    # -- the loop -------------------------------------------------------------------------

    @property
    def _leads(self) -> bool:
        return self.leader is None or self.leader.is_leader

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="acme")

    async def stop(self) -> None:
        """Stop the loop; an ACME request in flight finishes in its thread, unrecorded."""
        await cancel_task(self._task)
        self._task = None
        await self._drop_listener()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            if self._leads:
                if not self._was_leader:
                    log.info("ACME certificates managed by this edge (the leader)")
                    self._was_leader = True
                await self._listen()
                try:
                    await self.run_once()
                except _FAILURES as exc:
                    self._error(f"pass failed: {translate(exc)}")
            else:
                if self._was_leader:
                    log.info("ACME certificates no longer managed here: not the leader")
                    self._was_leader = False
                    if self.metrics is not None:
                        # The leader's gauges only, so that an alert fires once.
                        self.metrics.certificates.clear()
                        self.metrics.expiry.set(float("inf"))
                await self._drop_listener()
            # A follower looks again soon: it may take over the lock at any moment.
            wait = self.settings.interval if self._leads else min(self.settings.interval, 2.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _listen(self) -> None:
        if self._notifications is None:
            return
        try:
            await self._notifications.listen()
        except _FAILURES as exc:
            self._error(f"cannot listen for verified domains (ticks go on): {translate(exc)}")

    async def _drop_listener(self) -> None:
        if self._notifications is not None:
            await self._notifications.drop()

    def _error(self, message: str) -> None:
        if self._errors.allow(self._clock()) is not None:
            log.error("ACME: %s", message)

    # -- a pass ---------------------------------------------------------------------------

    async def run_once(self) -> list[OrderResult]:
        """One pass now: an order for every domain due (see the module's doc), one after
        another; what became of each. Database failures propagate (nothing is half stored:
        a certificate is stored in one transaction with its order's success)."""
        await store.delete_expired(self.pool)
        due = await store.due(
            self.pool,
            renew_fraction=self.settings.renew_fraction,
            limit=self.settings.max_orders_per_pass,
        )
        results: list[OrderResult] = []
        if due:
            try:
                session = await self._session()
            except StoreError:
                raise
            except Exception as exc:  # any failure of the CA or of the key
                error = describe(exc)
                log.error(
                    "ACME: cannot use the account at %s: %s", self.settings.directory_url, error
                )
                for domain in due:
                    await store.record_attempt(self.pool, domain.domain_id)
                    results.append(await self._failed(domain, error))
            else:
                try:
                    for domain in due:
                        if not self._leads:
                            break  # another edge carries on
                        results.append(await self._order(session, domain))
                finally:
                    session.close()
        await self._update_metrics()
        return results

    async def _session(self) -> _Session:
        """The ACME client with the directory's account: created (key and registration)
        the first time, registered again when the contact changed or the CA lost it."""
        url = self.settings.directory_url
        account = await store.get_account(self.pool, url)
        if account is None:
            new_key = ec.generate_private_key(ec.SECP256R1())
            blob = encrypt(self.settings.secret, _private_pem(new_key))
            account = await store.add_account(self.pool, url, key_encrypted=blob)
        pem = decrypt(self.settings.secret, account.key_encrypted)
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SecretError("the stored ACME account key is not an ECDSA key")
        session = await asyncio.to_thread(_Session, self.settings, JWKEC(key=key))
        try:
            if account.uri is None or account.contact != self.settings.email:
                uri = await asyncio.to_thread(session.register, self.settings.email)
                await store.set_registration(self.pool, url, uri=uri, contact=self.settings.email)
                log.info("ACME account at %s: %s", url, uri)
            else:
                session.use_account(account.uri)
        except BaseException:
            session.close()
            raise
        return session

    async def _order(self, session: _Session, domain: store.Due) -> OrderResult:
        name = domain.name
        started = await store.record_attempt(self.pool, domain.domain_id)
        if started is None:
            return OrderResult(name, ok=False, error="the domain was removed")
        what = (
            "renewing the certificate" if domain.not_after is not None else "ordering a certificate"
        )
        log.info("ACME: %s for %s", what, name)
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            csr = crypto_util.make_csr(_private_pem(key), [name])
            order, pending = await asyncio.to_thread(session.order, name, csr)
        except StoreError:
            raise
        except Exception as exc:  # a failed order, whatever failed in it
            return await self._order_failed(domain, exc)
        await store.record_order_url(self.pool, domain.domain_id, order.uri)
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.settings.order_timeout + 300)
        tokens: list[str] = []
        try:
            for challenge in pending:
                await store.put(
                    self.pool,
                    challenge.token,
                    key_authorization=challenge.key_authorization,
                    domain=name,
                    expires_at=expires,
                )
                tokens.append(challenge.token)
            if pending and self.settings.challenge_delay > 0:
                await asyncio.sleep(self.settings.challenge_delay)
            try:
                chain = await asyncio.to_thread(
                    session.finish, order, pending, self.settings.order_timeout
                )
                leaf = _check_chain(name, chain, key)
            except Exception as exc:  # as above
                return await self._order_failed(domain, exc)
        finally:
            for token in tokens:
                await store.delete(self.pool, token)
        not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        renew_at = not_after - (not_after - not_before) * self.settings.renew_fraction
        key_encrypted = encrypt(self.settings.secret, _private_pem(key))
        # Together, and only while the domain exists: one removed meanwhile keeps no key.
        with translated():
            async with self.pool.acquire() as conn, conn.transaction():
                if await store.record_success(conn, domain.domain_id, renew_at=renew_at) is None:
                    log.info("ACME: %s was removed during its order; certificate dropped", name)
                    return OrderResult(name, ok=False, error="the domain was removed")
                await certificates.store(
                    conn,
                    name,
                    cert_pem=chain,
                    key_encrypted=key_encrypted,
                    not_before=not_before,
                    not_after=not_after,
                    issuer=leaf.issuer.rfc4514_string(),
                )
        log.info(
            "ACME: certificate for %s issued by %s, valid until %s (renewal from %s)",
            name,
            leaf.issuer.rfc4514_string(),
            not_after.isoformat(timespec="seconds"),
            renew_at.isoformat(timespec="seconds"),
        )
        self._count("ok")
        return OrderResult(name, ok=True, not_after=not_after)

    async def _order_failed(self, domain: store.Due, exc: Exception) -> OrderResult:
        if isinstance(exc, messages.Error) and exc.code == "accountDoesNotExist":
            # The CA forgot the account (a test CA restarted): register the key again.
            await store.set_registration(
                self.pool, self.settings.directory_url, uri=None, contact=None
            )
        return await self._failed(domain, describe(exc, self.settings.order_timeout))

    async def _failed(self, domain: store.Due, error: str) -> OrderResult:
        error = error if len(error) <= _MAX_ERROR else error[: _MAX_ERROR - 3] + "..."
        order = await store.record_failure(
            self.pool,
            domain.domain_id,
            error,
            backoff=self.settings.backoff,
            max_backoff=self.settings.max_backoff,
        )
        if order is not None:
            when = (
                order.next_attempt_at.isoformat(timespec="seconds")
                if order.next_attempt_at
                else "?"
            )
            log.warning(
                "ACME: certificate order for %s failed (%d in a row; next attempt at %s): %s",
                domain.name,
                order.failures,
                when,
                error,
            )
        self._count("failed")
        return OrderResult(domain.name, ok=False, error=error)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.orders.labels(result).inc()

    async def _update_metrics(self) -> None:
        if self.metrics is None:
            return
        seen = await store.overview(self.pool)
        for status in ("issued", "pending", "failed"):
            self.metrics.certificates.labels(status).set(getattr(seen, status))
        if seen.soonest_expiry is None:
            self.metrics.expiry.set(float("inf"))
        else:
            self.metrics.expiry.set((seen.soonest_expiry - dt.datetime.now(dt.UTC)).total_seconds())
