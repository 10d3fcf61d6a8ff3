"""`pagoda serve`: start every process, wait until all are ready, restart members that die,
stop them all on a signal.

A member that dies after the server was ready is restarted with backoff and says hello again
(`frontend.processes` has the policy). A death during start-up or a member dying past the
restart rate stops everything, and the command exits 1.
"""

from __future__ import annotations

import logging
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from frontend.processes import ProcessGroup
from protocol import EngineConfig

logger = logging.getLogger("pagoda.supervisor")


def _http_ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    return check


class _Stop(Exception):
    pass


def serve(config: EngineConfig) -> int:
    """Run the whole server until SIGINT or SIGTERM; the exit status of `pagoda serve`."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s [supervisor] %(message)s",
                        datefmt="%H:%M:%S")
    config = config.with_addresses()
    group = ProcessGroup(config)

    def on_signal(signum: int, frame: object) -> None:
        raise _Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = 0
    draining = False
    try:
        group.start()
        logger.info("started %s", ", ".join(f"{n} (pid {p})" for n, p in group.pids().items()))
        base = f"http://{config.host}:{config.port}"
        group.wait_until(_http_ready(base + "/ready"), timeout_s=900)
        print(f"Pagoda is serving {config.model_name} at {base}/v1", flush=True)
        group.restarts_enabled = True
        while True:
            group.supervise()
            time.sleep(0.1)
    except _Stop:
        logger.info("stopping: the frontend drains first (up to %g s, --shutdown-timeout)", config.shutdown_timeout)
        draining = True
    except RuntimeError as e:  # processes.GaveUp too: one line saying which member and why
        logger.error("%s", e)
        status = 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave members behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        group.stop(drain_s=config.shutdown_timeout if draining else 0.0)
    return status
