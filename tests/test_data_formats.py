"""Schemas and rendering: every fixture format against the exact text it must render to, with a template
that supports tools and with one that silently drops them."""

from __future__ import annotations

import json

import pytest

from surgery.data.calibration import _renderer, open_sources
from surgery.data.chat import Capabilities, ChatRenderer, adapt
from surgery.data.formats import SWE_AGENT_TOOLS, Conversation, detect_format, to_conversation
from surgery.errors import SurgeryError
from tests.test_data_helpers import DATA, DROPPING_TEMPLATE, STRICT_TEMPLATE, tiny_tokenizer


@pytest.fixture(scope="module")
def chatml():
    return tiny_tokenizer("chatml")


@pytest.fixture(scope="module")
def dropping():
    return tiny_tokenizer(DROPPING_TEMPLATE)


def rows(name: str):
    (src,) = open_sources([str(DATA / name)])
    return src


def render(src, tok, i: int) -> str:
    text, special = _renderer(src, ChatRenderer(tok))(src.rows[i])
    assert special is (src.fmt == "text")  # chat renders carry the template's own special tokens
    return text


TOOLS_TEXT = "You can call these tools (JSON schemas):\n<tools>\n{}\n</tools>\n" \
             'Call one with <tool_call>{{"name": ..., "arguments": {{...}}}}</tool_call>.'
WEATHER = ('{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.", '
           '"parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name."}}, '
           '"required": ["city"]}}}')
PRIME = ('{"type": "function", "function": {"name": "is_prime", "description": "Checks if a number is prime.", '
         '"parameters": {"type": "object", "properties": {"num": {"description": "The number to check.", '
         '"type": "int"}}, "required": ["num"]}}}')
FACTORIAL = ('{"type": "function", "function": {"name": "factorial", "description": "Computes the factorial of a '
             'non-negative integer.", "parameters": {"type": "object", "properties": {"n": {"description": '
             '"The number.", "type": "int"}}, "required": ["n"]}}}')


def test_formats_are_detected_from_columns():
    assert detect_format(["text"]) == "text"
    assert detect_format(["messages"]) == "chat"
    assert detect_format(["messages", "tools"]) == "chat"
    assert detect_format(["instruction", "output"]) == "alpaca"
    assert detect_format(["id", "query", "answers", "tools"]) == "xlam"
    assert detect_format(["messages", "instance_id", "resolved", "model", "traj_id", "patch"]) == "swe-smith"
    assert detect_format(["body"]) is None
    assert detect_format(["body"], "body") == "text"
    fixtures = {"text.jsonl": "text", "chat.jsonl": "chat", "evol-codealpaca.jsonl": "alpaca",
                "xlam.jsonl": "xlam", "swe-smith.jsonl": "swe-smith"}
    assert {name: rows(name).fmt for name in fixtures} == fixtures


def test_text_rows_render_as_is(chatml):
    src = rows("text.jsonl")
    assert render(src, chatml, 1) == (
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
        "        a, b = b, a + b\n    return a\n\n\nprint([fibonacci(i) for i in range(10)])\n")


def test_alpaca_renders_as_user_assistant(chatml, dropping):
    src = rows("evol-codealpaca.jsonl")
    expected = ("<|im_start|>user\nExplain what this SQL does: SELECT name FROM users WHERE age > 30 ORDER BY name;"
                "<|im_end|>\n<|im_start|>assistant\nIt selects the names of users older than 30, sorted "
                "alphabetically.<|im_end|>\n")
    assert render(src, chatml, 1) == expected
    assert render(src, dropping, 1) == expected  # nothing to drop: the same text


def test_chat_with_tools_and_template_support(chatml):
    src = rows("chat.jsonl")
    assert render(src, chatml, 0) == (
        "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat does top-k routing mean?<|im_end|>\n"
        "<|im_start|>assistant\nEach token is sent to the k experts with the highest router scores.<|im_end|>\n")
    assert render(src, chatml, 1) == (
        f"<|im_start|>system\n<tools>\n{WEATHER}\n</tools><|im_end|>\n"
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        '<|im_start|>tool\n{"temperature_c": 18, "sky": "cloudy"}<|im_end|>\n'
        "<|im_start|>assistant\nIt is 18 °C and cloudy in Paris.<|im_end|>\n")


