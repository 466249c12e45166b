"""The transformers versions surgery works with, and the one call whose keywords changed between them.

Why: pyproject promises a range of transformers versions and CI tests its floor (`.ci/run`, a second
venv with `TRANSFORMERS_FLOOR`); a command run on a version outside the range says so in one line
instead of failing deep in a layer. transformers renamed `create_causal_mask`'s keywords
(`input_embeds` -> `inputs_embeds`, `past_key_values` -> `cache`, `cache_position` dropped), so
`causal_mask` passes whichever the installed version takes, read from its signature once. Chat templates
are compiled by a function surgery replaces to bound their work (`surgery.data.template_budget`), and where
transformers keeps its own compiler moved too (`template_compiler`).
"""

from __future__ import annotations

import inspect
from functools import cache

from surgery.errors import SurgeryError

TRANSFORMERS_FLOOR = "5.0.0"  # the lowest version tested (CI: .ci/run's .venv-floor); pyproject says the same


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_transformers(version: str | None = None) -> None:
    """Refuse, in one line, a transformers older than the floor (or too old to be 5.x at all)."""
    if version is None:
        try:
            from importlib.metadata import version as installed
            version = installed("transformers")
        except Exception:  # not installed: the import that needs it will say so
            return
    if _version_tuple(version) < _version_tuple(TRANSFORMERS_FLOOR):
        raise SurgeryError(f"transformers {version} is installed but surgery needs transformers >= "
                           f"{TRANSFORMERS_FLOOR} (pip install 'transformers>={TRANSFORMERS_FLOOR}')")


@cache
def _mask_keywords(builder) -> frozenset[str]:
    return frozenset(inspect.signature(builder).parameters)


def causal_mask(builder, config, x, attention_mask, position_ids):
    """`builder(...)` (transformers' create_causal_mask or its sliding-window twin) for a batch with no
    cache, under the keyword names of the installed transformers."""
    names = _mask_keywords(builder)
    kwargs = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in names else "input_embeds"] = x
    kwargs["cache" if "cache" in names else "past_key_values"] = None
    if "cache_position" in names:
        import torch

        kwargs["cache_position"] = torch.arange(x.shape[1], device=x.device)
    return builder(**kwargs)


def template_compiler():
    """(transformers' chat-template module, its own uncached compiler `str -> Template`, which builds a
    fresh environment at every call): the module whose `_compile_jinja_template` every render calls (and
    `surgery.data.template_budget.install` replaces), and the compiler whose environment surgery bounds.
    Recent 5.x keep that compiler as `_cached_compile_jinja_template` (despite its name, uncached) behind the
    lru-cached `_compile_jinja_template`; 5.0 has only the lru-cached `_compile_jinja_template`, whose
    `__wrapped__` it is (`install` keeps the original as `surgery_unbounded` on its replacement)."""
    from transformers.utils import chat_template_utils as module

    current = getattr(module, "_compile_jinja_template", None)
    if not callable(current):
        raise SurgeryError("this transformers version compiles chat templates in a way surgery does not know, so "
                           "it cannot bound their work; use transformers 5.x")
    compiler = getattr(module, "_cached_compile_jinja_template", None)
    if compiler is None:
        original = getattr(current, "surgery_unbounded", current)
        compiler = getattr(original, "__wrapped__", original)
    return module, compiler
