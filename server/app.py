"""The daemon: gRPC server, health, reflection, metrics, engine loading, watchdog and drain."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
from dataclasses import replace

import grpc
import prometheus_client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from scheduler import Engine, SamplingParams
from scheduler.phases import Phases
from server.async_engine import AsyncEngine
from server.calls import ServerState
from server.config import ServerConfig, served_name
from server.core_client import ProcessEngine
from server.malformed import MalformedRequestInterceptor
from server.metrics import ServerMetrics
from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc
from server.security import ApiKeyInterceptor, exposure_warning, load_api_keys, server_credentials
from server.service import SERVICE_NAME, GenerationService
from server.vllm_service import SERVICE_NAME as VLLM_SERVICE_NAME
from server.vllm_service import VllmEngineService

log = logging.getLogger("beastserve")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StartupError(ValueError):
    """A start that cannot go on (a port taken); the command line prints it as one line."""


class Daemon:
    def __init__(self, config: ServerConfig):
        self.config = config
        prometheus_client.disable_created_metrics()  # *_created series only clutter dashboards
        engine = config.engine
        num_draft_positions = engine.num_speculative_tokens if engine.speculative != "off" else 0
        metrics = ServerMetrics(served_name(config), num_draft_positions=num_draft_positions)
        self.state = ServerState(config, metrics=metrics)
        self.health = HealthServicer()
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self.server: grpc.aio.Server | None = None
        self.http = None  # the OpenAI HTTP API's server, when --http-port is set

    async def run(self) -> int:
        try:
            await self._start_server()
        except StartupError:
            if self.server is not None:
                await self.server.stop(0)
            if self.http is not None:
                await self.http.stop()
            raise
        try:
            await self._load_engine()
        except Exception:
            log.exception("failed to load the model")
            await self.server.stop(0)
            if self.http is not None:
                await self.http.stop()
            return 1
        self._install_signal_handlers()
        watchdog = asyncio.create_task(self._watch_engine())
        await self.stopping.wait()
        watchdog.cancel()
        await self._drain()
        return self.exit_code

    async def _start_server(self) -> None:
        config = self.config
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   # gRPC turns SO_REUSEPORT on by default: a second daemon would share the port, not fail.
                   ("grpc.so_reuseport", 0)]
        generation, vllm_engine = GenerationService(self.state), VllmEngineService(self.state)
        interceptors = [ApiKeyInterceptor(load_api_keys(config.api_key_file))] if config.api_key_file else []
        # Inside the API keys' check: a caller without a key learns nothing from how its message parses.
        interceptors.append(MalformedRequestInterceptor({
            f"/{SERVICE_NAME}/Generate": generation.fail, f"/{SERVICE_NAME}/GenerateStream": generation.fail,
            f"/{VLLM_SERVICE_NAME}/Generate": vllm_engine.fail}))
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_GenerationServicer_to_server(generation, self.server)
        vpb_grpc.add_VllmEngineServicer_to_server(vllm_engine, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((pb.DESCRIPTOR.services_by_name["Generation"].full_name,
                                             VLLM_SERVICE_NAME,
                                             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                             reflection.SERVICE_NAME), self.server)
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert_file:
                creds = server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
                self.port = self.server.add_secure_port(address, creds)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise StartupError(f"port {config.port} is already in use (or {config.host} is not an address here)")
        await self.health.set("", SERVING)  # liveness: the process answers
        await self.health.set(SERVICE_NAME, NOT_SERVING)  # readiness: not until the model is warm
        await self.server.start()
        if config.metrics_port:
            try:
                self.state.metrics.start_http_server(config.metrics_port, config.host)
            except OSError as exc:
                raise _bind_error("metrics port", config.metrics_port, exc) from None
        if config.http_port:
            self._start_http()
        log.info("gRPC listening on %s:%d (%s)%s%s", config.host, self.port, "TLS" if config.tls_cert_file else
                 "plaintext", f"; metrics on http://{config.host}:{config.metrics_port}/metrics"
                 if config.metrics_port else "", f"; OpenAI API on {self.http.url}" if self.http else "")
        warning = exposure_warning(config.host, bool(config.tls_cert_file), bool(config.api_key_file),
                                   config.metrics_port)
        if warning:
            log.warning(warning)

    def _start_http(self) -> None:
        from server.openai.app import HttpServer  # FastAPI and uvicorn: only when the HTTP API is on

        self.http = HttpServer(self.state)
        try:
            self.http.bind()
        except OSError as exc:
            raise _bind_error("HTTP port", self.config.http_port, exc) from None
        self.http.start()

    async def _load_engine(self) -> None:
        config = self.config
        phases = Phases()
        # A collective waiting on a lost tensor-parallel rank fails within the stall timeout.
        timeout = min(config.engine.distributed_timeout_s, config.stall_timeout)
        engine_config = replace(config.engine, distributed_timeout_s=timeout)
        options = dict(max_queue_size=config.max_queue_size, stream_interval=config.stream_interval)
        with phases("engine"):
            if config.engine_core == "process":
                async_engine = await ProcessEngine.launch(engine_config, Engine, **options)
            else:
                async_engine = AsyncEngine(await asyncio.to_thread(Engine, engine_config, serving=True), **options)
        engine = async_engine.engine
        log.info("model %s (%s) on %s (%s); KV cache holds %d tokens; max_model_len %d; engine core in %s",
                 served_name(config), config.engine.model, engine.device, str(engine.dtype).removeprefix("torch."),
                 engine.kv_capacity_tokens, engine.max_model_len,
                 "a process of its own" if config.engine_core == "process" else "a thread")
        if config.engine_core == "thread":
            async_engine.start()
        with phases("warm-up"):
            async for _ in async_engine.generate([0], SamplingParams(max_tokens=1, temperature=0), "warmup"):
                pass
        async_engine.metrics = self.state.metrics  # from here on: the warm-up is no one's request
        self.state.engine = async_engine
        await self.health.set(SERVICE_NAME, SERVING)
        log.info("ready after %.2f s: %s", phases.total, phases)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)

    async def _watch_engine(self) -> None:
        """Readiness follows the engine: a dead or stuck engine must not look healthy."""
        engine = self.state.engine
        ready = True
        while True:
            await asyncio.sleep(0.5)
            if not engine.alive:
                log.error("engine died (%r); exiting so the orchestrator restarts the process", engine.error)
                await self.health.set(SERVICE_NAME, NOT_SERVING)
                self.exit_code = 1
                self.stopping.set()
                return
            healthy = engine.stalled_for() < self.config.stall_timeout
            if healthy != ready:
                ready = healthy
                log.warning("engine %s", "progressing again" if healthy else
                            f"made no progress for {self.config.stall_timeout:.0f} s with work pending")
                await self.health.set(SERVICE_NAME, SERVING if healthy else NOT_SERVING)

    async def _drain(self) -> None:
        """Stop taking work, let in-flight requests finish for drain_timeout, end the rest UNAVAILABLE."""
        state = self.state
        state.draining = True
        await self.health.set(SERVICE_NAME, NOT_SERVING)
        log.info("draining %d in-flight requests (up to %.0f s)", len(state.in_flight), self.config.drain_timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        while state.in_flight and loop.time() < deadline and state.engine.alive:
            await asyncio.sleep(0.05)
        if state.in_flight:
            log.warning("%d requests still running at the drain timeout; ending them", len(state.in_flight))
            state.engine.abort(list(state.in_flight.values()))
        while state.in_flight and state.engine.alive and loop.time() < deadline + 5:
            await asyncio.sleep(0.05)
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace=2)
        state.engine.stop()
        log.info("stopped")


def _bind_error(what: str, port: int, exc: OSError) -> StartupError:
    why = "is already in use" if exc.errno == errno.EADDRINUSE else f": {exc.strerror or exc}"
    return StartupError(f"{what} {port} {why}")


def serve(config: ServerConfig) -> int:
    import uvloop

    return uvloop.run(Daemon(config).run())
