"""JSON Web Key Sets: parsing them into pinned verification keys, and keeping them fresh.

Parsing (`parse_jwks`) turns a JWKS document into a `KeySet`: public keys
only, each pinned to the algorithms it may verify. Sources keep one
provider's `KeySet` current:

- `StaticKeys`: an inline JWKS, parsed once per snapshot.
- `FileKeys`: a file, re-read on the refresh interval when its mtime changed.
- `RemoteKeys`: a `jwks_uri`, fetched over HTTP or HTTPS with the small
  client below (asyncio + httptools + ssl; the sidecar never imports aiohttp).

Refresh is driven by use, never by a background loop: a request that finds
the keys older than the refresh interval starts one fetch and goes on with
the keys it has (stale while revalidating); a token whose `kid` is unknown
may start a fetch and wait for it, at most once per `UNKNOWN_KID_INTERVAL`
per source (so a stream of tokens with made-up kids costs one fetch per 30 s,
not one per request). A sidecar without traffic fetches nothing.

Invariants:
- A key verifies only with algorithms that are (a) allowed by its provider,
  (b) compatible with its key type and curve, and (c) its own `alg` if the
  JWK names one. `none` and HMAC algorithms are never in that set: a JWKS
  holds public keys, and an HMAC "secret" that is really a public key is the
  algorithm-confusion attack. Symmetric (`oct`) and private JWKs are refused.
- A failed refresh keeps the last good keys (and says why in `describe()`).
- At most one fetch per source is in flight; everything that wants fresh keys
  waits on that one.
- Everything is bounded: the response size, header size, key count, the time
  one fetch may take.
- PyJWT (and the `cryptography` it loads: ~20 MB of RSS together) is
  imported when the first key is parsed, so a sidecar without
  RequestAuthentication never loads it (`_verify_key`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

# A fetched JWKS larger than this is refused (real ones are a few KiB).
MAX_JWKS_BYTES = 256 * 1024
MAX_RESPONSE_HEAD_BYTES = 32 * 1024
MAX_KEYS = 64
FETCH_TIMEOUT = 5.0
# By default a token with an unknown kid triggers a fetch at most this often per source.
UNKNOWN_KID_INTERVAL = 30.0
# After a failed fetch, the next one is tried no sooner than this (seconds).
RETRY_AFTER_FAILURE = 5.0
MIN_RSA_BITS = 2048

# Which algorithms each key type (and curve) can verify. HMAC and `none` appear nowhere.
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS = {
    "P-256": frozenset({"ES256"}),
    "P-384": frozenset({"ES384"}),
    "P-521": frozenset({"ES512", "ES521"}),
    "secp256k1": frozenset({"ES256K"}),
}
_OKP_ALGS = {"Ed25519": frozenset({"EdDSA"}), "Ed448": frozenset({"EdDSA"})}
ASYMMETRIC_ALGORITHMS = _RSA_ALGS | frozenset().union(*_EC_ALGS.values(), *_OKP_ALGS.values())
# JWK members that only a private or symmetric key has.
_SECRET_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")


class JwksError(Exception):
    """A JWKS could not be fetched or parsed; `detail` says why (never key material)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One public key and the algorithms it may verify (never empty)."""

    kid: str | None
    key: Any  # a cryptography public key object
    algorithms: frozenset[str]


@dataclass(frozen=True, slots=True)
class KeySet:
    """Usable keys by kid; `skipped` says which JWKs were refused and why."""

    by_kid: Mapping[str, VerifyKey]
    all: tuple[VerifyKey, ...]
    skipped: tuple[str, ...]
    digest: str  # sha256 of the document: a change of keys changes it

    def kids(self) -> list[str | None]:
        return [k.kid for k in self.all]


EMPTY_KEYS = KeySet({}, (), (), "")


def parse_jwks(document: bytes | Mapping[str, Any], allowed: frozenset[str]) -> KeySet:
    """Parse a JWKS (`{"keys": [...]}`) into the keys usable with `allowed` algorithms.

    Raises JwksError when the document is not a JWKS at all; single keys that
    cannot be used are skipped and named in `skipped` (a JWKS may carry keys
    for other consumers: encryption keys, algorithms we do not allow).
    """
    if isinstance(document, bytes):
        if len(document) > MAX_JWKS_BYTES:
            raise JwksError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
        try:
            doc = orjson.loads(document)
        except orjson.JSONDecodeError:
            raise JwksError("JWKS is not valid JSON") from None
        digest = hashlib.sha256(document).hexdigest()
    else:
        doc = document
        digest = hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError('JWKS must be an object with a "keys" list')
    jwks = doc["keys"]
    if len(jwks) > MAX_KEYS:
        raise JwksError(f"JWKS has {len(jwks)} keys, more than {MAX_KEYS}")
    usable: list[VerifyKey] = []
    skipped: list[str] = []
    for i, jwk in enumerate(jwks):
        try:
            usable.append(_verify_key(jwk, allowed))
        except JwksError as exc:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            skipped.append(f"key {kid if isinstance(kid, str) else '#' + str(i)}: {exc.detail}")
    by_kid: dict[str, VerifyKey] = {}
    for key in usable:
        if key.kid is not None:
            if key.kid in by_kid:
                skipped.append(f"key {key.kid}: kid appears more than once (first one kept)")
                continue
            by_kid[key.kid] = key
    return KeySet(by_kid, tuple(usable), tuple(skipped), digest)


def _verify_key(jwk: Any, allowed: frozenset[str]) -> VerifyKey:
    # Once per key per JWKS load, never per request.
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
    from jwt.exceptions import InvalidKeyError, PyJWKError

    if not isinstance(jwk, dict):
        raise JwksError("not an object")
    kty = jwk.get("kty")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwksError("kid is not a string")
    if any(m in jwk for m in _SECRET_MEMBERS):
        raise JwksError("private or symmetric key material is never used (public keys only)")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise JwksError(f"use is {use!r}, not 'sig'")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise JwksError("key_ops does not include 'verify'")
    if kty == "RSA":
        compatible = _RSA_ALGS
        loader: Any = RSAAlgorithm
    elif kty == "EC":
        compatible = _EC_ALGS.get(jwk.get("crv"), frozenset())
        loader = ECAlgorithm
    elif kty == "OKP":
        compatible = _OKP_ALGS.get(jwk.get("crv"), frozenset())
        loader = OKPAlgorithm
    else:
        raise JwksError(f"key type {kty!r} is not an asymmetric signing key")
    algs = compatible & allowed
    alg = jwk.get("alg")
    if alg is not None:
        algs &= {alg}
    if not algs:
        raise JwksError(
            f"no allowed algorithm fits this key (kty {kty}, crv {jwk.get('crv')}, alg {alg})"
        )
    try:
        key = loader.from_jwk(jwk)
    except (InvalidKeyError, PyJWKError, ValueError, TypeError, KeyError) as exc:
        raise JwksError(f"invalid {kty} key: {type(exc).__name__}") from None
    if kty == "RSA" and key.key_size < MIN_RSA_BITS:
        raise JwksError(f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} required")
    return VerifyKey(kid, key, frozenset(algs))


# --------------------------------------------------------------------------
# Sources


Clock = Callable[[], float]


class KeySource:
    """One provider's keys and how fresh they are. Subclasses say how to load them.

    `keys` is what verification uses now; `maybe_refresh(now)` starts a
    background refresh when they are stale; `refresh_for_unknown_kid(now)`
    returns a future to wait on, or None when a refresh for an unknown kid
    ran too recently.
    """

    kind = "source"

    def __init__(
        self,
        allowed: frozenset[str],
        refresh: float,
        clock: Clock,
        *,
        min_refresh: float = UNKNOWN_KID_INTERVAL,
    ) -> None:
        self.allowed = allowed
        self.refresh_interval = refresh
        self.min_refresh = min_refresh  # an unknown kid refreshes at most this often
        self.clock = clock
        self.keys: KeySet = EMPTY_KEYS
        self.loaded = False  # keys were loaded at least once
        self.loaded_at = 0.0  # when the keys were last loaded (clock)
        self.attempted_at = -1e18  # when a load last started
        self.unknown_kid_at = -1e18  # when an unknown kid last triggered a load
        self.fetches = 0
        self.failures = 0
        self.last_error: str | None = None
        self.generation = 0  # bumps when the keys change
        self._inflight: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # -- what verification calls --------------------------------------------------

    def maybe_refresh(self, now: float) -> None:
        """Start a refresh if the keys are stale; never waits."""
        if self._inflight is not None:
            return
        if self.loaded and now - self.loaded_at < self.refresh_interval:
            return
        if self.last_error is not None and now - self.attempted_at < RETRY_AFTER_FAILURE:
            return  # the last attempt failed: do not hammer a source that is down
        self.start_refresh(now)

    def refresh_for_unknown_kid(self, now: float) -> asyncio.Future[None] | None:
        """A future that resolves once fresh keys are in, or None if not allowed now."""
        if self._inflight is not None:
            return self._inflight
        if now - self.unknown_kid_at < self.min_refresh:
            return None
        self.unknown_kid_at = now
        return self.start_refresh(now)

    def pending(self) -> asyncio.Future[None] | None:
        """The refresh in flight, if any (the first load: requests wait on it)."""
        return self._inflight

    # -- loading ---------------------------------------------------------------

    def start_refresh(self, now: float) -> asyncio.Future[None] | None:
        if self._inflight is not None:
            return self._inflight
        self.attempted_at = now
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # not on a loop (building a snapshot in a tool): nothing to fetch with
        done: asyncio.Future[None] = loop.create_future()
        self._inflight = done
        task = self._task = loop.create_task(self._refresh(done))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        return done

    async def _refresh(self, done: asyncio.Future[None]) -> None:
        self.fetches += 1
        try:
            keys = await self.load()
        except JwksError as exc:
            self.failures += 1
            self.last_error = exc.detail
        except asyncio.CancelledError:
            self.last_error = "refresh cancelled"
            raise
        except Exception as exc:  # a bug or an OS error: keep the last keys, say so
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
        else:
            self.install(keys)
        finally:
            if self._inflight is done:
                self._inflight = self._task = None
            if not done.done():
                done.set_result(None)

    def install(self, keys: KeySet) -> None:
        if keys.digest != self.keys.digest:
            self.generation += 1
        self.keys = keys
        self.loaded = True
        self.loaded_at = self.clock()
        self.last_error = None

    async def load(self) -> KeySet:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "kind": self.kind,
            "kids": self.keys.kids(),
            "skipped": list(self.keys.skipped),
            "loaded": self.loaded,
            "age_s": round(now - self.loaded_at, 3) if self.loaded else None,
            "refresh_interval_s": self.refresh_interval,
            "fetches": self.fetches,
            "failures": self.failures,
            "last_error": self.last_error,
            "refreshing": self._inflight is not None,
        }

    def close(self) -> None:
        """No longer used: a fetch in flight is cancelled, its waiters released."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None
        if self._inflight is not None and not self._inflight.done():
            self._inflight.set_result(None)
        self._inflight = None


