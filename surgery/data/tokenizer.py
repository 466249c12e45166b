"""Tokenizers for calibration: the model's own (from its checkpoint directory), and a byte-level
stand-in for previews made without a model.

Calibration tokens must come from the model's tokenizer and chat template, or the router sees text
it was never trained on; the stand-in exists only so that `surgery data preview` can show how a
dataset renders before a model is at hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from surgery.errors import SurgeryError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")

# A ChatML template that renders system/user/assistant/tool roles, tool schemas and tool calls, used by
# the byte-level stand-in so that previews show every part of a conversation.
CHATML_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{% endif %}"
    "{{- '<tools>\\n' }}{% for t in tools %}{{ t | tojson + '\\n' }}{% endfor %}"
    "{{- '</tools><|im_end|>\\n' }}{% endif %}"
    "{%- for m in messages %}{% if not (tools and loop.first and m.role == 'system') %}"
    "{{- '<|im_start|>' + m.role + '\\n' + (m.content or '') }}"
    "{%- for c in m.tool_calls or [] %}"
    "{{- '\\n<tool_call>\\n' + ({'name': c.function.name, 'arguments': c.function.arguments} | tojson) }}"
    "{{- '\\n</tool_call>' }}{% endfor %}"
    "{{- '<|im_end|>\\n' }}{% endif %}{% endfor %}"
)


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer (and chat template) stored in a checkpoint directory."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise SurgeryError("not a directory (give the checkpoint's directory)", path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise SurgeryError(
            f"no tokenizer in the checkpoint directory (expected one of {', '.join(TOKENIZER_FILES)})", path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a broken tokenizer
        raise SurgeryError(f"cannot load the tokenizer: {first_line(exc)}", path) from None


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id padding positions get: pad, else end-of-text, else 0 (they are masked out anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A tokenizer whose tokens are UTF-8 bytes, with ChatML specials and template (previews only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                  additional_special_tokens=specials[1:3])
    tok.chat_template = CHATML_TEMPLATE
    return tok


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: user errors are printed on a single line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
