"""CURVE over tcp:// (protocol/sockets.py) with keys from `pagoda keys generate`: real sockets on
loopback, hubs and members in this process, intruders made by hand as any ZeroMQ program would."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio
import zmq.auth

from protocol import EngineConfig, bind_router, connect_dealer
from protocol.curve import ROLES, TransportSecurityError, check_transport
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
QUIET_S = 1.5  # long enough for a handshake and a message on loopback, many times over


def pagoda(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pagoda", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("curve") / "keys"
    done = pagoda("keys", "generate", str(root))
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture()
def addrs() -> EngineConfig:
    """Both hubs on free loopback ports, no keys yet."""
    return EngineConfig(frontend_addr=f"tcp://127.0.0.1:{free_port()}", scheduler_addr=f"tcp://127.0.0.1:{free_port()}")


def keyed(config: EngineConfig, keys: Path, role: str) -> EngineConfig:
    return msgspec.structs.replace(config, curve_public_keys_dir=str(keys / "public"),
                                   curve_secret_key_file=str(keys / "secret" / f"{role}.key_secret"))


@pytest.fixture()
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def intruder(ctx: zmq.Context, addr: str, identity: str, key_pair: tuple[bytes, bytes] | None,
             server_key: bytes | None) -> zmq.Socket:
    """A DEALER made by hand: CURVE with `key_pair` and `server_key`, or plaintext (None)."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.identity = identity.encode()
    if key_pair is not None:
        sock.curve_publickey, sock.curve_secretkey = key_pair
        sock.curve_serverkey = server_key
    sock.connect(addr)
    return sock


def role_pair(keys: Path, role: str) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(keys / "secret" / f"{role}.key_secret")
    assert secret is not None
    return public, secret


def hub_key(keys: Path, hub: str) -> bytes:
    return zmq.auth.load_certificate(keys / "public" / f"{hub}.key")[0]


