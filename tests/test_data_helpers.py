"""Shared pieces of the calibration-data tests: the fixture files, and a tiny real tokenizer (byte-level
BPE trained here on a few KB of text, so the tests need no download and no ../shared)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# Renders roles and content only: tools, tool calls and tool-call ids never reach the text (like the
# shared fixtures' template and many real ones).
DROPPING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                     "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Refuses system messages and tool messages, as some real templates do.
STRICT_TEMPLATE = ("{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
                   "{{ raise_exception('roles must be user or assistant') }}{% endif %}"
                   "[{{ m.role }}] {{ m.content }}\n{% endfor %}")


def training_text() -> list[str]:
    """A few KB: the fixture files and some prose, enough for a BPE with real merges."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(DATA.glob("*.jsonl"))]
    texts.append("The quick brown fox jumps over the lazy dog. " * 20)
    return texts


def tiny_tokenizer(chat_template: str | None = "chatml", pad: bool = True, eos: bool = True):
    """A transformers tokenizer over a freshly trained byte-level BPE; `chatml` means the library's
    tool-aware ChatML template, None no template at all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from surgery.data.tokenizer import CHATML_TEMPLATE

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(training_text(), trainer=trainer)
    kwargs = {"additional_special_tokens": SPECIALS[1:3]}
    if eos:
        kwargs["eos_token"] = SPECIALS[0]
    if pad:
        kwargs["pad_token"] = SPECIALS[3]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    tok.chat_template = CHATML_TEMPLATE if chat_template == "chatml" else chat_template
    return tok
