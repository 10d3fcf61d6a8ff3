"""compose/healthcheck.py (`pagoda-healthcheck` in the image): /proc/net/tcp parsing and the
three checks, on loopback."""

from __future__ import annotations

import http.server
import importlib.util
import socket
import threading

import pytest

from tests.compose.services import COMPOSE_DIR

_spec = importlib.util.spec_from_file_location("pagoda_healthcheck", COMPOSE_DIR / "healthcheck.py")
healthcheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(healthcheck)

# A listener on 5557 (0x15B5), a connection to a peer's 5556 (0x15B4), one to 5557 closing (TIME_WAIT).
PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:15B5 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1
   1: 0200120A:D2F0 0300120A:15B4 01 00000000:00000000 00:00000000 00000000  1000        0 2 1
   2: 0200120A:D2F2 0400120A:15B5 06 00000000:00000000 00:00000000 00000000  1000        0 3 1
"""


def test_parse_proc_net_tcp():
    assert healthcheck.parse_proc_net_tcp(PROC_NET_TCP) == [(5557, 0, "0A"), (54000, 5556, "01"), (54002, 5557, "06")]


def test_listening_and_connected():
    sockets = healthcheck.parse_proc_net_tcp(PROC_NET_TCP)
    assert healthcheck.check_listening(5557, sockets)[0]
    assert not healthcheck.check_listening(5556, sockets)[0]
    assert healthcheck.check_connected([5556], sockets)[0]
    ok, what = healthcheck.check_connected([5556, 5557], sockets)  # 5557's connection is closing
    assert not ok and "5557" in what


def test_reads_this_machines_sockets():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            sockets = healthcheck.read_sockets()
            assert healthcheck.check_listening(port, sockets)[0]
            assert healthcheck.check_connected([port], sockets)[0]


@pytest.fixture
def http_server():
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b'{"status": "unavailable"}'
            self.send_response(status["code"])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health", status
    server.shutdown()
    server.server_close()


def test_http(http_server):
    url, status = http_server
    assert healthcheck.main(["http", url]) == 0
    status["code"] = 503
    ok, what = healthcheck.check_http(url)
    assert not ok and "503" in what and "unavailable" in what
    assert healthcheck.main(["http", url]) == 1


def test_http_nothing_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert healthcheck.main(["http", f"http://127.0.0.1:{port}/health"]) == 1


def test_usage():
    assert healthcheck.main([]) == 2
    assert healthcheck.main(["ping"]) == 2
