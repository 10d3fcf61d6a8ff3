#!/usr/bin/env python3
"""`pagoda-healthcheck`: the containers' health checks, standard library only (the image has no curl).

    pagoda-healthcheck http URL            URL answers 200 (the frontend's /health)
    pagoda-healthcheck listening PORT      this container listens on TCP PORT (a hub's bound port)
    pagoda-healthcheck connected PORT...   this container holds an established TCP connection to a
                                           peer's PORT, for each PORT (a member's hubs)

Exit 0 when healthy, 1 otherwise, with one line saying what was seen (docker inspect shows it).

Only the frontend has an HTTP port, so it alone is checked end to end (/health is 200 only while
a request can be served). The members have no port to ask; what a check can see from inside
their container is their TCP sockets, read from /proc/net/tcp{,6} (the container's own network
namespace): a scheduler that listens, a tokenizer connected to both hubs, a worker connected to
the scheduler (a worker connects only once its model is loaded). A TCP connection is not a
ZeroMQ session: a member whose CURVE handshake is refused keeps reconnecting and may be seen
connected. Whether each tokenizer is ready and serving is in the body of the frontend's /health.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"
PROC_NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")


def parse_proc_net_tcp(text: str) -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of each socket in a /proc/net/tcp or tcp6 table."""
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        local, remote, state = fields[1], fields[2], fields[3].upper()
        sockets.append((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state))
    return sockets


def read_sockets(paths: tuple[str, ...] = PROC_NET_TCP) -> list[tuple[int, int, str]]:
    sockets = []
    for path in paths:
        try:
            with open(path) as f:
                sockets += parse_proc_net_tcp(f.read())
        except OSError:  # no IPv6 in this namespace
            pass
    return sockets


def check_listening(port: int, sockets: list[tuple[int, int, str]]) -> tuple[bool, str]:
    ok = any(local == port and state == TCP_LISTEN for local, _, state in sockets)
    return ok, f"{'listening' if ok else 'not listening'} on TCP port {port}"


def check_connected(ports: list[int], sockets: list[tuple[int, int, str]]) -> tuple[bool, str]:
    missing = [p for p in ports if not any(remote == p and state == TCP_ESTABLISHED for _, remote, state in sockets)]
    if missing:
        return False, f"no established connection to port(s) {', '.join(map(str, missing))}"
    return True, f"connected to port(s) {', '.join(map(str, ports))}"


def check_http(url: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200, f"{url}: {response.status}"
    except urllib.error.HTTPError as e:  # 503 while nothing can be served: the body says why
        body = e.read(500).decode(errors="replace").strip()
        return False, f"{url}: {e.code} {body}"
    except (OSError, ValueError) as e:
        return False, f"{url}: {e}"


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "http":
        ok, what = check_http(argv[1])
    elif len(argv) == 2 and argv[0] == "listening":
        ok, what = check_listening(int(argv[1]), read_sockets())
    elif len(argv) >= 2 and argv[0] == "connected":
        ok, what = check_connected([int(p) for p in argv[1:]], read_sockets())
    else:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    print(what)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
