"""The built-in calibration corpus, used when no dataset is given: it exists on every machine with Python,
needs no network, and mixes the three kinds of text the REAP mix covers.

  code   the standard library's own Python source (files under sysconfig's `stdlib`, sorted)
  docs   the language reference's prose (`pydoc_data.topics.topics`, sorted by topic)
  tools  tool-calling conversations built from standard-library function signatures and docstrings
         (`inspect.signature`): the functions as tool schemas, a request, and the call

It is generic: pruning calibrated on it keeps the experts general Python and English text use. Data that
matches what the pruned model will be used for (the REAP code/tools/agentic mix, or your own) is better.
The content depends on the Python version, which the spec hashes record.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sysconfig
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

DEFAULT_NOTE = ("no dataset given: calibrating on the built-in generic corpus (Python standard library code, "
                "its documentation, tool calls built from its functions); domain-matched data is better "
                "(see docs/data.md, e.g. --recipe reap-code-tools-agentic)")

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "idle_test", "lib2to3", "turtledemo",
             "__pycache__", "ensurepip", "tkinter", "venv"}
TOOL_MODULES = ("os.path", "shutil", "json", "re", "math", "statistics", "textwrap", "string", "glob", "fnmatch",
                "difflib", "base64", "html", "urllib.parse", "zlib", "gzip", "csv", "heapq", "bisect", "random",
                "functools", "calendar", "colorsys", "shlex", "tempfile", "uuid", "secrets", "platform",
                "unicodedata", "operator", "itertools", "keyword", "ipaddress", "mimetypes", "posixpath")
SYSTEM_PROMPT = "You are a Python assistant. Answer by calling the standard-library functions offered as tools."


class _Files(Sequence):
    """Source files read when a row is drawn, so that listing the corpus costs no reading."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        return {"text": self.paths[i].read_text(encoding="utf-8", errors="replace")}


def rows(part: str) -> Sequence[dict[str, Any]]:
    """The rows of one part (`code`, `docs` or `tools`); `text` rows, or `messages`/`tools` rows."""
    if part == "code":
        return _Files(stdlib_sources())
    if part == "docs":
        return [{"text": text} for _, text in doc_topics()]
    if part == "tools":
        return [tool_conversation(i) for i in range(len(tool_functions()))]
    raise ValueError(part)


def part_format(part: str) -> str:
    return "chat" if part == "tools" else "text"


@cache
def stdlib_sources() -> list[Path]:
    """Python files of the standard library, sorted by path; tests, GUIs and installed packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        found.extend(Path(here) / f for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


@cache
def doc_topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions ship Python without it; the part is then empty
        return []
    return sorted((k, v) for k, v in topics.items() if isinstance(v, str) and v.strip())


@cache
def tool_functions() -> list[tuple[str, inspect.Signature, str]]:
    """(qualified name, signature, docstring) of documented public functions of TOOL_MODULES, sorted."""
    found = []
    for mod_name in TOOL_MODULES:
        try:
            module = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            try:
                sig = inspect.signature(obj)
            except (TypeError, ValueError):
                continue
            if doc.strip() and _params(sig):  # calls with arguments: the JSON the tool experts handle
                found.append((f"{mod_name}.{name}", sig, doc))
    return found


def tool_conversation(i: int) -> dict[str, Any]:
    """Conversation i: function i and its two neighbours offered as tools, a request, and the call."""
    funcs = tool_functions()
    name, sig, doc = funcs[i]
    tools = [tool_schema(*funcs[(i + k) % len(funcs)]) for k in range(3)]
    module = name.rsplit(".", 1)[0]
    arguments = {p.name: example_value(p) for p in _params(sig) if p.default is inspect.Parameter.empty}
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Please call the {module} function that does this: {_summary(doc)}"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ], "tools": tools}


def tool_schema(name: str, sig: inspect.Signature, doc: str) -> dict[str, Any]:
    props, required = {}, []
    for p in _params(sig):
        props[p.name] = {"type": json_type(p) or _json_type_of(example_value(p))}
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        elif _plain(p.default):
            props[p.name]["default"] = p.default
    params = {"type": "object", "properties": props, "required": required}
    return {"type": "function", "function": {"name": name, "description": _summary(doc), "parameters": params}}


_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
               (tuple, "array"), (dict, "object"))


def json_type(p: inspect.Parameter) -> str | None:
    """A JSON-schema type from the annotation or the default, or None when neither tells."""
    hint = p.annotation if p.annotation is not inspect.Parameter.empty else type(p.default)
    return next((js for py, js in _JSON_TYPES if hint is py), None)


def _json_type_of(value: Any) -> str:
    return next((js for py, js in _JSON_TYPES if type(value) is py), "string")


def example_value(p: inspect.Parameter) -> Any:
    """A plausible argument for a required parameter, chosen from its name and type."""
    name, kind = p.name.lower(), json_type(p)
    if kind in ("integer", "number") or name in ("n", "k", "x", "y", "a", "b", "i", "size", "count", "number"):
        return 3
    if kind == "boolean":
        return True
    if kind == "array" or name in ("iterable", "seq", "population", "data", "args", "items"):
        return [3, 1, 2]
    for keys, value in ((("path", "file", "src", "dst", "dir", "p"), "/tmp/example/data.txt"),
                        (("url",), "https://example.com/a/b?c=1"), (("pattern", "pat", "regex"), r"\d+"),
                        (("s", "string", "text", "source", "line", "word"), "The quick brown fox.")):
        if name in keys or any(name.startswith(k) and len(k) > 1 for k in keys):
            return value
    return "example"


def _params(sig: inspect.Signature) -> list[inspect.Parameter]:
    return [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _summary(doc: str) -> str:
    """The docstring's first paragraph on one line."""
    return " ".join(doc.strip().split("\n\n", 1)[0].split())
