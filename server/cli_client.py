"""`beastserve generate | chat | health`: talk to a running daemon over gRPC."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Iterable

import grpc

from server.client import DEFAULT_ADDRESS, READINESS_SERVICE, Client
from server.proto.beastserve.v1 import generate_pb2 as pb


def add_client_commands(subparsers) -> None:
    """Add the `generate`, `chat` and `health` subcommands; each sets `func` to a function(args) -> exit code."""
    generate = subparsers.add_parser("generate", help="stream one answer from a running daemon")
    generate.add_argument("prompt")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    _add_sampling_args(generate)
    _add_connection_args(generate)
    generate.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="talk with a running daemon; /exit or end of input leaves")
    chat.add_argument("--system", help="a system message to open the conversation with")
    _add_sampling_args(chat)
    _add_connection_args(chat)
    chat.set_defaults(func=run_chat)

    health = subparsers.add_parser("health", help="print whether a daemon is ready; exit 0 only when SERVING")
    health.add_argument("--live", action="store_true",
                        help="check liveness (the process answers, even while the model loads) instead of readiness")
    health.add_argument("--service", default=None,
                        help=f"the health service to check (default: {READINESS_SERVICE}, readiness; '' is liveness)")
    health.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep asking for up to this long until SERVING (default: 0, ask once)")
    _add_connection_args(health)
    health.set_defaults(func=run_health)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    # No defaults here: what is not given is left out of the request, so the server's defaults apply.
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="a stop string (repeatable)")


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--address", default=env("BEASTSERVE_ADDRESS", DEFAULT_ADDRESS),
                        help=f"host:port of the daemon [BEASTSERVE_ADDRESS, default {DEFAULT_ADDRESS}]")
    parser.add_argument("--api-key", default=env("BEASTSERVE_API_KEY"),
                        help="sent as authorization: Bearer <key>; prefer the environment [BEASTSERVE_API_KEY]")
    parser.add_argument("--tls-ca-file", help="CA that the server's certificate chains to (turns TLS on)")
    parser.add_argument("--tls-cert-file", help="client certificate, for mutual TLS")
    parser.add_argument("--tls-key-file", help="client private key, for mutual TLS")
    parser.add_argument("--timeout", type=float, help="deadline per call, in seconds")


def _reporting_errors(run):
    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except grpc.RpcError as exc:
            print(f"beastserve: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except (ValueError, OSError) as exc:  # bad options or unreadable TLS files
            print(f"beastserve: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # leaving the `with Client` closed the channel, which cancels the call
            print()
            return 130
    return wrapper


def _connect(args: argparse.Namespace) -> Client:
    return Client(args.address, api_key=args.api_key, tls_ca_file=args.tls_ca_file, tls_cert_file=args.tls_cert_file,
                  tls_key_file=args.tls_key_file, timeout=args.timeout)


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, stop=args.stop)


@_reporting_errors
def run_generate(args: argparse.Namespace) -> int:
    prompt = dict(chat=[{"role": "user", "content": args.prompt}]) if args.chat else dict(prompt=args.prompt)
    with _connect(args) as client:
        _, last = print_stream(client.stream(**prompt, **_sampling_kwargs(args)))
    print(summary(last), file=sys.stderr)
    return 0


@_reporting_errors
def run_chat(args: argparse.Namespace) -> int:
    history = [{"role": "system", "content": args.system}] if args.system else []
    with _connect(args) as client:
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return 0
            if line.strip() == "/exit":
                return 0
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            answer, _ = print_stream(client.stream(chat=history, **_sampling_kwargs(args)))
            history.append({"role": "assistant", "content": answer})


@_reporting_errors
def run_health(args: argparse.Namespace) -> int:
    if args.wait < 0:
        raise ValueError(f"--wait must be >= 0 seconds, got {args.wait}")
    service = "" if args.live else READINESS_SERVICE if args.service is None else args.service
    deadline = time.monotonic() + args.wait
    with _connect(args) as client:
        while True:
            try:
                status = client.health(service, timeout=5)
            except grpc.RpcError as exc:
                # While waiting, a daemon that is not listening yet is one that is not ready yet.
                if time.monotonic() >= deadline or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                status = None
            if status == "SERVING" or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
    print(status)
    return 0 if status == "SERVING" else 1


def print_stream(responses: Iterable[pb.GenerateResponse]) -> tuple[str, pb.GenerateResponse]:
    """Write each delta to stdout as it arrives, then a newline; return the whole text and the last message."""
    parts, last = [], pb.GenerateResponse()
    for last in responses:
        print(last.text, end="", flush=True)
        parts.append(last.text)
    print()
    return "".join(parts), last


def summary(last: pb.GenerateResponse) -> str:
    """One line from the last message: why it finished, token counts and latency."""
    reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    matched = last.WhichOneof("matched_stop")
    stop = f" stop={getattr(last, matched)!r}" if matched else ""
    usage, timing = last.usage, last.timing
    return (f"finish={reason}{stop} prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens} "
            f"cached_tokens={usage.cached_tokens} ttft={timing.ttft_s * 1e3:.1f}ms e2e={timing.e2e_s * 1e3:.1f}ms")
