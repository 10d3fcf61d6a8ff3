"""A whole server over tcp://127.0.0.1 with CURVE keys from `pagoda keys generate` and the API key
from a file: it serves, its hubs let no one else in, and it will not start on tcp:// without keys
(unless told --insecure-transport)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import zmq
import zmq.auth

from protocol import EMBEDDED_MODEL_NAME, Heartbeat, Hello, encode
from tests.conftest import free_port, start_server
from tests.protocol.test_curve import hub_key, intruder, role_pair

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "curve-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def pagoda(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pagoda", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def tcp_addrs() -> list[str]:
    return ["--frontend-addr", f"tcp://127.0.0.1:{free_port()}", "--scheduler-addr", f"tcp://127.0.0.1:{free_port()}"]


def complete(base_url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"model": EMBEDDED_MODEL_NAME, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
    return httpx.post(base_url + "/v1/completions", json=body, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curve")
    keys = tmp / "keys"
    assert pagoda("keys", "generate", str(keys)).returncode == 0
    (tmp / "api-key").write_text(API_KEY + "\n")  # as `echo KEY > file` writes it
    addrs = tcp_addrs()
    srv = start_server(str(tmp), *addrs, "--curve-public-keys-dir", str(keys / "public"),
                       "--curve-secret-key-file", str(keys / "secret"), "--api-key-file", str(tmp / "api-key"),
                       "--max-model-len", "256", "--num-tokenizers", "1")
    srv.keys, srv.frontend_addr, srv.scheduler_addr = keys, addrs[1], addrs[3]
    yield srv
    srv.stop()


def test_a_server_over_curve_serves_with_the_key_from_its_file(curve):
    resp = complete(curve.base_url, AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3
    assert "tcp://" in " ".join(curve.proc.args)  # not the ipc:// default


def test_every_route_but_the_probes_needs_the_api_key(curve):
    assert httpx.get(curve.base_url + "/health").status_code == 200
    assert httpx.get(curve.base_url + "/ready").status_code == 200
    for path in ("/v1/models", "/metrics"):
        resp = httpx.get(curve.base_url + path)
        assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error", path
        assert httpx.get(curve.base_url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(curve.base_url + path, headers=AUTH).status_code == 200, path
    assert complete(curve.base_url).status_code == 401


def _send(sock: zmq.Socket, msg: object) -> None:
    """Without blocking: a DEALER whose handshake was refused has no peer to queue for."""
    try:
        sock.send(encode(msg), zmq.NOBLOCK)
    except zmq.Again:
        pass


def _tokenizers(curve) -> set[str]:
    return set(httpx.get(curve.base_url + "/health").json()["tokenizers"])


def test_intruders_on_the_hubs_get_nothing_through_and_it_keeps_serving(curve):
    frontend_key = hub_key(curve.keys, "frontend")
    scheduler_key = hub_key(curve.keys, "scheduler")
    ctx = zmq.Context()
    try:
        # A tokenizer's hello and heartbeats would make the frontend list it in /health.
        intruders = {
            "tokenizer-unknown-key": intruder(ctx, curve.frontend_addr, "tokenizer-unknown-key",
                                             zmq.curve_keypair(), frontend_key),
            "tokenizer-plaintext": intruder(ctx, curve.frontend_addr, "tokenizer-plaintext", None, None),
            "tokenizer-worker-key": intruder(ctx, curve.frontend_addr, "tokenizer-worker-key",
                                            role_pair(curve.keys, "worker"), frontend_key),
        }
        # On the scheduler: a worker's identity with the tokenizer's key, a key nobody generated.
        on_scheduler = {
            "worker-7": intruder(ctx, curve.scheduler_addr, "worker-7", role_pair(curve.keys, "tokenizer"),
                                 scheduler_key),
            "tokenizer-unknown": intruder(ctx, curve.scheduler_addr, "tokenizer-unknown", zmq.curve_keypair(),
                                         scheduler_key),
        }
        for name, sock in intruders.items():
            _send(sock, Hello(role="tokenizer", member_id=name, pid=os.getpid()))
        for name, sock in on_scheduler.items():
            role = "worker" if name.startswith("worker") else "tokenizer"
            _send(sock, Hello(role=role, member_id=name, pid=os.getpid(), num_blocks=8, max_model_len=256))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for name, sock in intruders.items():
                _send(sock, Heartbeat(name, ready=False))
            time.sleep(0.3)
        assert _tokenizers(curve) == {"tokenizer-0"}
        assert not any(sock.poll(100) for sock in [*intruders.values(), *on_scheduler.values()])
        resp = complete(curve.base_url, AUTH)
        assert resp.status_code == 200, resp.text

        # The same probe with the tokenizer's key does get through: the check above would see a leak.
        genuine = intruder(ctx, curve.frontend_addr, "tokenizer-probe", role_pair(curve.keys, "tokenizer"),
                           frontend_key)
        deadline = time.monotonic() + 10
        while "tokenizer-probe" not in _tokenizers(curve):
            assert time.monotonic() < deadline, "a member with the tokenizer key was not let in"
            _send(genuine, Heartbeat("tokenizer-probe", ready=False))
            time.sleep(0.2)
    finally:
        ctx.destroy(linger=0)
    log = curve.log()
    assert "frontend hub at " + curve.frontend_addr + " refused a connection from 127.0.0.1" in log
    assert "scheduler hub at " + curve.scheduler_addr + " dropped a message from 'worker-7'" in log
    assert "scheduler hub at " + curve.scheduler_addr + " refused a connection from 127.0.0.1" in log


def test_tcp_without_keys_will_not_start_and_insecure_transport_does(tmp_path):
    for command in (["serve", "--port", str(free_port())], ["scheduler"], ["tokenizer"], ["worker"]):
        done = pagoda(*command, *tcp_addrs(), timeout=60)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr  # one line, before any model loads
        for flag in ("--curve-public-keys-dir", "--curve-secret-key-file", "pagoda keys generate"):
            assert flag in lines[0]
    srv = start_server(str(tmp_path), *tcp_addrs(), "--insecure-transport", "--max-model-len", "256",
                       "--num-tokenizers", "1")
    try:
        assert complete(srv.base_url).status_code == 200
        assert "plaintext and unauthenticated (--insecure-transport)" in srv.log()
    finally:
        srv.stop()


def test_api_key_and_api_key_file_together_will_not_start(tmp_path):
    (tmp_path / "key").write_text("k\n")
    done = pagoda("serve", "--port", str(free_port()), "--api-key", "k", "--api-key-file", str(tmp_path / "key"))
    assert done.returncode == 1 and "not both" in done.stderr
