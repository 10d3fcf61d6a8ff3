"""The worker process: runs each `StepPlan` through the model runner, rank 0 answers."""

from __future__ import annotations

import logging
import os
import threading
import time

import zmq

from protocol import Codec, EngineConfig, Heartbeat, Hello, Shutdown, StepPlan, connect_dealer
from protocol.messages import WorkerInbound

logger = logging.getLogger("pagoda.worker")


def _heartbeats(ctx: zmq.Context, config: EngineConfig, member_id: str, stop: threading.Event) -> None:
    """Beats from a thread with its own socket, so a long step does not look like a death."""
    sock = connect_dealer(ctx, config.scheduler_addr, f"{member_id}.hb")
    codec = Codec(WorkerInbound)
    try:
        while not stop.wait(config.heartbeat_interval_s):
            sock.send(codec.encode(Heartbeat(member_id, ready=True)))
    finally:
        sock.close()


def run_worker(config: EngineConfig, rank: int = 0) -> None:
    from gpu_worker.model_runner import ModelRunner
    from gpu_worker.model_source import ModelLoadError

    member_id = f"worker-{rank}"
    try:
        runner = ModelRunner(config, rank=rank)
    except ModelLoadError as e:
        # The user's mistake, said in one line; the supervisor then stops the rest and exits 1.
        logger.error("%s", e)
        raise SystemExit(1) from None
    ctx = zmq.Context()
    sock = connect_dealer(ctx, config.scheduler_addr, member_id)
    codec = Codec(WorkerInbound)
    sock.send(
        codec.encode(
            Hello(
                role="worker",
                member_id=member_id,
                pid=os.getpid(),
                rank=rank,
                num_blocks=runner.num_blocks,
                max_model_len=runner.max_model_len,
                eos_token_ids=list(runner.eos_token_ids),
            )
        )
    )
    logger.info("%s (pid %d) ready: %d KV blocks", member_id, os.getpid(), runner.num_blocks)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeats, args=(ctx, config, member_id, stop), daemon=True)
    beat.start()
    # When the previous step's result went out: the time until the next plan arrives is the
    # worker's idle time, which async scheduling exists to hide (reported in each result).
    last_step_end: float | None = None
    try:
        while True:
            frame = sock.recv()
            received = time.perf_counter()
            msg = codec.decode(frame)
            if isinstance(msg, Shutdown):
                break
            if isinstance(msg, StepPlan):
                result = runner.execute(msg)
                result.execute_s = time.perf_counter() - received
                result.idle_s = 0.0 if last_step_end is None else received - last_step_end
                if rank == 0:
                    sock.send(codec.encode(result))
                last_step_end = time.perf_counter()
    finally:
        stop.set()
        beat.join()
        sock.close()
        ctx.term()
