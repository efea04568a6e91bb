"""`beastserve generate | chat | tokenize | health`: talk to a running daemon over gRPC. Nothing here imports
the engine (torch, transformers), and gRPC and the client are imported by the commands that call, when they
run: `--help` needs neither. These commands start in a fraction of a second."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from server.defaults import DEFAULT_ADDRESS, READINESS_SERVICE

if TYPE_CHECKING:
    import grpc

    from server.client import Client, Response


def add_client_commands(subparsers) -> None:
    """Add the `generate`, `chat`, `tokenize` and `health` subcommands; each sets `func` to a function(args) -> exit
    code."""
    generate = subparsers.add_parser("generate", help="stream one answer from a running daemon",
                                     description="Stream one answer from a running daemon; a summary line (finish "
                                     "reason, token counts, latency) goes to stderr.")
    _add_text_args(generate, "prompt", "send the prompt")
    _add_sampling_args(generate)
    _add_connection_args(generate)
    generate.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="talk with a running daemon", description=CHAT_HELP)
    chat.add_argument("--system", help="a system message to open the conversation with (default: none)")
    _add_sampling_args(chat)
    _add_connection_args(chat)
    chat.set_defaults(func=run_chat)

    tokenize = subparsers.add_parser("tokenize", help="print the token ids a running daemon makes of a text",
                                     description="Print the token ids the daemon's tokenizer makes of a text (or, "
                                     "with --chat, of a user message in the chat template), space-separated.")
    _add_text_args(tokenize, "text", "tokenize the text")
    tokenize.add_argument("--no-special-tokens", dest="add_special_tokens", action="store_false",
                          help="leave out the special tokens the tokenizer adds (e.g. BOS) (default: added)")
    _add_connection_args(tokenize)
    tokenize.set_defaults(func=run_tokenize)

    health = subparsers.add_parser("health", help="print whether a daemon is ready; exit 0 only when SERVING")
    health.add_argument("--live", action="store_true",
                        help="check liveness (the process answers, even while the model loads) instead of readiness")
    health.add_argument("--service", default=None,
                        help=f"the health service to check (default: {READINESS_SERVICE}, readiness; '' is liveness)")
    health.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep asking for up to this long until SERVING (default: 0, ask once)")
    _add_connection_args(health)
    health.set_defaults(func=run_health)


def _add_text_args(parser: argparse.ArgumentParser, name: str, what: str) -> None:
    parser.add_argument(name, help=f"the {name} (or, with --chat, the user's message)")
    parser.add_argument("--chat", action="store_true",
                        help=f"{what} as a user chat message, in the model's chat template (default: off)")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    # No defaults here: what is not given is left out of the request, so the daemon's defaults apply.
    parser.add_argument("--max-tokens", type=int, help="most tokens to generate (default: until the end of "
                        "sequence or the context length)")
    parser.add_argument("--temperature", type=float, help="0 = greedy (default: 1.0)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1] (default: 1.0, off)")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (default: 0, off)")
    parser.add_argument("--seed", type=int, help="seed of this request's random stream, in [0, 2**63) "
                        "(default: none, a fresh stream)")
    parser.add_argument("--stop", action="append", help="a stop string (repeatable; default: none)")


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--address", default=env("BEASTSERVE_ADDRESS", DEFAULT_ADDRESS),
                        help=f"host:port of the daemon [BEASTSERVE_ADDRESS, default {DEFAULT_ADDRESS}]")
    parser.add_argument("--api-key", default=env("BEASTSERVE_API_KEY"),
                        help="sent as authorization: Bearer <key>; prefer the environment [BEASTSERVE_API_KEY; "
                        "default: none]")
    parser.add_argument("--tls-ca-file", help="CA that the server's certificate chains to (turns TLS on; "
                        "default: none, plaintext)")
    parser.add_argument("--tls-cert-file", help="client certificate, for mutual TLS (default: none)")
    parser.add_argument("--tls-key-file", help="client private key, for mutual TLS (default: none)")
    parser.add_argument("--timeout", type=float, help="deadline per call, in seconds (default: none)")


def _reporting_errors(run):
    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        import grpc

        try:
            return run(args)
        except grpc.RpcError as exc:
            print(f"beastserve: {rpc_error_text(exc, args.address)}", file=sys.stderr)
            return 1
        except (ValueError, OSError) as exc:  # bad options or unreadable TLS files
            print(f"beastserve: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # leaving the `with Client` closed the channel, which cancels the call
            print()
            return 130
    return wrapper


def rpc_error_text(exc: grpc.RpcError, address: str) -> str:
    import grpc

    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.UNAVAILABLE and ("refused" in details or "failed to connect" in details):
        return (f"no daemon is running at {address} (connection refused); start one with `beastserve serve` "
                "(or `make serve`), or give its address with --address or BEASTSERVE_ADDRESS")
    return f"{exc.code().name}: {details}"


def _connect(args: argparse.Namespace) -> Client:
    from server.client import Client

    return Client(args.address, api_key=args.api_key, tls_ca_file=args.tls_ca_file, tls_cert_file=args.tls_cert_file,
                  tls_key_file=args.tls_key_file, timeout=args.timeout)


def _text(args: argparse.Namespace, name: str) -> dict:
    """{name: the text}, or with --chat {"chat": [the text as a user message]}."""
    text = getattr(args, name)
    return dict(chat=[{"role": "user", "content": text}]) if args.chat else {name: text}


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, stop=args.stop)


@_reporting_errors
def run_generate(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        _, last = print_stream(client.stream(**_text(args, "prompt"), **_sampling_kwargs(args)))
    print(summary(last), file=sys.stderr)
    return 0


CHAT_HELP = """Talk with a running daemon. Commands:
  /exit     leave (so does Ctrl-D)
  /reset    start a new conversation (the --system message stays)
  /help     show this
