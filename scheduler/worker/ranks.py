"""Tensor-parallel ranks of one engine. The engine's own process is rank 0: it holds the scheduler, the
block tables and sampling, and runs its shard of the model. It starts one worker process per other rank;
a worker loads its shard, allocates its share of the KV cache, and then only replays what rank 0 sends.

Each step reaches the workers as one broadcast of the runner's inputs (the forward items, pickled into a
fixed buffer) — rather than every rank running the same scheduler — so the workers hold no request state,
nothing can drift between ranks, and features that change scheduling or sampling never touch this file.
Tokens the device holds (drafts, a draft pass's last tokens) follow in a device broadcast, so no rank
waits for the host. The model's own collectives (an all-reduce after o_proj and down_proj, the embedding's
all-reduce, the logits' all-gather) run in the model group: NCCL on CUDA, gloo on the CPU; the messages
run in a gloo group of their own.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref

import numpy as np
import torch

from scheduler.config import BORROWS_VOCAB, EngineConfig
from scheduler.worker.parallel import SINGLE, TensorParallel
from scheduler.worker.runner import ModelRunner

log = logging.getLogger(__name__)

MESSAGE_BYTES = 1 << 16  # one broadcast carries a message this long; a longer one takes a second
_HEADER = 8


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """Rank r's device: the engine's device, or on CUDA the r-th GPU after it."""
    device = config.torch_device()
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def check_devices(config: EngineConfig) -> None:
    """ValueError when the host lacks a GPU for every rank."""
    device = config.torch_device()
    if device.type == "cuda":
        wanted, found = (device.index or 0) + config.tensor_parallel_size, torch.cuda.device_count()
        if wanted > found:
            raise ValueError(f"tensor_parallel_size {config.tensor_parallel_size} on {device} needs {wanted} GPUs; "
                             f"{found} visible")


def load_target(config: EngineConfig, dtype: torch.dtype, device: torch.device, ranks: Ranks | None):
    """The engine's model: whole, or rank 0's shard once every rank has loaded its own."""
    from scheduler.worker.models import load_model

    target = load_model(config.model, config.tokenizer, config.load_format, dtype, device, config.max_model_len,
                        config.cache_dir, ranks.tp if ranks is not None else SINGLE)
    if ranks is not None:
        ranks.wait_loaded()
        if config.speculative in BORROWS_VOCAB:
            target.gather_vocab()  # a compact draft borrows the whole embedding and LM head
    return target


class _Channel:
    """The ranks' two process groups, and the step messages over them."""

    def __init__(self, store, rank: int, size: int, device: torch.device, timeout: datetime.timedelta):
        dist = torch.distributed
        self.rank, self.size, self.device = rank, size, device
        self.messages = dist.ProcessGroupGloo(dist.PrefixStore("messages", store), rank, size, timeout)
        if device.type == "cuda":
            self.model = dist.ProcessGroupNCCL(dist.PrefixStore("model", store), rank, size)
        else:
            self.model = dist.ProcessGroupGloo(dist.PrefixStore("model", store), rank, size, timeout)
        self.tp = TensorParallel(rank, size, self.model)
        self._buffer = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)

    def send(self, message, tensors: tuple = ()) -> None:
        """Rank 0: the message to every rank, then the tensors (None where absent) from rank 0's device."""
        payload = pickle.dumps((message, [None if t is None else (tuple(t.shape), t.dtype) for t in tensors]))
        length = len(payload)
        data = np.frombuffer(payload, dtype=np.uint8)
        head = self._buffer.numpy()
        head[:_HEADER] = np.frombuffer(length.to_bytes(_HEADER, "little"), dtype=np.uint8)
        fits = min(length, MESSAGE_BYTES - _HEADER)
        head[_HEADER:_HEADER + fits] = data[:fits]
        self.messages.broadcast(self._buffer, 0).wait()
        if length > fits:
            self.messages.broadcast(torch.from_numpy(data[fits:].copy()), 0).wait()
        for t in tensors:
            if t is not None:
                self.model.broadcast(t.contiguous(), 0).wait()

    def receive(self):
        """A worker: the next message and its tensors, on this rank's device."""
        self.messages.broadcast(self._buffer, 0).wait()
        head = self._buffer.numpy()
        length = int.from_bytes(head[:_HEADER].tobytes(), "little")
        fits = min(length, MESSAGE_BYTES - _HEADER)
        payload = head[_HEADER:_HEADER + fits].tobytes()
        if length > fits:
            rest = torch.empty(length - fits, dtype=torch.uint8)
            self.messages.broadcast(rest, 0).wait()
            payload += rest.numpy().tobytes()
        message, specs = pickle.loads(payload)
        tensors = []
        for spec in specs:
            if spec is None:
                tensors.append(None)
                continue
            t = torch.empty(spec[0], dtype=spec[1], device=self.device)
            self.model.broadcast(t, 0).wait()
            tensors.append(t)
        return message, tensors


