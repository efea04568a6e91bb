"""Host-side cost of speculative decoding, measured on CPU with a tiny random-weight model.

With 2 layers of width 64 the forward pass costs next to nothing, so a step's time is almost
all Python and framework overhead: the regime a GPU step is in once it replays CUDA graphs.

    python -m bench.spec_overhead --concurrency 1,4,16,64 --repeats 3
    python -m bench.spec_overhead --modes ngram-fixed-k --concurrency 16 --profile
    python -m bench.spec_overhead --modes off,draft-fixed-k --temperature 0.7   # sampled verification

Prompts repeat a short pattern; greedy decoding of a random model falls into loops too, so
n-gram drafts are mostly accepted. The draft modes draft with the target itself (every draft is
accepted; its passes cost what a tiny draft's do), draft-unrelated with a 1-layer random model
(almost no draft accepted: the adaptive depth must find that no depth pays). The eagle modes draft
with an untrained EAGLE head for the target (its passes and the target's kept hidden states cost what
a trained head's do; almost nothing is accepted, so eagle-fixed-k shows the cost of a step's k passes).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import logging
import platform
import pstats
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from scheduler import Engine, SamplingParams

KV_CACHE_BYTES = 64 * 2**20  # 8192 blocks of the tiny model: every sequence fits, allocation stays quick
MODES = {  # name -> engine options
    "off": dict(speculative="off"),
    "ngram-fixed-k": dict(speculative="ngram", adaptive_speculation=False),
    "ngram": dict(speculative="ngram"),
    "draft-fixed-k": dict(speculative="draft", adaptive_speculation=False),
    "draft": dict(speculative="draft"),
    "draft-unrelated": dict(speculative="draft"),  # a random draft: almost nothing accepted
    "eagle-fixed-k": dict(speculative="eagle", adaptive_speculation=False),
    "eagle": dict(speculative="eagle"),
}


def save_random_model(path: Path, num_layers: int, seed: int) -> None:
    logging.getLogger("scheduler").setLevel(logging.ERROR)  # no tokenizer: token-id prompts only
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=None,
                                  pad_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked distributions: greedy decoding loops sooner
    model.save_pretrained(path)


def save_random_head(model_dir: Path, path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from scheduler.speculative.draft.compact import target_fingerprint
    from scheduler.speculative.eagle.files import save_head
    from scheduler.speculative.eagle.head import EagleHead

    target = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(2)
    save_head(EagleHead.for_target(target.config), path, {"target": "random", "command": "bench/spec_overhead.py",
                                                          "target_fingerprint": target_fingerprint(target)})


def prompts_for(num: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        pattern = [rng.randrange(512) for _ in range(rng.randrange(4, 12))]
        prompts.append(pattern * (48 // len(pattern)) + [rng.randrange(512) for _ in range(8)])
    return prompts


def run_load(engine: Engine, prompts: list[list[int]], concurrency: int, max_tokens: int,
             temperature: float = 0.0) -> dict:
    """Keep `concurrency` requests in flight until every prompt is answered; time decode steps."""
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True)
    pending, live = list(prompts), []
    steps, step_seconds, output_tokens = 0, 0.0, 0
    drafted = accepted = 0
    start = time.perf_counter()
    while pending or live:
        while pending and len(live) < concurrency:
            live.append(engine.add_request(None, params, prompt_token_ids=pending.pop(0)))
        engine.step()
        stats = engine.last_step_stats
        steps += 1
        step_seconds += stats.step_s
        output_tokens += stats.num_generation_tokens
        drafted += stats.num_draft_tokens
        accepted += sum(stats.accepted_per_position)
        live = [s for s in live if not s.finished]
    wall = time.perf_counter() - start
    return {"steps": steps, "ms_per_step": 1000 * step_seconds / steps, "ms_per_token": 1000 * wall / output_tokens,
            "tokens_per_step": output_tokens / steps, "acceptance": accepted / drafted if drafted else None}


def bench(args, mode: str, model_dir: Path, concurrency: int, profiler: cProfile.Profile | None = None) -> list[dict]:
    options = dict(MODES[mode], num_speculative_tokens=args.k)
    if options["speculative"] == "draft":
        options["draft_model"] = str(model_dir.parent / "unrelated" if mode == "draft-unrelated" else model_dir)
    if options["speculative"] == "eagle":
        options["eagle_head"] = str(model_dir.parent / "head")
    engine = Engine(model=str(model_dir), dtype="float32", max_num_seqs=max(concurrency, 1),
                    max_num_batched_tokens=4096, kv_cache_bytes=KV_CACHE_BYTES, **options)
    prompts = prompts_for(args.requests_per_concurrency * concurrency)
    run_load(engine, prompts[:concurrency], concurrency, 16, args.temperature)  # warm-up
    if profiler is not None:
        profiler.enable()
    runs = [run_load(engine, prompts, concurrency, args.output_len, args.temperature) for _ in range(args.repeats)]
    if profiler is not None:
        profiler.disable()
    del engine
    gc.collect()
    return runs


def profile(args, model_dir: Path) -> None:
    for mode in args.modes:
        for c in args.concurrency:
            profiler = cProfile.Profile()
            bench(args, mode, model_dir, c, profiler)
            print(f"=== {mode} c={c}")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES), type=lambda s: s.split(","))
    parser.add_argument("--concurrency", default="1,4,16,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--requests-per-concurrency", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print a cProfile top list instead of timings")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "target"
        save_random_model(model_dir, 2, seed=0)
        save_random_model(Path(tmp) / "unrelated", 1, seed=1)
        save_random_head(model_dir, Path(tmp) / "head")
        if args.profile:
            return profile(args, model_dir)
        print(f"# {platform.processor() or platform.machine()}, {args.threads} torch thread(s), torch "
              f"{torch.__version__}, k_max {args.k}, {args.output_len} output tokens, "
              f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}")
        print("| mode | c | ms/step | ms/token | tokens/step | acceptance |")
        print("|---|---|---|---|---|---|")
        for mode in args.modes:
            for c in args.concurrency:
                runs = bench(args, mode, model_dir, c)
                acc = runs[0]["acceptance"]
                print(f"| {mode} | {c} | {statistics.median(r['ms_per_step'] for r in runs):.2f} | "
                      f"{statistics.median(r['ms_per_token'] for r in runs):.3f} | "
                      f"{runs[0]['tokens_per_step']:.2f} | {'-' if acc is None else f'{acc:.2f}'} |", flush=True)


if __name__ == "__main__":
    main()