def test_chat_with_tools_and_a_template_that_drops_them(dropping):
    """The tool schema goes into a system message and the call into the assistant text as JSON."""
    src = rows("chat.jsonl")
    assert ChatRenderer(dropping).capabilities == Capabilities(system=True, tools=False, tool_calls=False,
                                                                tool_role=True)
    assert render(src, dropping, 1) == (
        f"<|im_start|>system\n{TOOLS_TEXT.format(WEATHER)}<|im_end|>\n"
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        '<|im_start|>tool\n{"temperature_c": 18, "sky": "cloudy"}<|im_end|>\n'
        "<|im_start|>assistant\nIt is 18 °C and cloudy in Paris.<|im_end|>\n")


def test_arrow_struct_merging_adds_no_null_keys(chatml):
    """Arrow gives every row the union of struct keys, filled with None; none may reach the tokens."""
    src = rows("chat.jsonl")
    text = render(src, chatml, 3)
    assert '{"name": "search_docs", "arguments": {"query": "expert pruning", "limit": 5}}' in text
    assert "null" not in text and "null" not in render(src, chatml, 1)
    assert "None" not in render(src, chatml, 2)


def test_xlam_becomes_a_tool_calling_conversation(chatml, dropping):
    src = rows("xlam.jsonl")
    calls = ('<tool_call>\n{"name": "is_prime", "arguments": {"num": 97}}\n</tool_call>\n'
             '<tool_call>\n{"name": "factorial", "arguments": {"n": 6}}\n</tool_call>')
    assert render(src, chatml, 1) == (
        f"<|im_start|>system\n<tools>\n{PRIME}\n{FACTORIAL}\n</tools><|im_end|>\n"
        "<|im_start|>user\nIs 97 a prime number, and what is 6 factorial?<|im_end|>\n"
        f"<|im_start|>assistant\n\n{calls}<|im_end|>\n")
    assert render(src, dropping, 1) == (
        f"<|im_start|>system\n{TOOLS_TEXT.format(PRIME + chr(10) + FACTORIAL)}<|im_end|>\n"
        "<|im_start|>user\nIs 97 a prime number, and what is 6 factorial?<|im_end|>\n"
        f"<|im_start|>assistant\n{calls}<|im_end|>\n")


def test_xlam_parameters_become_a_json_schema():
    row = {"query": "q", "answers": json.dumps([{"name": "convert_currency", "arguments": {"amount": 2.5}}]),
           "tools": json.dumps([{"name": "convert_currency", "description": "Convert.", "parameters": {
               "amount": {"type": "float", "default": 1.0}, "to": {"type": "str"}, "tz": {"type": "str, optional"}}}])}
    conv = to_conversation(row, "xlam")
    params = conv.tools[0]["function"]["parameters"]
    assert params["type"] == "object" and params["required"] == ["to"]
    assert conv.messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "convert_currency", "arguments": {"amount": 2.5}}}]


def test_swe_smith_trajectory(chatml, dropping):
    src = rows("swe-smith.jsonl")
    conv = to_conversation(src.rows[2], "swe-smith")
    assert conv.tools == SWE_AGENT_TOOLS  # the dataset stores calls but no schemas
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "tool"]
    assert conv.messages[3] == {"role": "tool", "content": "", "tool_call_id": "call_3_0"}
    body = ("<|im_start|>user\n<uploaded_files>\n/testbed\n</uploaded_files>\nThe CLI ignores `--quiet`.<|im_end|>\n"
            "<|im_start|>assistant\nFind where options are parsed.\n<tool_call>\n"
            '{"name": "bash", "arguments": {"command": "grep -rn \'quiet\' /testbed/cli.py"}}\n</tool_call><|im_end|>\n'
            "<|im_start|>tool\n<|im_end|>\n")
    tools = "\n".join(json.dumps(t, ensure_ascii=False) for t in SWE_AGENT_TOOLS)
    system = "You are a helpful assistant that can interact with a computer to solve tasks."
    assert render(src, chatml, 2) == f"<|im_start|>system\n{system}\n\n<tools>\n{tools}\n</tools><|im_end|>\n" + body
    assert render(src, dropping, 2) == (f"<|im_start|>system\n{system}\n\n{TOOLS_TEXT.format(tools)}<|im_end|>\n"
                                        + body)
    assert '"str_replace_editor", "arguments": {"command": "str_replace"' in render(src, chatml, 0)


