"""Render conversations with the model's chat template, without losing tool schemas or tool calls.

Many chat templates silently drop what they do not support: `tools` passed to a template that never
reads them, `tool_calls` on an assistant message, `tool` messages, or they raise on a system message.
Calibrating on such renders would make the experts that handle tool use look idle, and pruning would
remove them. So the template is probed once, by rendering small conversations that carry unique
markers and checking whether each marker reaches the output; whatever does not is rewritten as text the
template does render: tool schemas into the system message, tool calls as JSON in the assistant
message, tool results as a user message, a system message folded into the first user message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from surgery.data.formats import Conversation
from surgery.errors import SurgeryError

_TOOL = "surgery_probe_tool_q7x"
_ARG = "surgery_probe_arg_q7x"
_VALUE = "surgery_probe_value_q7x"
_RESULT = "surgery_probe_result_q7x"
_SYSTEM = "surgery_probe_system_q7x"
PROBE_TOOL = {"type": "function", "function": {
    "name": _TOOL, "description": "Probe.",
    "parameters": {"type": "object", "properties": {_ARG: {"type": "string"}}, "required": [_ARG]}}}
PROBE_CALL = {"type": "function", "function": {"name": _TOOL, "arguments": {_ARG: _VALUE}}}


@dataclass(frozen=True)
class Capabilities:
    """What a chat template renders faithfully."""

    system: bool = True
    tools: bool = True
    tool_calls: bool = True
    tool_role: bool = True


PLAIN = Capabilities(system=True, tools=False, tool_calls=False, tool_role=True)


class ChatRenderer:
    """Renders Conversations with one tokenizer's chat template (probed on first use)."""

    def __init__(self, tokenizer: Any) -> None:
        from surgery.data.template_budget import install

        install()  # the checkpoint's template is code: it renders under a bound of work
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self._caps: Capabilities | None = None

    @property
    def capabilities(self) -> Capabilities:
        if self._caps is None:
            self._caps = probe(self._apply)
        return self._caps

    def render(self, conv: Conversation) -> str:
        """The template's render; if the template refuses this conversation (e.g. two tool calls in one
        turn, or roles that do not alternate), everything is rendered as text instead and consecutive
        turns of one role are merged, so that the row is kept rather than skipped."""
        messages, tools = adapt(conv, self.capabilities)
        try:
            return self._apply(messages, tools)
        except SurgeryError:
            raise
        except Exception:  # noqa: BLE001 - templates raise whatever they like (often TemplateError)
            caps = self.capabilities
            if caps == replace(caps, tools=False, tool_calls=False, tool_role=False):
                raise
        messages, _ = adapt(conv, replace(self.capabilities, tools=False, tool_calls=False, tool_role=False))
        return self._apply(merge_turns(messages), None)

    def _apply(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        from surgery.data.template_budget import TemplateTooCostly

        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        except TemplateTooCostly as exc:
            raise SurgeryError(f"the chat template does too much work ({exc}); surgery renders templates under a "
                               "bound of work: fix or replace the template", template_file(self.tokenizer)) from None
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, not text")
        return text


def probe(apply) -> Capabilities:
    """Find out by rendering which parts of a conversation the template keeps."""

    def shows(marker: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> bool:
        try:
            return marker in apply(messages, tools)
        except SurgeryError:
            raise
        except Exception:  # noqa: BLE001 - templates raise whatever they like (often TemplateError)
            return False

    turn = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]
    system = shows(_SYSTEM, [{"role": "system", "content": _SYSTEM}, *turn])
    tools = shows(_TOOL, turn, [PROBE_TOOL])
    call = {"role": "assistant", "content": "", "tool_calls": [PROBE_CALL]}
    offered = [PROBE_TOOL] if tools else None
    tool_calls = shows(_VALUE, [turn[0], call], offered)
    asked = call if tool_calls else {"role": "assistant", "content": _call_text(PROBE_CALL)}
    result = {"role": "tool", "content": _RESULT, "tool_call_id": "call_0", "name": _TOOL}
    tool_role = shows(_RESULT, [turn[0], asked, result], offered)
    return Capabilities(system=system, tools=tools, tool_calls=tool_calls, tool_role=tool_role)


def template_file(tokenizer: Any) -> str:
    """The file a tokenizer's chat template came from, for messages (transformers 5 reads
    chat_template.jinja first, then chat_template.json, then tokenizer_config.json)."""
    directory = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if str(directory) not in ("", ".") and directory.is_dir():
        for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
            if (directory / name).is_file():
                return str(directory / name)
    return "the tokenizer's chat template"


def adapt(conv: Conversation, caps: Capabilities) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Rewrite what the template would drop as text it keeps; returns (messages, tools to pass)."""
    messages = [dict(m) for m in conv.messages]  # only top-level keys change; no deep copy of long trajectories
    tools = conv.tools or None
    for m in messages:
        if m.get("tool_calls") and not caps.tool_calls:
            calls = "\n".join(_call_text(c) for c in m.pop("tool_calls"))
            m["content"] = f"{m['content']}\n{calls}" if m.get("content") else calls
        if m["role"] == "tool" and not caps.tool_role:
            m.pop("tool_call_id", None)
            m.pop("name", None)
            m.update(role="user", content=f"<tool_response>\n{m['content']}\n</tool_response>")
    if tools and not caps.tools:
        block = tools_text(tools)
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{block}" if messages[0]["content"] else block
        else:
            messages.insert(0, {"role": "system", "content": block})
        tools = None
    if not caps.system:
        messages = _fold_system(messages)
    return messages, tools


def render_plain(conv: Conversation) -> str:
    """A conversation as a plain transcript, for a tokenizer without a chat template (builtin corpus)."""
    messages, _ = adapt(conv, PLAIN)
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def merge_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive messages of one role as one message (templates that demand alternating roles)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{m['content']}"}
        else:
            out.append(dict(m))
    return out


def tools_text(tools: list[dict[str, Any]]) -> str:
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You can call these tools (JSON schemas):\n<tools>\n" + lines + "\n</tools>\n"
            'Call one with <tool_call>{"name": ..., "arguments": {...}}</tool_call>.')


def _call_text(call: dict[str, Any]) -> str:
    fn = call["function"]
    body = json.dumps({"name": fn["name"], "arguments": fn.get("arguments", {})}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def _fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Templates that refuse a system role still see its text, at the start of the next user turn."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []
    for m in messages:
        if m["role"] == "system":
            pending.append(m["content"])
            continue
        if pending and m["role"] == "user":
            m = {**m, "content": "\n\n".join([*pending, m["content"]])}
            pending = []
        out.append(m)
    if pending:
        out.insert(0, {"role": "user", "content": "\n\n".join(pending)})
    return out
