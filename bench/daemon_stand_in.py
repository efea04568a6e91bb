"""The daemon as bench/daemon_vs_offline.py runs it: `beastserve serve` with bench.host_path's stand-in forward,
telling the bench where its engine runs (the engine thread's id, or the engine core's process id) and, when asked,
profiling its threads and watching its garbage collector."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

from bench.host_path import ModelClock

ENGINE_TID_FILE = "BEASTSERVE_BENCH_ENGINE_TID_FILE"
PROFILE_DIR = "BEASTSERVE_BENCH_PROFILE_DIR"  # set: the daemon's two threads run under cProfile, stats written here


def stand_in_engine(*args, **kwargs):
    """The daemon's Engine with the stand-in forward; a module-level function, so an engine core in a process of
    its own (--engine-core process) builds it too, writing its process id where the bench reads it."""
    from scheduler import Engine  # the real one: the daemon's server.app.Engine is this function

    built = Engine(*args, **kwargs)
    ModelClock(built.model, real=False)
    if multiprocessing.parent_process() is not None:  # the engine core's process
        Path(os.environ[ENGINE_TID_FILE]).with_suffix(".core").write_text(str(os.getpid()))
        from server.core_process import Core

        real_run = Core.run
        Core.run = lambda self: profiled(real_run, "engine-core", self)
    return built


def serve_stand_in(argv: list[str]) -> int:
    """`beastserve serve` with the stand-in forward, writing its engine thread's id where the bench reads it."""
    import server.app
    from server.async_engine import AsyncEngine

    real_loop = AsyncEngine._loop

    def loop(self):
        Path(os.environ[ENGINE_TID_FILE]).write_text(str(threading.get_native_id()))
        profiled(real_loop, "engine-thread", self)

    server.app.Engine, AsyncEngine._loop = stand_in_engine, loop
    watch_gc(Path(os.environ[ENGINE_TID_FILE]).with_suffix(".gc.json"))
    from server.cli import main

    return profiled(main, "event-loop", ["serve", *argv])


def watch_gc(out: Path) -> None:
    """The garbage collector's passes, (end time, generation, wall seconds) each, written to `out` at exit."""
    import atexit
    import gc

    passes, started = [], [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            passes.append((time.time(), info["generation"], time.perf_counter() - started[0]))

    gc.callbacks.append(on_gc)
    atexit.register(lambda: out.write_text(json.dumps(passes)))


def profiled(fn, name: str, *args):
    """fn(*args), under cProfile when PROFILE_DIR is set (its stats written to PROFILE_DIR/name.prof)."""
    if not os.environ.get(PROFILE_DIR):
        return fn(*args)
    import cProfile

    profile = cProfile.Profile()
    try:
        return profile.runcall(fn, *args)
    finally:
        profile.dump_stats(Path(os.environ[PROFILE_DIR]) / f"{name}.prof")