def receive(sock: zmq.Socket, timeout_s: float = 5.0) -> list[bytes] | None:
    """The next message the hub lets through within `timeout_s`, or None."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            try:
                return sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:  # a message the hub refused: nothing left
                continue
    return None


# ---- pagoda keys generate -----------------------------------------------------------------


def test_keys_generate_writes_0600_secrets_in_a_0700_folder_and_refuses_to_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "keys"
    done = pagoda("keys", "generate", str(root))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(root / "secret").st_mode) == 0o700
    for role in ROLES:
        secret = root / "secret" / f"{role}.key_secret"
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
        public, secret_key = zmq.auth.load_certificate(secret)
        assert secret_key is not None and zmq.auth.load_certificate(root / "public" / f"{role}.key") == (public, None)
        assert str(secret) in done.stdout
        assert f"--curve-secret-key-file {secret}" in done.stdout  # the flags each role needs
    assert sorted(os.listdir(root / "secret")) == sorted(f"{r}.key_secret" for r in ROLES)  # no scratch left
    assert len({zmq.auth.load_certificate(root / "public" / f"{r}.key")[0] for r in ROLES}) == len(ROLES)

    before = (root / "secret" / "worker.key_secret").read_bytes()
    again = pagoda("keys", "generate", str(root))
    assert again.returncode == 1 and "--force" in again.stderr
    assert (root / "secret" / "worker.key_secret").read_bytes() == before
    forced = pagoda("keys", "generate", str(root), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (root / "secret" / "worker.key_secret").read_bytes() != before
    assert stat.S_IMODE(os.stat(root / "secret" / "worker.key_secret").st_mode) == 0o600


# ---- the members that hold their keys --------------------------------------------------------


def test_members_with_their_keys_talk_to_the_scheduler_both_ways(keys: Path, addrs: EngineConfig, ctx) -> None:
    hub = bind_router(ctx, addrs.scheduler_addr, keyed(addrs, keys, "scheduler"))
    members = zmq.Context()
    try:
        # The secret key's folder (as `pagoda serve` gives it) works as well as the role's file.
        folder = msgspec.structs.replace(keyed(addrs, keys, "worker"), curve_secret_key_file=str(keys / "secret"))
        addr = addrs.scheduler_addr
        socks = {
            "tokenizer-0": connect_dealer(members, addr, "tokenizer-0", keyed(addrs, keys, "tokenizer")),
            "worker-0": connect_dealer(members, addr, "worker-0", keyed(addrs, keys, "worker")),
            "worker-g1-0.hb": connect_dealer(members, addr, "worker-g1-0.hb", folder),
        }
        for name, sock in socks.items():
            sock.send(name.encode())
            assert receive(hub) == [name.encode(), name.encode()]
            hub.send_multipart([name.encode(), b"reply to " + name.encode()])
            assert sock.poll(5000) and sock.recv() == b"reply to " + name.encode()
    finally:
        members.destroy(linger=0)


def test_the_asyncio_frontend_hub_lets_a_tokenizer_in_and_drops_a_worker_identity(
    keys: Path, addrs: EngineConfig, ctx, caplog
) -> None:
    async def scenario() -> list[list[bytes]]:
        actx = zmq.asyncio.Context()
        hub = bind_router(actx, addrs.frontend_addr, keyed(addrs, keys, "frontend"))
        # The tokenizer's key, a worker's identity: let in by ZAP, every message dropped.
        spoof = intruder(ctx, addrs.frontend_addr, "worker-0", role_pair(keys, "tokenizer"), hub_key(keys, "frontend"))
        spoof.send(b"spoofed")
        tok = connect_dealer(ctx, addrs.frontend_addr, "tokenizer-1", keyed(addrs, keys, "tokenizer"))
        await asyncio.sleep(QUIET_S)
        tok.send(b"genuine")
        got = [await asyncio.wait_for(hub.recv_multipart(), 5)]
        hub.close()
        actx.term()  # the ZAP handler's thread lets the context go
        return got

    with caplog.at_level(logging.WARNING, logger="protocol.sockets"):
        assert asyncio.run(scenario()) == [[b"tokenizer-1", b"genuine"]]
    assert "dropped a message from 'worker-0'" in caplog.text and "needs the worker key" in caplog.text


# ---- intruders ---------------------------------------------------------------------------


def test_intruders_get_nothing_through_and_the_hub_keeps_serving(keys: Path, addrs: EngineConfig, ctx, caplog) -> None:
    hub = bind_router(ctx, addrs.scheduler_addr, keyed(addrs, keys, "scheduler"))
    others = zmq.Context()
    server = hub_key(keys, "scheduler")
    try:
        with caplog.at_level(logging.WARNING, logger="protocol.sockets"):
            bad = {
                # A key nobody generated for this server (freshly made, unknown).
                "tokenizer-9": intruder(others, addrs.scheduler_addr, "tokenizer-9", zmq.curve_keypair(), server),
                # No CURVE at all.
                "tokenizer-8": intruder(others, addrs.scheduler_addr, "tokenizer-8", None, None),
                # A worker's identity with the tokenizer's key.
                "worker-1": intruder(others, addrs.scheduler_addr, "worker-1", role_pair(keys, "tokenizer"), server),
                # The frontend's own key is no member's.
                "worker-2": intruder(others, addrs.scheduler_addr, "worker-2", role_pair(keys, "frontend"), server),
            }
            for sock in bad.values():
                sock.send(b"let me in")
            assert receive(hub, QUIET_S) is None
            # Neither can they read: an unknown key or plaintext has no connection to send on.
            for name in ("tokenizer-9", "tokenizer-8", "worker-2"):
                with pytest.raises(zmq.ZMQError):  # ROUTER_MANDATORY: no such peer
                    hub.send_multipart([name.encode(), b"secret"])
            assert not any(sock.poll(200) for sock in bad.values())
        log = caplog.text
        assert "refused a connection from 127.0.0.1: its public key is none of the keys" in log
        assert "dropped a message from 'worker-1' at 127.0.0.1: it holds the tokenizer key" in log
        # The hub goes on: a member with its key gets through.
        tok = connect_dealer(others, addrs.scheduler_addr, "tokenizer-0", keyed(addrs, keys, "tokenizer"))
        tok.send(b"hello")
        assert receive(hub) == [b"tokenizer-0", b"hello"]
    finally:
        others.destroy(linger=0)


def test_the_frontend_hub_refuses_the_worker_key(keys: Path, addrs: EngineConfig, ctx, caplog) -> None:
    hub = bind_router(ctx, addrs.frontend_addr, keyed(addrs, keys, "frontend"))
    with caplog.at_level(logging.WARNING, logger="protocol.sockets"):
        for identity in ("worker-0", "tokenizer-0"):
            sock = intruder(ctx, addrs.frontend_addr, identity, role_pair(keys, "worker"), hub_key(keys, "frontend"))
            sock.send(b"hello")
        assert receive(hub, QUIET_S) is None
    assert "frontend hub at" in caplog.text and "none of the keys" in caplog.text


# ---- configuration ---------------------------------------------------------------------------


def test_tcp_without_keys_refuses_naming_the_flags_and_insecure_transport_is_plaintext(
    addrs: EngineConfig, ctx, caplog
) -> None:
    for make in (lambda c: bind_router(ctx, c.scheduler_addr, c),
                 lambda c: connect_dealer(ctx, c.scheduler_addr, "worker-0", c),
                 lambda c: bind_router(ctx, c.scheduler_addr)):
        with pytest.raises(TransportSecurityError) as e:
            make(addrs)
        if "configuration" not in str(e.value):
            for flag in ("--curve-public-keys-dir", "--curve-secret-key-file", "pagoda keys generate",
                         "--insecure-transport"):
                assert flag in str(e.value)
    insecure = msgspec.structs.replace(addrs, insecure_transport=True)
    with caplog.at_level(logging.WARNING, logger="protocol.sockets"):
        hub = bind_router(ctx, insecure.scheduler_addr, insecure)
        plain = intruder(ctx, insecure.scheduler_addr, "anyone", None, None)
        plain.send(b"plaintext")
        assert receive(hub) == [b"anyone", b"plaintext"]
    assert "plaintext and unauthenticated (--insecure-transport)" in caplog.text


def test_ipc_needs_no_keys(tmp_path: Path, ctx) -> None:
    addr = f"ipc://{tmp_path}/hub.sock"
    hub = bind_router(ctx, addr)
    member = connect_dealer(ctx, addr, "tokenizer-0")
    member.send(b"hi")
    assert receive(hub) == [b"tokenizer-0", b"hi"]


def test_wrong_or_missing_keys_are_said_at_start(keys: Path, addrs: EngineConfig) -> None:
    worker_with_tokenizer_key = msgspec.structs.replace(
        keyed(addrs, keys, "worker"), curve_secret_key_file=str(keys / "secret" / "tokenizer.key_secret"))
    with pytest.raises(TransportSecurityError, match="not the worker's"):
        check_transport(worker_with_tokenizer_key, "worker")
    # `pagoda serve` gives one configuration to every role: one role's file is wrong for the others.
    with pytest.raises(TransportSecurityError, match="or the folder DIR/secret"):
        check_transport(keyed(addrs, keys, "frontend"), *ROLES)
    check_transport(msgspec.structs.replace(keyed(addrs, keys, "frontend"), curve_secret_key_file=str(keys / "secret")),
                    *ROLES)
    with pytest.raises(TransportSecurityError, match="--curve-secret-key-file is missing"):
        check_transport(msgspec.structs.replace(keyed(addrs, keys, "worker"), curve_secret_key_file=""), "worker")
    public_only = msgspec.structs.replace(keyed(addrs, keys, "worker"), curve_secret_key_file=str(keys / "public"))
    with pytest.raises(TransportSecurityError, match="cannot read the worker's CURVE key"):
        check_transport(public_only, "worker")
    check_transport(EngineConfig(), *ROLES)  # ipc:// (empty addresses are filled in as ipc://) needs nothing
