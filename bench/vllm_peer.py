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
    """What bench.offline_gpu measures of our engine (its throughput row and batch-1 row), of vLLM."""
    from transformers import LlamaConfig
    from vllm import LLM, SamplingParams, TokensPrompt

    from bench.offline_common import Run, make_prompts, measure
    from bench.offline_gpu import batch1

    config = LlamaConfig(**spec["config"], bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with tempfile.TemporaryDirectory() as model_dir:
        config.save_pretrained(model_dir)
        llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype=spec["dtype"],
                  max_model_len=spec["max_model_len"], **spec.get("vllm_kwargs", {}))

        def generate(prompts: list[list[int]], output_len: int) -> Run:
            params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False)
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            return Run([list(o.outputs[0].token_ids) for o in outs])

        prompts = make_prompts(config.vocab_size, spec["num_requests"], spec["min_prompt"], spec["max_prompt"],
                               spec["seed"])
        row, _ = measure(VLLM, generate, prompts, spec["output_len"])
        # The same batch-1 prompts as our engine's (bench.offline_gpu.run_engine's seed).
        batch1_row = batch1(generate, config.vocab_size, spec["output_len"], spec["batch1_runs"], spec["seed"] + 1)
    return dict(row=dict(row, requests=len(prompts)), batch1=batch1_row)


if __name__ == "__main__":
    result = _measure(json.loads(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(result))