# Refresh tasks, strongly held until they end (the loop keeps only weak references).
_tasks: set[asyncio.Task[None]] = set()


class StaticKeys(KeySource):
    """An inline JWKS: parsed when the snapshot is built, never refreshed."""

    kind = "inline"

    def __init__(
        self, document: str | bytes | Mapping[str, Any], allowed: frozenset[str], clock: Clock
    ) -> None:
        super().__init__(allowed, float("inf"), clock)
        if isinstance(document, str):
            document = document.encode()
        try:
            self.install(parse_jwks(document, allowed))
        except JwksError as exc:  # the loader validates inline JWKS; a bad one verifies nothing
            self.failures += 1
            self.last_error = exc.detail

    def maybe_refresh(self, now: float) -> None:
        return None

    def refresh_for_unknown_kid(self, now: float) -> asyncio.Future[None] | None:
        return None


class FileKeys(KeySource):
    """A JWKS file: read now, re-read on the refresh interval if its mtime changed."""

    kind = "file"

    def __init__(
        self,
        path: str,
        allowed: frozenset[str],
        refresh: float,
        clock: Clock,
        *,
        min_refresh: float = UNKNOWN_KID_INTERVAL,
    ) -> None:
        super().__init__(allowed, refresh, clock, min_refresh=min_refresh)
        self.path = path
        self._mtime: float | None = None
        try:
            self._read()
        except JwksError as exc:
            self.last_error = exc.detail
            self.failures += 1

    def start_refresh(self, now: float) -> asyncio.Future[None] | None:
        # A local file read is quick: done inline, no task, nothing to wait for.
        self.attempted_at = now
        self.fetches += 1
        try:
            self._read()
        except JwksError as exc:
            self.failures += 1
            self.last_error = exc.detail
        return None

    def _read(self) -> None:
        try:
            st = os.stat(self.path)
            if self.loaded and st.st_mtime == self._mtime:
                self.loaded_at = self.clock()
                return
            with open(self.path, "rb") as f:
                data = f.read(MAX_JWKS_BYTES + 1)
        except OSError as exc:
            raise JwksError(f"cannot read {self.path}: {exc.strerror}") from None
        self.install(parse_jwks(data, self.allowed))
        self._mtime = st.st_mtime

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": self.path}


