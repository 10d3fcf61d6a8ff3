"""The worker process: runs each `StepPlan` through the model runner, rank 0 answers."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol import Decoder, EngineConfig, Heartbeat, Hello, Shutdown, StepPlan, connect_dealer, encode
from protocol.messages import WorkerInbound, worker_id

if TYPE_CHECKING:
    from gpu_worker.input_batch import PendingStep
    from gpu_worker.model_runner import ModelRunner

logger = logging.getLogger("pagoda.worker")

# Heartbeat intervals without a connection to the scheduler before the worker exits 1.
HUB_LOST_AFTER_HEARTBEATS = 10


def _heartbeat_socket(ctx: zmq.Context, config: EngineConfig, member_id: str) -> tuple[zmq.Socket, zmq.Socket]:
    """The heartbeat DEALER and a monitor of its connection, attached before it connects, and
    connected before the worker says hello: if the scheduler that hears the hello goes, the
    monitor sees the drop (else a socket that first connected to its successor would not)."""
    monitors: list[zmq.Socket] = []

    def watch(s: zmq.Socket) -> None:
        monitors.append(s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED))

    sock = connect_dealer(ctx, config.scheduler_addr, f"{member_id}.hb", config, before_connect=watch)
    (monitor,) = monitors
    deadline = time.monotonic() + 10 * config.heartbeat_interval_s
    while time.monotonic() < deadline:
        if monitor.poll(100) and recv_monitor_message(monitor)["event"] == zmq.EVENT_CONNECTED:
            break
    return sock, monitor


def _heartbeats(
    sock: zmq.Socket, monitor: zmq.Socket, config: EngineConfig, member_id: str, stop: threading.Event,
    drain: _Drain,
) -> None:
    """Beats from a thread with its own socket, so a long step does not look like a death.

    It also watches that socket's connection: once it drops, the scheduler is gone or was
    restarted, and a new one never heard this worker's hello. So the process exits 1 when the
    connection comes back, or when it stays away for `HUB_LOST_AFTER_HEARTBEATS` beats: a
    restart (the supervisor's, or compose's `restart:`) then says hello again.
    """
    interval = config.heartbeat_interval_s
    lost_at: float | None = None
    next_beat = time.monotonic() + interval
    try:
        while not stop.is_set():
            if monitor.poll(min(100, max(1, int(1000 * (next_beat - time.monotonic()))))):
                event = recv_monitor_message(monitor)["event"]
                if event == zmq.EVENT_DISCONNECTED and lost_at is None:
                    lost_at = time.monotonic()
                    # Debug only: at a normal shutdown the scheduler goes first, and this is no news.
                    logger.debug("%s lost its connection to the scheduler at %s", member_id, config.scheduler_addr)
                elif event == zmq.EVENT_CONNECTED and lost_at is not None:
                    _exit_unjoined(member_id, "the scheduler is back, maybe a new one that never heard its hello")
            now = time.monotonic()
            if lost_at is not None and now - lost_at > HUB_LOST_AFTER_HEARTBEATS * interval:
                _exit_unjoined(member_id, f"cannot reach the scheduler at {config.scheduler_addr} for "
                                          f"{now - lost_at:.0f} s")
            if now >= next_beat:
                sock.send(encode(Heartbeat(member_id, ready=True, draining=drain.began is not None)))
                next_beat = now + interval
            if drain.began is not None and now - drain.began > config.shutdown_timeout + 10 * interval:
                _exit_unjoined(member_id, "draining and never told to stop")
    finally:
        sock.disable_monitor()
        monitor.close()
        sock.close()


def _drain_on_sigterm(member_id: str, runner: ModelRunner) -> _Drain:
    """A worker stopped on its own (compose or Kubernetes scaling a service down) while it runs
    requests drains: its heartbeats say so, the scheduler places no new request on its group,
    and once the group's running requests have ended it sends Shutdown and the worker exits 0.
    An idle worker, or a second SIGTERM, exits at once. Under `pagoda serve` (supervised)
    everything stops together: no drain."""
    drain = _Drain()
    if os.environ.get("PAGODA_SUPERVISED"):
        return drain

    def handler(signum: int, frame: object) -> None:
        if drain.began is not None or not runner.input_batch.requests:
            raise SystemExit(0)
        logger.info("%s: SIGTERM: draining (its group takes no new request)", member_id)
        drain.began = time.monotonic()

    signal.signal(signal.SIGTERM, handler)
    return drain


class _Drain:
    began: float | None = None  # when SIGTERM came


def _exit_unjoined(member_id: str, why: str) -> None:
    """Exit 1 at once, from the heartbeat thread, whatever the main loop is doing."""
    logger.error("%s: %s; exiting so that a restart says hello again", member_id, why)
    os._exit(1)


def _plan_arrives_first(sock: zmq.Socket, runner: ModelRunner, step: PendingStep) -> bool:
    """Wait until the next message arrives (True) or the device finishes `step` (False)."""
    while True:
        if sock.poll(0):
            return True
        if runner.step_done(step):
            return bool(sock.poll(0))
        time.sleep(20e-6)


def run_worker(config: EngineConfig, rank: int = 0, group: int = 0) -> None:
    from gpu_worker.model_runner import ModelRunner
    from tokenizer_svc.model_source import ModelLoadError

    member_id = worker_id(group, rank)
    try:
        runner = ModelRunner(config, rank=rank, group=group)
    except ModelLoadError as e:
        # The user's mistake, said in one line; the supervisor then stops the rest and exits 1.
        logger.error("%s", e)
        raise SystemExit(1) from None
    ctx = zmq.Context()
    beat_sock, beat_monitor = _heartbeat_socket(ctx, config, member_id)
    sock = connect_dealer(ctx, config.scheduler_addr, member_id, config)
    from_scheduler = Decoder(WorkerInbound)
    sock.send(
        encode(
            Hello(
                role="worker",
                member_id=member_id,
                pid=os.getpid(),
                rank=rank,
                num_blocks=runner.num_blocks,
                max_model_len=runner.max_model_len,
                eos_token_ids=list(runner.eos_token_ids),
                max_num_batched_tokens=runner.max_num_batched_tokens,
                vocab_size=runner.model.config.vocab_size,
                group=group,
            )
        )
    )
    logger.info("%s (pid %d) ready: %d KV blocks", member_id, os.getpid(), runner.num_blocks)
    stop = threading.Event()
    drain = _drain_on_sigterm(member_id, runner)
    beat = threading.Thread(
        target=_heartbeats, args=(beat_sock, beat_monitor, config, member_id, stop, drain), daemon=True
    )
    beat.start()
    # When the worker last had no step on the device: the time until the next plan arrives is
    # its idle time, which async scheduling exists to hide (reported in each result).
    idle_since: float | None = None
    # The launched step whose result is not sent yet. While it runs on the device the next
    # plan is received, prepared and launched; only then is the step finished and answered,
    # so the host's work for step n + 1 overlaps the device's for step n.
    pending: PendingStep | None = None

    def answer(step: PendingStep) -> None:
        result = runner.finish(step)
        if rank == 0:
            sock.send(encode(result))

    try:
        while True:
            if pending is not None and not _plan_arrives_first(sock, runner, pending):
                answer(pending)
                pending = None
                idle_since = time.perf_counter()
            frame = sock.recv()
            received = time.perf_counter()
            msg = from_scheduler.decode(frame)
            if isinstance(msg, Shutdown):
                if pending is not None:
                    answer(pending)
                break
            if isinstance(msg, StepPlan):
                step = runner.launch(msg)
                idle_s = 0.0 if idle_since is None or pending is not None else received - idle_since
                if pending is not None:
                    answer(pending)
                pending = step
                # The idle time is reported with the step that ended it.
                if step.result is not None:
                    step.result.idle_s = idle_s
                    answer(step)
                    pending, idle_since = None, time.perf_counter()
                else:
                    step.idle_s = idle_s
    finally:
        stop.set()
        beat.join()
        sock.close()
        ctx.term()
