"""CURVE over tcp:// (docs/ARCHITECTURE.md, "Transport security"): the keys of each role, the
ZAP handler that lets into a hub only the public keys of the roles it serves, and the hub
sockets that then drop any message whose sender's identity is not of its key's role.

The keys come from `pagoda keys generate DIR`. ipc:// (one machine, a 0700 folder) needs none.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
import zmq.auth
import zmq.utils.z85

from protocol.config import EngineConfig

logger = logging.getLogger(__name__)

# The roles that hold a CURVE key pair, and which members each hub lets in.
ROLES = ("frontend", "scheduler", "tokenizer", "worker")
HUB_ACCEPTS = {"frontend": ("tokenizer",), "scheduler": ("tokenizer", "worker")}
PUBLIC_SUFFIX, SECRET_SUFFIX = ".key", ".key_secret"
# RFC 27: the ZAP handler of a context listens here, in that context.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
# A refused peer reconnects every 100 ms: say so once per peer and reason in this many seconds.
REFUSAL_LOG_INTERVAL_S = 30.0


class TransportSecurityError(ValueError):
    """Sockets that cannot be made as configured (keys missing or wrong): one line saying why."""


# ---- keys ------------------------------------------------------------------------------------


def needs_keys(addr: str) -> bool:
    """Whether `addr` reaches past this machine's users: anything but ipc:// and inproc://."""
    return not addr.startswith(("ipc://", "inproc://"))


def role_of(identity: str) -> str | None:
    """The role a member's identity claims: `tokenizer-0` a tokenizer, `worker-g1-0.hb` a worker."""
    return next((r for r in ("tokenizer", "worker") if identity.startswith(r)), None)


@dataclass(frozen=True)
class CurveKeys:
    """One socket's CURVE keys (z85): its role's pair, the hub's public key (a member's), the
    public keys a hub lets in with their roles."""

    role: str
    public: bytes
    secret: bytes
    server: bytes = b""
    peers: tuple[tuple[bytes, str], ...] = ()


_warned_plaintext: set[str] = set()


def transport_keys(
    config: EngineConfig | None, addr: str, identity: str | None = None, *, warn: bool = True
) -> CurveKeys | None:
    """The CURVE keys of the hub bound at `addr` (identity None) or of the member `identity`
    connecting to it; None for plaintext (ipc://, or tcp:// with --insecure-transport and no
    keys). Raises TransportSecurityError naming the flags when a key is missing or wrong."""
    if not needs_keys(addr):
        return None
    if config is None:
        raise TransportSecurityError(f"{addr}: sockets over tcp:// need the configuration's CURVE keys")
    public_dir, secret_file = config.curve_public_keys_dir, config.curve_secret_key_file
    if not public_dir and not secret_file:
        if not config.insecure_transport:
            role = role_of(identity) if identity is not None else _hub_name(config, addr)
            raise TransportSecurityError(
                f"{addr} is tcp:// and needs CURVE keys: make them with `pagoda keys generate DIR`, then give "
                f"--curve-public-keys-dir DIR/public and --curve-secret-key-file DIR/secret/{role or 'ROLE'}"
                f"{SECRET_SUFFIX} "
                "(or --insecure-transport, to send requests in plaintext to whoever reaches the port)"
            )
        if warn and addr not in _warned_plaintext:
            _warned_plaintext.add(addr)
            logger.warning("%s: plaintext and unauthenticated (--insecure-transport): whoever reaches this port "
                           "can submit and read requests; see `pagoda keys generate`", addr)
        return None
    if identity is None:
        role = _hub_of(config, addr)
    else:
        role = role_of(identity) or ""
        if not role:
            raise TransportSecurityError(f"{addr}: no CURVE role for the identity {identity!r} (tokenizer*, worker*)")
    if not public_dir or not secret_file:
        missing = "--curve-public-keys-dir" if not public_dir else "--curve-secret-key-file"
        raise TransportSecurityError(f"{addr}: CURVE needs both --curve-public-keys-dir and "
                                     f"--curve-secret-key-file; {missing} is missing")
    if os.path.isdir(secret_file):  # the folder of every role's secret key: `pagoda serve` on one host
        secret_file = os.path.join(secret_file, role + SECRET_SUFFIX)
    public, secret = _load_key(secret_file, role, secret=True)
    expected, _ = _load_key(os.path.join(public_dir, role + PUBLIC_SUFFIX), role)
    if public != expected:
        raise TransportSecurityError(
            f"{addr}: the secret key {secret_file} is not the {role}'s of {public_dir} ({role}{PUBLIC_SUFFIX}): "
            f"give --curve-secret-key-file DIR/secret/{role}{SECRET_SUFFIX} (or the folder DIR/secret)"
        )
    assert secret is not None
    if identity is not None:
        hub = _hub_of(config, addr)
        server, _ = _load_key(os.path.join(public_dir, hub + PUBLIC_SUFFIX), hub)
        return CurveKeys(role, public, secret, server=server)
    peers = tuple((_load_key(os.path.join(public_dir, r + PUBLIC_SUFFIX), r)[0], r) for r in HUB_ACCEPTS[role])
    if len({key for key, _ in peers}) != len(peers):
        raise TransportSecurityError(f"{public_dir}: two roles share one public key, so they cannot be told apart")
    return CurveKeys(role, public, secret, peers=peers)