class RemoteKeys(KeySource):
    """A `jwks_uri` fetched over HTTP(S)."""

    kind = "uri"

    def __init__(
        self,
        uri: str,
        allowed: frozenset[str],
        refresh: float,
        clock: Clock,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = FETCH_TIMEOUT,
        min_refresh: float = UNKNOWN_KID_INTERVAL,
    ) -> None:
        super().__init__(allowed, refresh, clock, min_refresh=min_refresh)
        self.uri = uri
        self.ssl_context = ssl_context
        self.timeout = timeout

    async def load(self) -> KeySet:
        status, body = await http_get(
            self.uri, timeout=self.timeout, max_body=MAX_JWKS_BYTES, ssl_context=self.ssl_context
        )
        if status != 200:
            raise JwksError(f"GET {self.uri} answered {status}")
        return parse_jwks(body, self.allowed)

    def describe(self) -> dict[str, Any]:
        parts = urlsplit(self.uri)
        shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        return {**super().describe(), "uri": shown}  # never userinfo


# --------------------------------------------------------------------------
# A small HTTP/1.1 client for one GET (JWKS documents): no pooling, no redirects.


_default_ssl: ssl.SSLContext | None = None


def default_ssl_context() -> ssl.SSLContext:
    """The system trust store (honours SSL_CERT_FILE / SSL_CERT_DIR), hostnames checked."""
    global _default_ssl
    if _default_ssl is None:
        _default_ssl = ssl.create_default_context()
    return _default_ssl


