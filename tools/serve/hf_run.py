"""Greedy decoding with transformers (the project's venv): the reference vLLM is compared with.

    .venv/bin/python tools/serve/hf_run.py SPEC.json OUT.json

SPEC: {"models": {name: {"path": p, "dtype": "float32"}}, "prompts": [[token ids]], "max_tokens": N}.
OUT: {name: {"tokens": [[ids]], "logprobs": [[top-1 log-probability]], "gaps": [[top-1 minus top-2]],
"seconds": s}}. Decoding uses transformers' KV cache, in the given dtype; log-probabilities are taken in
float32.
"""

from __future__ import annotations

import json
import sys
import time


def decode(path: str, prompts: list[list[int]], max_tokens: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    out = {"tokens": [], "logprobs": [], "gaps": []}
    with torch.no_grad():
        for prompt in prompts:
            step = model(torch.tensor([prompt]), use_cache=True)
            tokens, logprobs, gaps = [], [], []
            for _ in range(max_tokens):
                lp = torch.log_softmax(step.logits[0, -1].float(), dim=-1)
                top = torch.topk(lp, 2)
                tokens.append(int(top.indices[0]))
                logprobs.append(float(top.values[0]))
                gaps.append(float(top.values[0] - top.values[1]))
                step = model(top.indices[:1].view(1, 1), past_key_values=step.past_key_values, use_cache=True)
            out["tokens"].append(tokens)
            out["logprobs"].append(logprobs)
            out["gaps"].append(gaps)
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    result = {name: decode(m["path"], spec["prompts"], spec["max_tokens"], m["dtype"])
              for name, m in spec["models"].items()}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