def check_transport(config: EngineConfig, *roles: str) -> None:
    """Raise TransportSecurityError (one line) if a process of `roles` could not make its
    sockets: what each role binds or connects, with the keys it would use (an empty address
    is ipc://, as `EngineConfig.with_addresses` fills it in)."""
    front, sched = config.frontend_addr, config.scheduler_addr
    uses = {
        "frontend": [(front, None)],
        "scheduler": [(sched, None)],
        "tokenizer": [(front, "tokenizer"), (sched, "tokenizer")],
        "worker": [(sched, "worker")],
        "draft-worker": [(sched, "worker")],  # a worker* identity, holding the worker key
    }
    for role in roles:
        for addr, identity in uses[role]:
            if addr:
                transport_keys(config, addr, identity, warn=False)


def _hub_name(config: EngineConfig, addr: str) -> str | None:
    """Which hub binds `addr`: the frontend or the scheduler (None: neither address)."""
    return {config.scheduler_addr: "scheduler", config.frontend_addr: "frontend"}.get(addr)


def _hub_of(config: EngineConfig, addr: str) -> str:
    hub = _hub_name(config, addr)
    if hub is None:
        raise TransportSecurityError(f"{addr} is neither --frontend-addr nor --scheduler-addr: no hub key for it")
    return hub


def _load_key(path: str, role: str, secret: bool = False) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise TransportSecurityError(f"cannot read the {role}'s CURVE key {path}: {e} (see `pagoda keys generate`)"
                                     ) from None
    if secret and secret_key is None:
        raise TransportSecurityError(f"{path} holds no secret key: give the {role}{SECRET_SUFFIX} file")
    return public, secret_key


# ---- the hubs' side: ZAP, then each message's sender --------------------------------------


