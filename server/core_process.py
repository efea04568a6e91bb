"""The engine core in a process of its own (--engine-core process): it builds the engine and runs its step loop,
taking requests, aborts, pauses and calls from the daemon's front end through a pipe and sending back one message a
step (server/core_client.py is the other end; server/core_wire.py the messages).

The front end's event loop, gRPC and the protobufs then run on another core than the steps, instead of taking
turns with them on one GIL. The core leaves when told to stop, when the front end goes away (the pipe closes), or
when a step fails (it says why first)."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection

from server.core_wire import engine_facts, engine_info, pack_outputs

log = logging.getLogger("beastserve.core")
IDLE_WAIT_S = 0.05  # a step found nothing to run (every live request paused): until a message comes or this passes
IDLE_POLL_S = 0.5  # no work: how long one wait for a message lasts
CALLS = ("reset_prefix_cache", "kv_follow", "kv_unfollow")  # what the front end may run between two steps


def run_core(conn: Connection, engine_config, build_engine) -> None:
    """The core process's main: build_engine(engine_config, serving=True), say "ready" with the engine's facts
    (or "failed" with why), then step until stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front end stops us
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    if not sys.stderr.isatty():  # as the front end: a spawned process starts with the libraries' bars on
        from server.cli import quiet_progress_bars
        quiet_progress_bars()
    try:
        engine = build_engine(engine_config, serving=True)
    except BaseException as exc:  # noqa: BLE001 - the front end reports it and exits
        log.exception("the engine core failed to start")
        _send(conn, ("failed", f"{type(exc).__name__}: {exc}"))
        return
    _send(conn, ("ready", engine_info(engine, os.getpid())))
    code = Core(engine, conn).run()
    sys.exit(code)


def _send(conn: Connection, message) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


class Core:
    def __init__(self, engine, conn: Connection):
        self.engine = engine
        self.conn = conn
        self.outbox = []  # the engine's outputs since the last message (each request's on_output)
        self.notes = []  # in order: ("rejected", id, why), ("reply", call id, result, error), ("kv", events)
        self.streams = {}  # request id -> its RequestStream, to pause and resume it
        self.adds_seen = 0
        self.kv_followers = 0
        self.stopping = False
        self.last_facts = None
        fault_after = os.environ.get("BEASTSERVE_TEST_FAULT_AFTER_STEPS")  # tests: step N+1 raises
        self.fault_after_steps = int(fault_after) if fault_after else None
        self.num_steps = 0

    def run(self) -> int:
        """Step until told to stop (0) or the front end is gone (0), or a step fails (1, after saying why)."""
        engine = self.engine
        try:
            while not self.stopping:
                self._receive(0 if engine.has_unfinished() else IDLE_POLL_S)
                if self.stopping:
                    break
                if not engine.has_unfinished():
                    if (fault := engine.fault()) is not None:  # a tensor-parallel rank died while idle
                        raise RuntimeError(f"tensor parallelism: {fault}")
                    self._report(None)
                    continue
                if self.num_steps == self.fault_after_steps:
                    raise RuntimeError("injected fault")
                outputs = engine.step()
                self.num_steps += 1
                stats = engine.last_step_stats
                if self.kv_followers:
                    self._kv_events()
                self._report(stats)
                if not (outputs or stats.num_batched_tokens or engine.admission.compiling):
                    self._receive(IDLE_WAIT_S)  # nothing could run: until a request comes, ends or resumes
        except EOFError:
            log.info("the front end is gone; the engine core stops")
        except BaseException as exc:  # noqa: BLE001 - said to the front end, which fails every request
            log.exception("engine step failed")
            try:
                _send(self.conn, ("fault", f"engine fault: {exc!r}"))
            except OSError:
                pass
            return 1
        finally:
            engine.shutdown()
        return 0

    def _receive(self, timeout: float) -> None:
        """Every message waiting (the first waited for up to timeout); EOFError when the front end is gone."""
        conn = self.conn
        if not conn.poll(timeout):
            return
        while True:
            for message in pickle.loads(conn.recv_bytes()):
                self._handle(message)
            if not conn.poll(0):
                return

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            self._add(*message[1:])
        elif kind == "abort":
            for request_id in message[1]:
                self.engine.abort(request_id)
        elif kind in ("pause", "resume"):
            stream = self.streams.get(message[1])
            if stream is not None:
                stream.paused = kind == "pause"
        elif kind == "call":
            self._call(*message[1:])
        else:
            assert kind == "stop", message
            self.stopping = True

    def _add(self, request_id: str, prompt_token_ids: list[int], params, priority: int, options: dict) -> None:
        self.adds_seen += 1
        try:
            stream = self.engine.add_request(None, params, request_id=request_id, priority=priority,
                                             prompt_token_ids=prompt_token_ids, on_output=self.outbox.append,
                                             **options)
        except (ValueError, TypeError) as exc:  # the request's own fault: refused, named as the engine names it
            self.notes.append(("rejected", request_id, str(exc)))
            return
        self.streams[request_id] = stream

    def _call(self, call_id: int, name: str) -> None:
        assert name in CALLS, name
        pool = self.engine.pool
        try:
            if name == "reset_prefix_cache":
                result = pool.reset_prefix_cache()
            elif name == "kv_follow":
                if self.kv_followers:  # already recording: those following get what they have not seen yet
                    self._kv_events()
                else:
                    pool.record_events(True)
                self.kv_followers += 1
                result = pool.cached_contents()
            else:
                self.kv_followers -= 1
                if not self.kv_followers:
                    pool.record_events(False)
                result = None
        except Exception as exc:  # noqa: BLE001 - the caller gets it
            self.notes.append(("reply", call_id, None, repr(exc)))
        else:
            self.notes.append(("reply", call_id, result, None))
        if self.kv_followers and name != "kv_follow":  # a flush changes the cache
            self._kv_events()

    def _kv_events(self) -> None:
        events = self.engine.pool.take_events()
        if events:
            self.notes.append(("kv", events))

    def _report(self, stats) -> None:
        """One message: the outputs since the last, the notes in order, the step's stats and the load. Nothing
        when idle and nothing changed."""
        facts = engine_facts(self.engine, self.adds_seen)
        if stats is None and not self.outbox and not self.notes and facts == self.last_facts:
            return
        outbox = self.outbox.copy()  # the same list stays each request's on_output
        self.outbox.clear()
        notes, self.notes = self.notes, []
        for output in outbox:
            if output.finished:
                stream = self.streams.get(output.request_id)
                if stream is not None and stream.finished:
                    del self.streams[output.request_id]
        self.last_facts = facts
        _send(self.conn, ("batch", pack_outputs(outbox), notes, stats, facts))
