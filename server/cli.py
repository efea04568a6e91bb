"""`beastserve` command line: `serve` runs the daemon; `generate`, `chat`, `tokenize` and `health` talk to one;
`demo` runs the offline engine without a server; `distill-draft` makes a draft model for a target.

Only the commands that run the engine (`serve`, `demo`, `distill-draft`) import it (torch, transformers), when
they run: `--help` and the client commands start in a fraction of a second."""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
import time

from server.cli_client import add_client_commands
from server.config import (
    add_engine_args,
    add_server_args,
    check_available,
    config_from_args,
    engine_config_from_args,
)

DEMO_CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for writing clear code.",
    "Explain what a KV cache is in one sentence.",
]


def run_demo(args: argparse.Namespace) -> int:
    from scheduler import LLM, SamplingParams

    llm = LLM(engine_config_from_args(args))
    chats = [[{"role": "user", "content": q}] for q in (args.prompt or DEMO_CHATS)]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)  # --seed seeds the engine
    start = time.perf_counter()
    outputs = llm.chat(chats, params)
    elapsed = time.perf_counter() - start
    for chat, out in zip(chats, outputs):
        print(f"\n>>> {chat[0]['content']}\n{out.text.strip()}  [{out.finish_reason}]")
    num_tokens = sum(len(o.token_ids) for o in outputs)
    print(f"\n{len(outputs)} answers, {num_tokens} tokens in {elapsed:.2f} s ({num_tokens / elapsed:.1f} tok/s)")
    return 0


def add_passthrough_command(subparsers, name: str, help_text: str, module: str, runs_engine: bool = False) -> None:
    """`beastserve NAME ...`: every argument goes on to module.main's own parser, and the module is
    imported only when the command runs (the daemon never loads training or load-testing code)."""
    parser = subparsers.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")  # `-x` stays an argument
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    parser.set_defaults(func=lambda args: importlib.import_module(module).main(args.argv, prog=f"beastserve {name}"),
                        runs_engine=runs_engine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beastserve", description="LLM serving daemon")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon (gRPC, OpenAI HTTP, metrics)",
                           description="Every flag also reads BEASTSERVE_<FLAG> from the environment.")
    add_server_args(serve)
    serve.set_defaults(func=run_serve, runs_engine=True)
    demo = sub.add_parser("demo", help="answer a few chat prompts with the offline engine")
    add_engine_args(demo)
    demo.add_argument("--prompt", action="append", help="a user message (repeatable; default: four sample "
                      "questions)")
    demo.add_argument("--max-tokens", type=int, default=64, help="most tokens per answer (default: %(default)s)")
    demo.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    demo.set_defaults(func=run_demo, runs_engine=True)
    add_passthrough_command(sub, "distill-draft", "make a draft model for speculative decoding",
                            "scheduler.distill.command", runs_engine=True)
    add_client_commands(sub)
    add_passthrough_command(sub, "bench", "load-test a running daemon or OpenAI-compatible server (TTFT, TPOT, ITL, "
                            "throughput)", "server.loadgen.load")
    parser.subcommands = sub.choices  # name -> that command's parser
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the subcommand's parser, so the usage shown is the subcommand's
            parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
        args.command_line = shlex.join(["beastserve", *argv])
    except ValueError as exc:  # a bad BEASTSERVE_* value
        print(f"beastserve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "runs_engine", False) and not sys.stderr.isatty():
        quiet_progress_bars()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"beastserve: {exc}", file=sys.stderr)
        return 2


def quiet_progress_bars() -> None:
    """transformers' and huggingface_hub's tqdm bars redraw a line in place: in a log file, a pile of lines."""
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def run_serve(args: argparse.Namespace) -> int:
    from server.app import serve

    config = config_from_args(args)
    check_available(config.engine)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
