"""A checkpoint's chat template renders under a bound of work (surgery/data/template_budget.py): real
models' templates render exactly as transformers renders them, hostile ones are refused in one line
naming the template file, by `surgery data preview` and `surgery calibrate` too (exit 2, no hang)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from surgery.data import template_budget as tb
from surgery.data.chat import ChatRenderer
from surgery.data.formats import Conversation, resolve_format, to_conversation
from surgery.errors import SurgeryError
from tests.reliability import DATA, REPO, run

TEMPLATES = REPO / "tests" / "data" / "templates"  # real models' templates; see README.md there

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["c", "f"], "description": "Unit", "default": "c"}}}}}]
AGENTIC = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "<think>\nI need the tool.\n</think>\n\nChecking.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18 C, cloudy"},
    {"role": "assistant", "content": "18 °C and cloudy.", "reasoning_content": "Read the tool result."},
    {"role": "user", "content": "Thanks!"},
]


def conversations() -> list[tuple[list, list | None]]:
    """Every conversation of the test datasets (chat, tool calls, agent trajectories), and one more."""
    out = [(AGENTIC, TOOLS), (AGENTIC[1:2], None)]
    for name in ("chat", "xlam", "swe-smith", "evol-codealpaca"):
        rows = [json.loads(line) for line in (REPO / "tests" / "data" / f"{name}.jsonl").read_text().splitlines()]
        fmt = resolve_format(None, list(rows[0]), None, name)
        for row in rows:
            conv = to_conversation(row, fmt)
            out.append((conv.messages, conv.tools or None))
    return out


def templates() -> dict[str, str]:
    """Real models' templates, and the two surgery ships (previews without a model, the demo model)."""
    from surgery.data.tokenizer import CHATML_TEMPLATE
    from surgery.synth import DEMO_CHAT_TEMPLATE

    return {**{p.stem: p.read_text() for p in sorted(TEMPLATES.glob("*.jinja"))},
            "surgery-chatml": CHATML_TEMPLATE, "surgery-demo": DEMO_CHAT_TEMPLATE}


@pytest.mark.parametrize("name", list(templates()))
def test_real_templates_render_exactly_as_transformers_renders_them(name):
    from surgery.compat import template_compiler

    text = templates()[name]
    plain, bounded = template_compiler()[1](text), tb.compile_bounded(text)
    rendered = 0
    for messages, tools in conversations():
        for extra in ({"add_generation_prompt": False}, {"add_generation_prompt": True, "enable_thinking": False}):
            kwargs = {"messages": messages, "tools": tools, "bos_token": "<s>", "eos_token": "</s>", **extra}
            results = []
            for template in (plain, bounded):
                try:
                    results.append(template.render(**kwargs))
                except Exception as exc:  # noqa: BLE001 - templates refuse some conversations; both must agree
                    results.append(f"{type(exc).__name__}: {exc}")
            assert results[0] == results[1], (name, messages)
            rendered += not results[0].startswith(("TemplateError", "TypeError", "UndefinedError"))
    assert rendered >= 10, f"{name} rendered only {rendered} conversations"


def test_install_routes_transformers_through_the_bounds():
    from transformers.utils import chat_template_utils

    from surgery.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    ChatRenderer(tok)
    assert chat_template_utils._compile_jinja_template is tb.compile_bounded
    tok.chat_template = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    with pytest.raises(tb.TemplateTooCostly):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


