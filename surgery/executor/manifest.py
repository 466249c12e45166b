"""Manifests: what a run was given, compared in one place when it is resumed.

Every command that walks layers records its inputs (model fingerprint, data hashes, options that
change the result) in its manifest; a rerun with other inputs is refused with what differs, so a
work directory never mixes two runs' results.
"""

from __future__ import annotations

from pathlib import Path

from surgery.errors import SurgeryError


def differences(old: dict, new: dict) -> str:
    """'key; key (sub: old -> new, ...)' for every top-level key whose value differs."""
    parts = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = [s for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
            parts.append(f"{k} ({', '.join(f'{s}: {a.get(s)!r} -> {b.get(s)!r}' for s in sub)})")
        else:
            parts.append(k)
    return "; ".join(parts)


def require_same_inputs(manifest: dict, identity: dict, what: str, where: Path) -> None:
    """Refuse to continue a run whose manifest records other inputs, naming what differs."""
    old = manifest.get("inputs", {})
    if old != identity:
        raise SurgeryError(f"{what} other inputs; differs in {differences(old, identity)} "
                           "(use another --work directory)", where)