Ctrl-C stops the answer being written (the daemon drops it) and keeps the conversation.
An answer cut by --max-tokens ends with [length]."""


@_reporting_errors
def run_chat(args: argparse.Namespace) -> int:
    sampling = _sampling_kwargs(args)
    from server.client import build_request

    build_request(chat=[{"role": "user", "content": "?"}], **sampling)  # bad flags fail now, not after a message
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history = list(opening)
    with _connect(args) as client:
        client.health(timeout=10)  # so does a daemon that is not running
        print(f"beastserve chat with {args.address}: /exit to leave, /reset to start over, /help for more",
              file=sys.stderr)
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:  # at the prompt, as in a shell: a fresh line
                print()
                continue
            if line == "/exit":
                return 0
            if line == "/help":
                print(CHAT_HELP)
            elif line == "/reset":
                history = list(opening)
                print("[new conversation]")
            elif line.startswith("/"):
                print(f"unknown command {line.split()[0]}; /help lists them")
            elif line:
                answer = _answer(client, [*history, {"role": "user", "content": line}], sampling)
                if answer is not None:
                    history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]


def _answer(client: Client, messages: list[dict], sampling: dict) -> str | None:
    """Stream one answer; None when Ctrl-C stopped it (the call is cancelled, so the daemon aborts it)."""
    stream = client.stream(chat=messages, **sampling)
    try:
        answer, _ = print_stream(stream, mark_cut=True)
    except KeyboardInterrupt:
        stream.cancel()
        print("[stopped; not kept in the conversation]")
        return None
    return answer


@_reporting_errors
def run_tokenize(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        token_ids = client.tokenize(**_text(args, "text"), add_special_tokens=args.add_special_tokens)
    print(" ".join(map(str, token_ids)))
    return 0


@_reporting_errors
def run_health(args: argparse.Namespace) -> int:
    if args.wait < 0:
        raise ValueError(f"--wait must be >= 0 seconds, got {args.wait}")
    import grpc

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


def print_stream(responses: Iterable[Response], mark_cut: bool = False) -> tuple[str, Response]:
    """Write each delta to stdout as it arrives, then a newline (also when the stream fails or is stopped, so an
    error starts on its own line); return the whole text and the last message. With `mark_cut`, an answer cut by
    its length limit ends with ` [length]`, and one whose last character was cut says so."""
    parts, last, end = [], None, "\n"
    try:
        for last in responses:
            if mark_cut and last.finish_reason == "length":
                end = " [length]\n"
            if mark_cut and last.held_back_bytes:
                end = f"{end.rstrip()} [{held_back_text(last)}]\n"
            print(last.text, end="", flush=True)
            parts.append(last.text)
    except BaseException:
        if any(parts):
            print(flush=True)
        raise
    print(end=end, flush=True)
    return "".join(parts), last


def summary(last: Response) -> str:
    """One line from the last message: why it finished, token counts and latency."""
    matched = last.WhichOneof("matched_stop")
    stop = f" stop={getattr(last, matched)!r}" if matched else " stop=eos" if last.finish_reason == "stop" else ""
    usage, timing = last.usage, last.timing
    held_back = f" held_back_bytes={last.held_back_bytes} ({held_back_text(last)})" if last.held_back_bytes else ""
    return (f"finish={last.finish_reason}{stop} prompt_tokens={usage.prompt_tokens} "
            f"completion_tokens={usage.completion_tokens} cached_tokens={usage.cached_tokens} "
            f"ttft={timing.ttft_s * 1e3:.1f}ms e2e={timing.e2e_s * 1e3:.1f}ms{held_back}")


def held_back_text(last: Response) -> str:
    return (f"the answer ends inside a character: its first {last.held_back_bytes} bytes are in the tokens, not in "
            "the text")