STEPS, TEXT = "loop iterations and calls", "would make"
# name: (template, the bound that must stop it)
HOSTILE = {
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", STEPS),
    "silent loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", STEPS),
    "recursive loop": ("{% for i in range(30) recursive %}{% if loop.depth < 6 %}{{ loop(range(30)) }}{% endif %}"
                       "{% endfor %}", STEPS),
    "recursive macro": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
                        STEPS),
    "string times": ("{{ 'x' * 10000000000 }}", f"`*` {TEXT}"),
    "list times": ("{% for x in [1] * 100000000 %}{% endfor %}", "`*` would make a list"),
    "power": ("{{ 2 ** 100000000 }}", "`**`"),
    "doubling ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                   "{% endfor %}", f"`~` {TEXT}"),
    "doubling +": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                   "{% endfor %}", f"`+` {TEXT}"),
    "printed list": ("{% set a = ['x' * 1000000] %}{% set b = [a, a, a, a, a, a, a, a] %}"
                     "{% set c = [b, b, b, b, b, b, b, b] %}{{ [c, c, c, c] }}", f"printing a value {TEXT}"),
    "buffered output": ("{% macro m() %}{% for i in range(100000) %}" + "y" * 1000 + "{% endfor %}{% endmacro %}"
                        "{% set z = m() %}", "characters of output"),
    "center": ("{{ 'x'.center(1000000000) }}", f"calling center {TEXT}"),
    "replace": ("{{ ('x' * 100000).replace('x', 'y' * 100000) }}", f"calling replace {TEXT}"),
    "indent": ("{{ ('x\\n' * 100000) | indent(100000) }}", f"filter indent {TEXT}"),
    "printf width": ("{{ '%0999999999d' % 1 }}", f"`%` {TEXT}"),
    "format width": ("{{ '{:>999999999}'.format(1) }}", f"calling format {TEXT}"),
    "join": ("{{ ('x' * 1000000).join(['y'] * 100000) }}", f"calling join {TEXT}"),
    "tojson indent": ("{{ messages | tojson(indent=100000) }}", "tojson indent 100000"),
    "lipsum": ("{{ lipsum(100000, max=100000) }}", f"calling generate_lorem_ipsum {TEXT}"),
}


@pytest.fixture
def quick_budget(monkeypatch):
    """Smaller step and time budgets, so the refusals that need many steps come fast (same mechanism)."""
    monkeypatch.setattr(tb, "MAX_STEPS", 20_000)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_are_refused_in_one_line(quick_budget, name):
    from surgery.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    template, bound = HOSTILE[name]
    tok.chat_template = template
    with pytest.raises(SurgeryError) as info:
        ChatRenderer(tok).render(Conversation([{"role": "user", "content": "hi"}]))
    text = str(info.value)
    assert "\n" not in text and "the chat template does too much work" in text and bound in text, text


def test_the_deadline_stops_what_the_counts_allow(monkeypatch):
    monkeypatch.setattr(tb, "SECONDS", 0.05)
    template = tb.compile_bounded("{% for i in range(100000) %}{{ messages | sort(attribute='content') }}{% endfor %}")
    with pytest.raises(tb.TemplateTooCostly, match="still rendering after"):
        template.render(messages=[{"role": "user", "content": str(i)} for i in range(300)])


def hostile_model(model: Path, root: Path) -> Path:
    """The reliability model with the issue's nested-loop chat_template.jinja (other files linked)."""
    out = root / "hostile"
    out.mkdir()
    for p in model.iterdir():
        if p.name != "chat_template.jinja":
            os.symlink(p, out / p.name)
    (out / "chat_template.jinja").write_text(HOSTILE["nested loops"][0])
    return out


def test_data_preview_and_calibrate_refuse_the_nested_loop_template(reliability_model, tmp_path):
    model = hostile_model(reliability_model, tmp_path)
    chat = REPO / "tests" / "data" / "chat.jsonl"
    template = str(model / "chat_template.jinja")
    preview = run(["data", "preview", chat, "--model", model], timeout=300)  # a hang fails, it does not wait
    work = tmp_path / "work"
    calib = run(["calibrate", model, "--dataset", chat, *DATA[2:], "--work", work, "--no-progress"], timeout=300)
    for done in (preview, calib):
        lines = done.stderr.strip().splitlines()
        assert done.rc == 2 and len(lines) == 1, done.stderr[-3000:]
        assert lines[0].startswith(f"surgery: error: {template}: the chat template does too much work"), lines[0]
    assert not work.exists()  # refused before anything was written (the lock's directory is removed again)
    shutil.rmtree(model)
