"""vLLM on the same prompts as bench.offline_gpu, in a process of its own (vLLM starts its engine in a subprocess
and keeps GPU memory until its process ends). Random weights of the same shape (`load_format="dummy"`), token-id
prompts, greedy, EOS ignored, vLLM's defaults otherwise:

    python3 -m bench.vllm_peer '{"config": {...LlamaConfig fields...}, "num_requests": 256, ...}' out.json
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VLLM = "vLLM"


def available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def run(spec: dict, timeout_s: float = 900) -> dict:
    """vLLM's throughput row and batch-1 row for this workload, from a fresh process; an error row if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vllm.json"
        try:
            subprocess.run([sys.executable, "-m", __name__, json.dumps(spec), str(out)], check=True, timeout=timeout_s)
            return json.loads(out.read_text())
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            return dict(error=f"{type(exc).__name__}: {exc}")


def _measure(spec: dict) -> dict:
    from transformers import LlamaConfig
    from vllm import LLM, SamplingParams, TokensPrompt

    from bench.offline_common import WARMUP_OUTPUT_LEN, WARMUP_REQUESTS, make_prompts

    config = LlamaConfig(**spec["config"], bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with tempfile.TemporaryDirectory() as model_dir:
        config.save_pretrained(model_dir)
        llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype=spec["dtype"],
                  max_model_len=spec["max_model_len"], **spec.get("vllm_kwargs", {}))

        def generate(prompts: list[list[int]], output_len: int) -> list[list[int]]:
            params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False)
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]

        prompts = make_prompts(config.vocab_size, spec["num_requests"], spec["min_prompt"], spec["max_prompt"],
                               spec["seed"])
        generate(prompts[:WARMUP_REQUESTS], WARMUP_OUTPUT_LEN)
        start = time.perf_counter()
        outputs = generate(prompts, spec["output_len"])
        seconds = time.perf_counter() - start
        num_output = sum(len(o) for o in outputs)
        row = dict(system=VLLM, requests=len(prompts), seconds=seconds, output_tokens=num_output,
                   total_tokens=num_output + sum(len(p) for p in prompts), output_tok_s=num_output / seconds,
                   setup_s=0.0)
        row["total_tok_s"] = row["total_tokens"] / seconds
        batch1 = _batch1(generate, config.vocab_size, spec)
    return dict(row=row, batch1=batch1)


def _batch1(generate, vocab_size: int, spec: dict) -> dict:
    """As bench.offline_gpu.batch1: the median of full runs and of first-token runs, fresh prompts each."""
    import statistics

    from bench.offline_common import make_prompts

    runs, prompt_len, output_len = spec["batch1_runs"], spec["batch1_prompt"], spec["output_len"]
    prompts = make_prompts(vocab_size, 2 * runs, prompt_len, prompt_len, spec["seed"] + 1)

    def timed(prompt, n):
        start = time.perf_counter()
        generate([prompt], n)
        return time.perf_counter() - start

    full = statistics.median(timed(p, output_len) for p in prompts[:runs])
    first = statistics.median(timed(p, 1) for p in prompts[runs:])
    return dict(runs=runs, prompt_len=prompt_len, output_len=output_len, ms_per_token=1e3 * full / output_len,
                decode_ms_per_token=1e3 * (full - first) / (output_len - 1), first_token_ms=1e3 * first)


if __name__ == "__main__":
    result = _measure(json.loads(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(result))
