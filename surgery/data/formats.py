"""Dataset schemas: which one a dataset is in (from its columns, or `format=`), and how one row becomes a
document, either plain text or a conversation for the chat template.

Formats:
  text       a text column (`text`, or the one named by `field=`), used as is
  chat       `messages` (roles system/user/assistant/tool, `tool_calls`), optional `tools`; either may be
             a JSON string
  alpaca     `instruction` (+ optional `input`) / `output`, as in evol-codealpaca-v1 -> user / assistant
  xlam       `query`, `tools`, `answers` (JSON strings), as in xlam-function-calling-60k -> a user query
             and an assistant tool call, with the tool schemas
  swe-smith  `messages` (a JSON string) of an agent trajectory, as in SWE-smith-trajectories; it carries
             no tool schemas, so the SWE-agent tools it calls are supplied here

Rows come out of Arrow, which merges the keys of every struct it sees into one schema and fills the missing
ones with None; those Nones are dropped here so that they never reach the tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from surgery.errors import SurgeryError

FORMATS = ("text", "chat", "alpaca", "xlam", "swe-smith")
ALIASES = {
    "messages": "chat", "conversation": "chat", "evol-codealpaca": "alpaca", "instruction": "alpaca",
    "codealpaca": "alpaca", "function-calling": "xlam", "xlam-function-calling": "xlam",
    "swe_smith": "swe-smith", "swesmith": "swe-smith", "trajectory": "swe-smith", "plain": "text",
}
REQUIRED_COLUMNS = {"chat": ("messages",), "alpaca": ("instruction", "output"),
                    "xlam": ("query", "tools", "answers"), "swe-smith": ("messages",)}
TRAJECTORY_COLUMNS = ("traj_id", "instance_id", "resolved", "patch")


@dataclass
class Conversation:
    """Messages in the OpenAI/transformers form, plus the tool schemas offered to the assistant."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


def normalize_format(name: str, spec: str = "") -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        raise SurgeryError(f"unknown format {name!r} (known: {', '.join(FORMATS)})", spec or None)
    return key


def detect_format(columns: Iterable[str], text_field: str | None = None) -> str | None:
    """The format a dataset's columns say it is in, or None if they match none."""
    cols = set(columns)
    if text_field:
        return "text" if text_field in cols else None
    if "messages" in cols:
        return "swe-smith" if cols.intersection(TRAJECTORY_COLUMNS) and "tools" not in cols else "chat"
    if {"query", "tools", "answers"} <= cols:
        return "xlam"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols:
        return "text"
    return None


def resolve_format(requested: str | None, columns: list[str], text_field: str | None, spec: str) -> str:
    """The format to use: the requested one if the columns carry it, else the detected one."""
    if requested is None:
        found = detect_format(columns, text_field)
        if found is None:
            raise SurgeryError(f"cannot tell the format from the columns {columns}; give format= (one of "
                               f"{', '.join(FORMATS)}) or field=COLUMN for text", spec)
        return found
    needed = (text_field or "text",) if requested == "text" else REQUIRED_COLUMNS[requested]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise SurgeryError(f"format {requested} needs column(s) {', '.join(missing)}; the data has {columns}", spec)
    return requested


def row_text(row: dict[str, Any], text_field: str) -> str:
    value = row.get(text_field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"column {text_field!r} holds {type(value).__name__}, not text")
    return value


def to_conversation(row: dict[str, Any], fmt: str) -> Conversation:
    """One row of a conversational format as a Conversation (raises ValueError/KeyError on bad rows)."""
    if fmt == "alpaca":
        prompt = str(row["instruction"] or "")
        if row.get("input"):
            prompt += "\n\n" + str(row["input"])
        return Conversation([{"role": "user", "content": prompt},
                             {"role": "assistant", "content": str(row["output"] or "")}])
    if fmt == "xlam":
        tools = [normalize_tool(t) for t in maybe_json(row["tools"]) or []]
        calls = [normalize_call(c) for c in maybe_json(row["answers"]) or []]
        return Conversation([{"role": "user", "content": str(row["query"] or "")},
                             {"role": "assistant", "content": "", "tool_calls": calls}], tools or None)
    if fmt in ("chat", "swe-smith"):
        raw = maybe_json(row["messages"])
        if not isinstance(raw, list):
            raise ValueError("messages is not a list")
        messages = [normalize_message(m) for m in raw]
        tools = maybe_json(row.get("tools"))
        tools = [normalize_tool(t) for t in tools] if tools else None
        if fmt == "swe-smith" and tools is None and any("tool_calls" in m for m in messages):
            tools = SWE_AGENT_TOOLS
        return Conversation(messages, tools)
    raise ValueError(f"format {fmt} is not conversational")


