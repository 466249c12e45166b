#!/usr/bin/env bash
# `just floor-check`: surgery on the lowest transformers pyproject allows (surgery.compat.TRANSFORMERS_FLOOR),
# in .venv-floor (git-ignored): one family's oracle tests (the in-memory model against the streaming
# engine), the chat-template bounds, and a `surgery calibrate`. The project's .venv tests the newest transformers; this,
# the floor.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

floor=$(sed -n 's/^TRANSFORMERS_FLOOR = "\([^"]*\)".*/\1/p' surgery/compat.py)
venv=.venv-floor
py=$venv/bin/python
start=$(date +%s)
source tools/venv.sh  # ensure_venv
ensure_venv "$venv" "import sys, surgery, pytest, transformers; sys.exit(transformers.__version__ != '$floor')" \
    -e . pytest "transformers==$floor"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$py" -c "import transformers; print('floor-check: transformers', transformers.__version__)"
"$py" -m pytest -q -p no:cacheprovider tests/test_oracle.py tests/test_calibrate.py -k minimax_m2
# a paged layer's replay computes the decoder layer's second half itself (surgery.executor.residual): it must
# equal this transformers' own layer, for a plain family, one with a tuple-returning block, and MTP
"$py" -m pytest -q -p no:cacheprovider tests/test_paging.py \
    -k "bit_identical and (minimax_m2 or gpt_oss or glm4_moe-mtp) or runs_no_attention"
# chat templates render bounded through whichever compiler this transformers has (surgery.compat)
"$py" -m pytest -q -p no:cacheprovider tests/test_reliability_templates.py
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" - "$work/model" <<'PY'
import sys
import torch
from surgery.synth import make_checkpoint, make_tokenizer
from transformers import AutoTokenizer
out = sys.argv[1]
make_tokenizer(out, vocab_size=512)
tok = AutoTokenizer.from_pretrained(out)
make_checkpoint(out, "qwen3_moe", dtype=torch.bfloat16, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
PY
"$venv/bin/surgery" calibrate "$work/model" --work "$work/cal" --samples 8 --max-length 64 --device cpu --no-progress
test -s "$work/cal/saliency.json"
echo "floor-check: OK on transformers $floor in $(( $(date +%s) - start )) s"
