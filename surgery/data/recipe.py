"""Recipe files: a calibration mix and the pruning settings that go with it, in TOML.

    method = "reap"          # saliency method
    ratio = 0.5              # fraction of routed experts to remove
    seed = 42
    max_length = 2048        # tokens per calibration row
    samples = 64             # per dataset, unless the dataset says otherwise
    pack = false             # true: the reference REAP packing (rows of exactly max_length)

    [[datasets]]             # one table per category; or a plain SPEC string in a `datasets` list
    id = "theblackcat102/evol-codealpaca-v1"     # or path = "local/file.jsonl" (relative to the recipe),
    split = "train"                              #    or spec = "SPEC" (see surgery.data.spec)
    samples = 700
    format = "alpaca"                            # optional; detected from the columns otherwise
    name = "code"                                # optional category name

`load_recipe` also accepts the name of a recipe shipped in surgery/recipes. The shipped
"reap-code-tools-agentic" is the REAP paper's mix (evol-codealpaca-v1 700, xlam-function-calling-60k 330,
SWE-smith-trajectories 330); it needs those three datasets in the local Hugging Face cache, or network
access. Offline, a missing one fails at once with the `huggingface-cli download --repo-type dataset NAME`
to run (see docs/data.md).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from surgery.data.spec import DatasetSpec, parse_spec
from surgery.errors import SurgeryError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
TOP_KEYS = {"datasets", "samples", "max_length", "seed", "method", "ratio", "pack", "description"}
ENTRY_KEYS = {"spec", "id", "path", "split", "config", "samples", "format", "name", "field"}


@dataclass
class Recipe:
    """A calibration mix (SPEC strings with their own sample counts) and the pruning settings."""

    datasets: list[str]
    samples: int
    max_length: int
    seed: int
    method: str
    ratio: float
    pack: bool


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file (or a shipped recipe's name); one-line SurgeryError on any problem."""
    file = Path(path).expanduser()
    if not file.is_file():
        shipped = RECIPES_DIR / f"{file.name.removesuffix('.toml')}.toml"
        if file.parent == Path(".") and shipped.is_file():
            file = shipped
        else:
            raise SurgeryError(f"no such recipe file (shipped recipes: {', '.join(shipped_recipes())})", path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SurgeryError(f"not valid TOML: {exc}", file) from None
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise SurgeryError(f"unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(TOP_KEYS))})",
                           file)
    entries = data.get("datasets", [])
    if not isinstance(entries, list):
        raise SurgeryError("`datasets` must be a list of SPEC strings or [[datasets]] tables", file)
    ratio = _get(data, "ratio", float, 0.5, file)
    if not 0.0 < ratio < 1.0:
        raise SurgeryError(f"ratio must be between 0 and 1 (exclusive), not {ratio}", file)
    method = _get(data, "method", str, "reap", file).strip().lower()
    if not method:
        raise SurgeryError("method must not be empty", file)
    return Recipe(
        datasets=[_entry_spec(e, i, file).to_string() for i, e in enumerate(entries)],
        samples=_positive(data, "samples", 64, file),
        max_length=_positive(data, "max_length", 2048, file),
        seed=_get(data, "seed", int, 42, file),
        method=method,
        ratio=ratio,
        pack=_get(data, "pack", bool, False, file),
    )


def _entry_spec(entry: Any, index: int, file: Path) -> DatasetSpec:
    where = f"{file} (datasets[{index}])"
    if isinstance(entry, str):
        return parse_spec(entry, base=file.parent)
    if not isinstance(entry, dict):
        raise SurgeryError("each dataset must be a SPEC string or a table", where)
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise SurgeryError(f"unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(ENTRY_KEYS))})",
                           where)
    named = [k for k in ("spec", "id", "path") if k in entry]
    if len(named) != 1:
        raise SurgeryError("give exactly one of spec, id, path", where)
    if "samples" in entry and (type(entry["samples"]) is not int or entry["samples"] <= 0):
        raise SurgeryError(f"samples must be a positive integer, not {entry['samples']!r}", where)
    source = str(entry[named[0]])
    if named[0] == "path":
        path = Path(source).expanduser()
        source = str(path if path.is_absolute() else (file.parent / path).resolve())
        if not Path(source).exists():
            raise SurgeryError("no such file or directory", source)
    base = parse_spec(source, base=file.parent) if named[0] == "spec" else DatasetSpec(source=source)
    overrides = {k: (str(entry[k]) if k != "samples" else entry[k]) for k in
                 ("split", "config", "samples", "format", "name", "field") if k in entry}
    return parse_spec(replace(base, **overrides).to_string())  # parse again: validates format, builtin parts


def _get(data: dict[str, Any], key: str, kind: type, default: Any, file: Path) -> Any:
    value = data.get(key, default)
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise SurgeryError(f"{key} must be a{'n' if kind is int else ''} {kind.__name__}, not {value!r}", file)
    return value


def _positive(data: dict[str, Any], key: str, default: int, file: Path) -> int:
    value = _get(data, key, int, default, file)
    if value <= 0:
        raise SurgeryError(f"{key} must be positive, not {value}", file)
    return value