def maybe_json(value: Any) -> Any:
    """Columns that hold JSON as a string (xlam, SWE-smith) decode; everything else passes through."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("[", "{"):
            return json.loads(text)
    return value


def drop_none(value: Any) -> Any:
    """Remove the None-valued keys Arrow's struct merging adds (recursively)."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_none(v) for v in value]
    return value


def content_text(content: Any) -> str:
    """Message content as a string: None -> "", a list of parts -> their texts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for item in content:
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                parts.append(item["text"])
            elif isinstance(item, str):
                parts.append(item)
            elif item is not None:
                parts.append(json.dumps(drop_none(item), ensure_ascii=False))
        return "\n".join(p for p in parts if p)
    return str(content)


def normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    """Keep what chat templates read (role, content, tool_calls, name, tool_call_id), nothing else."""
    out: dict[str, Any] = {"role": str(message["role"]), "content": content_text(message.get("content"))}
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = [normalize_call(c) for c in maybe_json(calls)]
    if message.get("name") is not None:
        out["name"] = message["name"]
    if message.get("tool_call_id") is not None:
        out["tool_call_id"] = message["tool_call_id"]
    elif message.get("tool_call_ids"):
        out["tool_call_id"] = message["tool_call_ids"][0]
    return out


def normalize_call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call as `{"type": "function", "function": {"name", "arguments": dict}}`; ids are kept when
    present and never invented (a random id would make the tokens differ from run to run)."""
    call = drop_none(maybe_json(call))
    fn = call.get("function", call)
    arguments = fn.get("arguments", fn.get("parameters", {}))
    try:
        arguments = maybe_json(arguments)
    except json.JSONDecodeError:
        pass  # a template prints a string argument as it is
    out: dict[str, Any] = {"type": "function", "function": {"name": str(fn["name"]), "arguments": arguments}}
    if call.get("id"):
        out["id"] = call["id"]
    return out


def normalize_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool schema in the OpenAI form. xlam's `{name, description, parameters: {p: {type, ...}}}` gets
    wrapped as a JSON-schema object; a parameter is required unless it has a default or says optional."""
    tool = drop_none(maybe_json(tool))
    if "function" in tool:
        return {"type": tool.get("type", "function"), "function": tool["function"]}
    params = tool.get("parameters") or {}
    if params.get("type") != "object":
        required = [name for name, p in params.items()
                    if isinstance(p, dict) and "default" not in p and "optional" not in str(p.get("type", ""))]
        params = {"type": "object", "properties": params, "required": required}
    function = {"name": str(tool["name"]), "description": str(tool.get("description", "")), "parameters": params}
    return {"type": "function", "function": function}


def _editor_params() -> dict[str, Any]:
    string = {"type": "string"}
    return {
        "type": "object",
        "properties": {
            "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "undo_edit"],
                        "description": "What to do with the file."},
            "path": {"type": "string", "description": "Absolute path of a file or directory in the repository."},
            "file_text": {**string, "description": "The whole content of the file `create` writes."},
            "old_str": {**string, "description": "The exact text `str_replace` replaces (it must be unique)."},
            "new_str": {**string, "description": "The text that replaces old_str, or that `insert` adds."},
            "insert_line": {"type": "integer", "description": "`insert` adds new_str after this line."},
            "view_range": {"type": "array", "items": {"type": "integer"},
                           "description": "First and last line `view` shows (-1 for the end)."},
        },
        "required": ["command", "path"],
    }


# The tools SWE-agent offered in the SWE-smith trajectories (the dataset stores the calls, not the schemas).
SWE_AGENT_TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "bash", "description": "Run a shell command in the repository and return its output.",
        "parameters": {"type": "object", "properties": {"command": {
            "type": "string", "description": "The command line to run."}}, "required": ["command"]}}},
    {"type": "function", "function": {
        "name": "str_replace_editor",
        "description": "View, create and edit files: view a file or directory, create a file, replace a "
                       "unique string, insert text after a line, or undo the last edit.",
        "parameters": _editor_params()}},
    {"type": "function", "function": {
        "name": "submit", "description": "Finish the task and submit the changes made to the repository.",
        "parameters": {"type": "object", "properties": {}, "required": []}}},
]
