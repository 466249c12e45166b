"""What a rule reports, and the dtype vocabulary every rule shares (safetensors dtype strings)."""

from __future__ import annotations

from dataclasses import dataclass

FLOATS = frozenset({"F16", "BF16", "F32", "F64"})
FP8 = frozenset({"F8_E4M3", "F8_E5M2"})
FP8_SCALE = "weight_scale_inv"
W4A16_PARTS = ("qweight", "qzeros", "scales", "g_idx")
LINEAR_SUFFIXES = frozenset({"weight", "bias", FP8_SCALE, *W4A16_PARTS})


@dataclass(frozen=True)
class Problem:
    """One disagreement: which rule, the tensor or config key it concerns, and one line saying what was
    found and what was expected."""

    rule: str
    subject: str
    message: str
    path: str | None = None

    def __str__(self) -> str:
        return self.message