class _Throttled:
    """Log a refusal once per key and `REFUSAL_LOG_INTERVAL_S`, with how many were not logged."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, ...], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warning(self, key: tuple[str, ...], msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last, skipped = self._last.get(key, (-REFUSAL_LOG_INTERVAL_S, 0))
            if now - last < REFUSAL_LOG_INTERVAL_S:
                self._last[key] = (last, skipped + 1)
                return
            if len(self._last) > 10_000:  # many peers refused: start counting again
                self._last.clear()
            self._last[key] = (now, 0)
        more = f" ({skipped} more times since)" if skipped else ""
        logger.warning(msg + more, *args)


_refusals = _Throttled()


@dataclass
class _Domain:
    hub: str
    addr: str
    roles: dict[bytes, str]  # a public key (z85) -> the role it belongs to


class _ZapHandler:
    """The ZAP handler (RFC 27) of one ZeroMQ context, in a thread: a CURVE client's public key
    must be one of the keys its hub lets in; the reply's User-Id is the key's role, which
    every message from that connection then carries (see `Vetting`).

    libzmq's ZAP request does not name the connecting member (its identity frame is the hub's
    own routing id), so a key's role is checked against the sender's identity per message."""

    def __init__(self, ctx: zmq.Context) -> None:
        self._ctx = zmq.Context.shadow(ctx.underlying)  # a sync view, also of a zmq.asyncio context
        self._domains: dict[str, _Domain] = {}
        self._lock = threading.Lock()
        self.closed = False  # set before its socket closes, so before the context's term() returns
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.linger = 0
        try:
            self._sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as e:
            self._sock.close()
            raise TransportSecurityError(f"cannot start the ZAP handler ({ZAP_ENDPOINT}): {e}") from None
        self._thread = threading.Thread(target=self._serve, name="zap-handler", daemon=True)
        self._thread.start()

    def admit(self, hub: str, addr: str, peers: tuple[tuple[bytes, str], ...]) -> str:
        """A ZAP domain for the hub bound at `addr`, which lets in the keys of `peers`."""
        with self._lock:
            name = f"pagoda-{hub}-{len(self._domains)}"
            self._domains[name] = _Domain(hub, addr, dict(peers))
        return name

    def _serve(self) -> None:
        # The socket moves to this thread (created and bound in the caller's, before any hub
        # could ask). It closes when the context terminates, so `ctx.term()` is not held up.
        try:
            while True:
                try:
                    request = self._sock.recv_multipart()
                    try:
                        reply = self._answer(request)
                    except Exception:  # a refusal, never a dead handler (without one, libzmq lets all in)
                        logger.exception("ZAP handler failed on a request; refused")
                        reply = [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"error", b"", b""]
                    self._sock.send_multipart(reply)
                except zmq.ContextTerminated:
                    return
        finally:
            self.closed = True
            self._sock.close()
            with _zap_lock:
                if _zap_handlers.get(self._ctx.underlying) is self:
                    del _zap_handlers[self._ctx.underlying]

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6 or request[0] != b"1.0":
            request_id = request[1] if len(request) > 1 else b""
            return [b"1.0", request_id, b"500", b"malformed ZAP request", b"", b""]
        _, request_id, domain_name, address, _, mechanism, *credentials = request
        with self._lock:
            domain = self._domains.get(domain_name.decode(errors="replace"))
        peer = address.decode(errors="replace")
        if domain is None:  # a socket of this context that is no CURVE hub: NULL is its own choice
            ok = mechanism == b"NULL"
            return [b"1.0", request_id, b"200" if ok else b"400", b"OK" if ok else b"no such domain", b"", b""]
        key = zmq.utils.z85.encode(credentials[0]) if mechanism == b"CURVE" and credentials else b""
        role = domain.roles.get(key)
        if role is None:
            why = "its public key is none of the keys of --curve-public-keys-dir" if key else f"mechanism {mechanism!r}"
            _refusals.warning(("zap", domain.addr, peer, key.decode()),
                              "%s hub at %s refused a connection from %s: %s (key %s; the member's identity "
                              "is not known before it is let in)", domain.hub, domain.addr, peer, why,
                              key.decode()[:12] + "..." if key else "none")
            return [b"1.0", request_id, b"400", b"unknown key", b"", b""]
        return [b"1.0", request_id, b"200", b"OK", role.encode(), b""]


_zap_handlers: dict[int, _ZapHandler] = {}
_zap_lock = threading.Lock()


def zap_handler(ctx: zmq.Context) -> _ZapHandler:
    """The ZAP handler of `ctx`'s libzmq context, started with its first CURVE hub."""
    with _zap_lock:
        handler = _zap_handlers.get(ctx.underlying)
        if handler is None or handler.closed:  # none yet, or that of a terminated context at the same address
            handler = _zap_handlers[ctx.underlying] = _ZapHandler(ctx)
        return handler


class Vetting:
    """A CURVE hub's check of each message: its sender's identity must claim the role of the
    key the connection was let in with (ZAP's User-Id): a `worker*` identity the worker key."""

    def __init__(self, hub: str, addr: str) -> None:
        self.hub, self.addr = hub, addr

    def allows(self, frames: list[zmq.Frame]) -> bool:
        try:
            key_role = frames[-1].get("User-Id")
        except (zmq.ZMQError, IndexError):
            key_role = None
        identity = frames[0].bytes.decode(errors="replace") if frames else ""
        claimed = role_of(identity)
        if key_role is not None and claimed == key_role and key_role in HUB_ACCEPTS[self.hub]:
            return True
        try:
            peer = frames[-1].get("Peer-Address")
        except (zmq.ZMQError, IndexError):
            peer = "?"
        why = (f"it holds the {key_role} key, and a {claimed}* identity needs the {claimed} key" if claimed
               else f"the {self.hub} hub serves no identity like it")
        _refusals.warning(("msg", self.addr, identity, str(key_role)),
                          "%s hub at %s dropped a message from %r at %s: %s", self.hub, self.addr, identity, peer, why)
        return False


class VettedRouter(zmq.Socket):
    """A CURVE hub's ROUTER: `recv_multipart` skips the messages `Vetting` refuses (with
    NOBLOCK it raises zmq.Again when none is left, as for an empty socket)."""

    _vetting: Vetting | None = None

    def recv_multipart(self, flags: int = 0, copy: bool = True, track: bool = False) -> list[Any]:
        while True:
            frames = super().recv_multipart(flags, copy=False, track=track)
            assert self._vetting is not None
            if self._vetting.allows(frames):
                return [f.bytes for f in frames] if copy else frames


class VettedAsyncRouter(zmq.asyncio.Socket):
    """`VettedRouter` for the frontend's asyncio socket."""

    _vetting: Vetting | None = None

    async def recv_multipart(self, flags: int = 0, copy: bool = True, track: bool = False) -> list[Any]:  # type: ignore[override]
        while True:
            frames = await super().recv_multipart(flags, copy=False, track=track)
            assert self._vetting is not None
            if self._vetting.allows(frames):
                return [f.bytes for f in frames] if copy else frames