async def http_get(
    url: str,
    *,
    timeout: float = FETCH_TIMEOUT,
    max_body: int = MAX_JWKS_BYTES,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """(status, body) of one GET. Raises JwksError on anything but a complete response."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JwksError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host_header = parts.netloc.rpartition("@")[2]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nAccept: application/json\r\n"
        "User-Agent: lepton-mesh\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    loop = asyncio.get_running_loop()
    proto = _GetProtocol(loop.create_future(), max_body)
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                lambda: proto,
                parts.hostname,
                port,
                ssl=(ssl_context or default_ssl_context()) if tls else None,
                server_hostname=parts.hostname if tls else None,
            )
            try:
                transport.write(request)
                return await proto.done
            finally:
                transport.close()
    except TimeoutError:
        raise JwksError(f"GET {url}: no complete response within {timeout:g}s") from None
    except ssl.SSLError as exc:
        raise JwksError(f"GET {url}: TLS failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise JwksError(f"GET {url}: {exc.strerror or exc}") from None


class _GetProtocol(asyncio.Protocol):
    """Reads one response with httptools; bounded head and body."""

    def __init__(self, done: asyncio.Future[tuple[int, bytes]], max_body: int) -> None:
        self.done = done
        self.max_body = max_body
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.size = 0
        self.head = 0
        self.headers_done = False
        self.framed = False  # Content-Length or chunked: the parser knows where it ends

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"invalid HTTP response: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self.headers_done and not self.framed:  # body delimited by the close
            self.done.set_result((self.parser.get_status_code(), b"".join(self.body)))
        else:
            self._fail("connection closed before the response was complete")

    def _fail(self, detail: str) -> None:
        if not self.done.done():
            self.done.set_exception(JwksError(detail))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head += len(name) + len(value) + 4
        if self.head > MAX_RESPONSE_HEAD_BYTES:
            self._fail("response head too large")
            raise JwksError("response head too large")
        lname = name.lower()
        if lname in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            self._fail(f"response body larger than {self.max_body} bytes")
            raise JwksError("response body too large")
        self.body.append(body)

    def on_message_complete(self) -> None:
        if not self.done.done():
            self.done.set_result((self.parser.get_status_code(), b"".join(self.body)))