def test_template_refusing_system_and_tool_roles():
    tok = tiny_tokenizer(STRICT_TEMPLATE)
    caps = ChatRenderer(tok).capabilities
    assert caps == Capabilities(system=False, tools=False, tool_calls=False, tool_role=False)
    conv = Conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "function": {"name": "w", "arguments": {"c": "Oslo"}}}]},
                         {"role": "tool", "content": "-3", "tool_call_id": "1"}],
                        tools=[{"type": "function", "function": {"name": "w"}}])
    assert ChatRenderer(tok).render(conv) == (
        "[user] Be brief.\n\n" + TOOLS_TEXT.format('{"type": "function", "function": {"name": "w"}}') + "\n\nWeather?\n"
        '[assistant] <tool_call>\n{"name": "w", "arguments": {"c": "Oslo"}}\n</tool_call>\n'
        "[user] <tool_response>\n-3\n</tool_response>\n")


def test_adapt_leaves_supported_parts_alone():
    conv = Conversation([{"role": "user", "content": "u"}], tools=[{"type": "function", "function": {"name": "f"}}])
    assert adapt(conv, Capabilities()) == (conv.messages, conv.tools)


def test_chat_data_without_a_chat_template_is_an_error():
    src = rows("chat.jsonl")
    with pytest.raises(SurgeryError, match="needs a chat template and the tokenizer has none"):
        _renderer(src, ChatRenderer(tiny_tokenizer(None)))


def test_forced_format_needs_its_columns():
    with pytest.raises(SurgeryError, match="format xlam needs column"):
        open_sources([f"{DATA / 'chat.jsonl'}#format=xlam"])
    (src,) = open_sources([f"{DATA / 'evol-codealpaca.jsonl'}#format=text,field=output"])
    assert src.fmt == "text" and src.text_field == "output"


def test_shared_fixture_template_drops_tools_and_we_keep_them(shared_fixtures):
    from surgery.data import load_tokenizer

    tok = load_tokenizer(shared_fixtures / "tinymoe-m2")
    assert ChatRenderer(tok).capabilities.tools is False
    assert ChatRenderer(tok).capabilities.tool_calls is False
    text = render(rows("xlam.jsonl"), tok, 1)
    assert '"name": "is_prime"' in text and '{"name": "factorial", "arguments": {"n": 6}}' in text


# Offers tools and renders one tool call per turn, but refuses two calls in a turn and roles that do not
# alternate (as Llama-3.1-style and Mistral-style templates do).
SINGLE_CALL_TEMPLATE = (
    "{% if tools %}[tools] {{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}"
    "{% if not loop.first and m.role == messages[loop.index0 - 1].role %}{{ raise_exception('alternate') }}{% endif %}"
    "{% if m.tool_calls %}{% if m.tool_calls | length != 1 %}{{ raise_exception('one call per turn') }}{% endif %}"
    "[{{ m.role }}] call {{ m.tool_calls[0].function.name }} {{ m.tool_calls[0].function.arguments | tojson }}\n"
    "{% else %}[{{ m.role }}] {{ m.content }}\n{% endif %}{% endfor %}")


def test_rows_a_template_refuses_are_rendered_as_text_not_skipped():
    tok = tiny_tokenizer(SINGLE_CALL_TEMPLATE)
    assert ChatRenderer(tok).capabilities == Capabilities()
    src = rows("xlam.jsonl")
    assert render(src, tok, 3) == (  # one call: the template's own rendering
        "[tools] is_prime\n[user] Check whether 1001 is prime.\n[assistant] call is_prime {\"num\": 1001}\n")
    assert render(src, tok, 1) == (  # two calls: refused, so all of it as text
        f"[system] {TOOLS_TEXT.format(PRIME + chr(10) + FACTORIAL)}\n"
        "[user] Is 97 a prime number, and what is 6 factorial?\n"
        '[assistant] <tool_call>\n{"name": "is_prime", "arguments": {"num": 97}}\n</tool_call>\n'
        '<tool_call>\n{"name": "factorial", "arguments": {"n": 6}}\n</tool_call>\n')
    conv = Conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                         {"role": "assistant", "content": "c"}])
    assert ChatRenderer(tok).render(conv) == "[user] a\n\nb\n[assistant] c\n"