class Ranks:
    """Rank 0's side: the worker processes and the channel to them. A worker is a fresh interpreter
    (`python -m scheduler.worker.ranks`), so the caller's main module is never imported again; it says
    how its start went through the store."""

    def __init__(self, config: EngineConfig):
        check_devices(config)
        self.size = config.tensor_parallel_size
        self.device = rank_device(config, 0)
        timeout = datetime.timedelta(seconds=config.distributed_timeout_s)
        self.store = torch.distributed.TCPStore("127.0.0.1", 0, self.size, True, timeout=timeout,
                                                wait_for_workers=False)
        self.workers = []
        for rank in range(1, self.size):
            worker = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, env=_worker_env())
            worker.stdin.write(pickle.dumps((config, rank, self.store.port, logging.getLogger().level)))
            worker.stdin.close()
            self.workers.append(worker)
        self._finalizer = weakref.finalize(self, _stop_workers, list(self.workers))
        try:
            self.channel = self._await(lambda: _Channel(self.store, 0, self.size, self.device, timeout), "connect")
        except BaseException:
            self.close()
            raise
        self.tp = self.channel.tp

    def _await(self, fn, phase: str):
        """fn() in a thread (it blocks until every rank joins), failing at once if a worker dies meanwhile."""
        result, error = [], []
        thread = threading.Thread(target=lambda: _capture(fn, result, error), daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.05)
            if (fault := self.fault()) is not None:
                raise RuntimeError(f"tensor parallelism: {fault} before the ranks could {phase}")
        if error:
            raise error[0]
        return result[0]

    def wait_loaded(self) -> None:
        """Block until every worker has loaded its shard; RuntimeError with a worker's own error if one fails."""
        keys = [_status_key(rank) for rank in range(1, self.size)]
        while not self.store.check(keys):
            if (fault := self.fault()) is not None:
                raise RuntimeError(f"tensor parallelism: {fault}")
            time.sleep(0.05)

    def fault(self) -> str | None:
        """Why a worker is gone (its own error when it sent one), or None while all run."""
        for rank, worker in enumerate(self.workers, start=1):
            if worker.poll() is not None:
                error = self.store.get(_error_key(rank)).decode() if self.store.check([_error_key(rank)]) else None
                return f"rank {rank} exited with code {worker.returncode}" + (f": {error}" if error else "")
        return None

    def send(self, message, tensors: tuple = ()) -> None:
        self.channel.send(message, tensors)

    def close(self) -> None:
        self._finalizer()


def _worker_env() -> dict:
    """The caller's environment, with its import path: a worker imports what rank 0 imported."""
    path = os.pathsep.join(p for p in sys.path if p)
    return {**os.environ, "PYTHONPATH": path}


def _status_key(rank: int) -> str:
    return f"loaded/{rank}"


def _error_key(rank: int) -> str:
    return f"error/{rank}"


def _capture(fn, result: list, error: list) -> None:
    try:
        result.append(fn())
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
        error.append(exc)


def _stop_workers(workers: list) -> None:
    """Workers hold nothing of their own to save: they are killed (a stopped or hung one too)."""
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
    for worker in workers:
        worker.wait()


class LeaderRunner(ModelRunner):
    """Rank 0's runner: every forward and graph capture is first sent to the workers, which replay it."""

    def __init__(self, ranks: Ranks, model, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.ranks = ranks
        ranks.send(("init", num_blocks))
        super().__init__(model, num_blocks, block_size, dtype, device)

    def capture_graphs(self, *args, **kwargs) -> None:
        self._checked(self.ranks.send, (("capture", args, kwargs),))
        self._checked(super().capture_graphs, args, kwargs)

    def forward(self, items, token_ids=None, device_tokens=None, with_hidden: bool = False):
        self._checked(self.ranks.send, (("forward", items, with_hidden), (token_ids, device_tokens)))
        return self._checked(super().forward, (items, token_ids, device_tokens, with_hidden))

    def _checked(self, fn, args, kwargs=None):
        """fn(), a failed collective reported with the rank that caused it."""
        try:
            return fn(*args, **(kwargs or {}))
        except RuntimeError as exc:
            time.sleep(0.2)  # a dying worker's exit code lands a moment after its sockets close
            fault = self.ranks.fault()
            raise RuntimeError(f"tensor parallelism: {fault or 'a collective failed'} ({exc})") from None


def worker_main() -> None:
    """A worker process: join the ranks, load this rank's shard, then replay rank 0's steps until stopped."""
    _die_with_parent()
    config, rank, store_port, log_level = pickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(level=log_level, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    size = config.tensor_parallel_size
    timeout = datetime.timedelta(seconds=config.distributed_timeout_s)
    store = torch.distributed.TCPStore("127.0.0.1", store_port, size, False, timeout=timeout)
    try:
        _serve(config, rank, store, timeout)
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, then the process ends
        log.error("rank %d failed:\n%s", rank, traceback.format_exc())
        store.set(_error_key(rank), f"{type(exc).__name__}: {exc}")
        sys.exit(1)


def _serve(config: EngineConfig, rank: int, store, timeout: datetime.timedelta) -> None:
    from scheduler.worker.models import load_model

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    device = rank_device(config, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    channel = _Channel(store, rank, config.tensor_parallel_size, device, timeout)
    dtype = config.torch_dtype(device)
    loaded = load_model(config.model, config.tokenizer, config.load_format, dtype, device, config.max_model_len,
                        config.cache_dir, channel.tp)
    store.set(_status_key(rank), "1")
    if config.speculative in BORROWS_VOCAB:
        loaded.gather_vocab()  # rank 0 gathers the whole vocabulary for its draft model
    (kind, num_blocks), _ = channel.receive()
    assert kind == "init", kind
    runner = ModelRunner(loaded.model, num_blocks, config.block_size, dtype, device)
    while True:
        message, tensors = channel.receive()
        if message[0] == "forward":
            _, items, with_hidden = message
            runner.forward(items, tensors[0], tensors[1], with_hidden)
        elif message[0] == "capture":
            runner.capture_graphs(*message[1], **message[2])
        else:
            raise AssertionError(f"unknown message {message[0]!r}")


def _die_with_parent() -> None:
    """A worker must not outlive rank 0, even when rank 0 is killed."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


if __name__ == "__main__":
    worker_main()
