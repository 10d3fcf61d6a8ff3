"""`pagoda serve`: start every process, wait until all are ready, stop them all on a signal.

If any member dies, the rest are stopped and the command exits 1: restarting members is left
to docker compose or Kubernetes, where a restarted member says hello again.
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
    try:
        group.start()
        logger.info("started %s", ", ".join(f"{n} (pid {p})" for n, p in group.pids().items()))
        base = f"http://{config.host}:{config.port}"
        group.wait_until(_http_ready(base + "/ready"), timeout_s=900)
        print(f"Pagoda is serving {config.model_name} at {base}/v1", flush=True)
        while not (dead := group.dead()):
            time.sleep(0.5)
        logger.error("%s exited; stopping every process", ", ".join(dead))
        status = 1
    except _Stop:
        logger.info("stopping")
    except RuntimeError as e:
        logger.error("%s", e)
        status = 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave members behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        group.stop()
    return status
