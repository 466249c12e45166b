"""Chat templates render under a bound of work, so a checkpoint's own template cannot hang a run.

A template is code that comes with the checkpoint. transformers renders it in jinja2's sandbox, which
stops escapes but not work: two nested `range(100000)` loops, `"x" * 10**10`, or a macro that calls
itself twice per level run until the process is killed or out of memory. jinja2 has no resource
limits, so they are written here, as hooks of the same sandbox (one job: count and refuse):

- every `for` iteration (recursive loops included) and every call (methods, macros, globals) is a
  step; a render may take `MAX_STEPS`;
- every piece of output, literal or computed, streamed or buffered inside a macro or `set` block, is
  counted; a render may produce `MAX_TEXT` characters;
- operations that can amplify (`*`, `**`, `+`, `%`, `~`, the string methods and filters that pad,
  repeat, replace or join) are checked *before* they run, and every value an operation, call or filter
  returns is checked after: a string of at most `MAX_TEXT` characters, a collection of at most
  `MAX_ITEMS` items; the text a value would print as (lists print their items) counts too;
- a wall-clock deadline of `SECONDS`, checked from all of these hooks, catches whatever is left.

A template that exceeds a bound raises `TemplateTooCostly`. Everything else is transformers' own:
`install()` makes transformers compile chat templates with its own environment (filters, globals,
extensions, options) turned into a bounded one, so ordinary templates render exactly as before.
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
from typing import Any

from jinja2 import nodes, pass_context
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.environment import Template
from jinja2.runtime import LoopContext
from jinja2.utils import Namespace, generate_lorem_ipsum

from surgery.compat import template_compiler

MAX_STEPS = 1_000_000  # loop iterations + calls per render; real templates take ~10 per message
MAX_TEXT = 1 << 24  # characters: output per render, and any one value
MAX_ITEMS = 1 << 20  # items of any one list, tuple or dict a template makes
MAX_INT_BITS = 1 << 16  # integers a template computes (4,300 digits is Python's own print limit)
MAX_INDENT = 64  # tojson's indent (each line may be indented depth times)
SECONDS = 10.0  # wall clock per render
LOOP_FILTER = "surgery_loop_budget"  # wraps every for loop's iterable (the name is ours, not a template's)

_ACTIVE: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("surgery_template_budget", default=None)
_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*?:[^{}\d]*(\d+)(?:\.(\d+))?")


class TemplateTooCostly(Exception):
    """A chat template exceeded a bound of work; the message says which."""


class _Budget:
    """What one render has spent."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + SECONDS
        self.steps = 0
        self.output = 0
        self.sizes: dict[int, tuple[Any, int]] = {}  # id -> (value, text size) of the immutable collections seen

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateTooCostly(f"more than {MAX_STEPS:,} loop iterations and calls")
        if not self.steps & 63:
            self.clock()

    def clock(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateTooCostly(f"still rendering after {SECONDS:g} s")

    def iterate(self, iterable: Any):
        for item in iterable:
            self.step()
            yield item

    def emit(self, text: str) -> str:
        self.output += len(text)
        if self.output > MAX_TEXT:
            raise TemplateTooCostly(f"more than {MAX_TEXT:,} characters of output")
        self.clock()
        return text

    def expect(self, size: int, what: str) -> None:
        if size > MAX_TEXT:
            raise TemplateTooCostly(f"{what} would make {size:,} characters (at most {MAX_TEXT:,})")

    def value(self, rv: Any, what: str) -> Any:
        """A value an operation made, checked."""
        if isinstance(rv, (str, bytes)):
            self.expect(len(rv), what)
        elif isinstance(rv, (list, tuple, dict, set, frozenset)) and len(rv) > MAX_ITEMS:
            raise TemplateTooCostly(f"{what} made a collection of {len(rv):,} items (at most {MAX_ITEMS:,})")
        elif isinstance(rv, int) and rv.bit_length() > MAX_INT_BITS:
            raise TemplateTooCostly(f"{what} made an integer of {rv.bit_length():,} bits")
        return rv

    def text(self, value: Any) -> int:
        """How many characters `value` prints as, bounded: a list of one long string repeated a thousand
        times is small in memory and huge as text."""
        if isinstance(value, str):
            return len(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value.bit_length() // 3 + 2
        if isinstance(value, (list, tuple, dict, set, frozenset, Namespace)):
            return self._collection(value)
        return 32

    def _collection(self, root: Any) -> int:
        """Text size of a collection: iterative (no recursion limit), memoised per render (values a template
        sees cannot change, except namespaces, which are never memoised), stopped past MAX_TEXT."""
        sizes = self.sizes
        if id(root) in sizes:
            return sizes[id(root)][1]
        stack = [[root, iter(_children(root)), 2]]
        on_path = {id(root)}
        while True:
            frame = stack[-1]
            for child in frame[1]:
                if not isinstance(child, (list, tuple, dict, set, frozenset, Namespace)):
                    frame[2] += self.text(child) + 2
                elif id(child) in sizes:
                    frame[2] += sizes[id(child)][1] + 2
                elif id(child) in on_path:  # a namespace that holds itself prints as '...'
                    frame[2] += 8
                else:
                    stack.append([child, iter(_children(child)), 2])
                    on_path.add(id(child))
                    break
                self.expect(frame[2], "printing a value")
            else:
                stack.pop()
                obj, size = frame[0], frame[2]
                on_path.discard(id(obj))
                if not isinstance(obj, Namespace):
                    sizes[id(obj)] = (obj, size)
                if not stack:
                    return size
                stack[-1][2] += size + 2
                self.expect(stack[-1][2], "printing a value")


def _children(obj: Any):
    if isinstance(obj, Namespace):
        obj = obj._Namespace__attrs  # what the namespace prints
    if isinstance(obj, dict):
        return [x for kv in obj.items() for x in kv]
    return obj


# ---------------------------------------------------------------- checks before an operation runs
def _binop_size(budget: _Budget, op: str, left: Any, right: Any) -> None:
    if op == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int) and isinstance(seq, (str, list, tuple)):
            if isinstance(seq, (list, tuple)) and len(seq) * n > MAX_ITEMS:
                raise TemplateTooCostly(f"`*` would make a list of {len(seq) * n:,} items")
            budget.expect(budget.text(seq) * n, "`*`")
        elif isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateTooCostly("`*` would make an integer over the bound")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        if max(left.bit_length() - 1, 1) * right > MAX_INT_BITS and abs(left) > 1:
            raise TemplateTooCostly("`**` would make an integer over the bound")
    elif op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, type(left)):
        budget.expect(budget.text(left) + budget.text(right), "`+`")
    elif op == "%" and isinstance(left, str):
        widths = sum(int(w) for m in _PRINTF.finditer(left) for w in m.groups() if w and w != "*")
        stars = [a for a in (right if isinstance(right, tuple) else ()) if isinstance(a, int)]
        budget.expect(len(left) + widths + sum(abs(a) for a in stars) + budget.text(right) * left.count("%"), "`%`")


def _call_size(budget: _Budget, obj: Any, args: tuple, kwargs: dict) -> int | None:
    """The most characters a call of a known amplifier can return; None for anything else."""
    obj = getattr(obj, "__wrapped__", obj)  # the sandbox hands out str.format wrapped
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if obj is generate_lorem_ipsum:
        n, most = (list(args) + [kwargs.get("n", 5)])[0], kwargs.get("max", 100)
        return int(n) * int(most) * 16 if isinstance(n, int) and isinstance(most, int) else None
    if not isinstance(owner, str):
        return None
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        return max(args[0], len(owner))
    if name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        return len(owner) + owner.count("\t") * size if isinstance(size, int) else None
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = owner.count(args[0]) if args[0] else len(owner) + 1
        return len(owner) + count * len(args[1])
    if name in ("format", "format_map"):
        widths = sum(int(w) for m in _FORMAT_SPEC.finditer(owner) for w in m.groups() if w)
        fields = [*args, *kwargs.values()]
        return len(owner) + widths + sum(budget.text(a) for a in fields) * max(1, owner.count("{"))
    if name == "join" and args:
        items = args[0]
        if isinstance(items, str):
            return len(items) * (1 + len(owner))
        return sum(budget.text(x) for x in items) + len(owner) * len(items)
    return None


def _is_str_join(obj: Any) -> bool:
    return isinstance(getattr(obj, "__self__", None), str) and getattr(obj, "__name__", "") == "join"


def _filter_size(budget: _Budget, name: str, value: Any, args: tuple, kwargs: dict) -> int | None:
    """The most characters the amplifying filters can return; None for the others."""
    if name == "indent" and isinstance(value, str):
        width = args[0] if args else kwargs.get("width", 4)
        width = len(width) if isinstance(width, str) else width
        return len(value) + int(width) * (value.count("\n") + 1) if isinstance(width, int) else None
    if name == "center" and isinstance(value, str):
        width = args[0] if args else kwargs.get("width", 80)
        return max(width, len(value)) if isinstance(width, int) else None
    if name == "replace" and isinstance(value, str) and len(args) >= 2:
        count = value.count(str(args[0])) if str(args[0]) else len(value) + 1
        return len(value) + count * len(str(args[1]))
    if name == "format" and isinstance(value, str):
        widths = sum(int(w) for m in _PRINTF.finditer(value) for w in m.groups() if w and w != "*")
        return len(value) + widths + sum(budget.text(a) for a in (*args, *kwargs.values())) * value.count("%")
    if name == "join" and isinstance(value, (list, tuple)):
        sep = args[0] if args else kwargs.get("d", "")
        return sum(budget.text(x) for x in value) + len(str(sep)) * len(value)
    if name == "tojson":
        indent = args[1] if len(args) > 1 else kwargs.get("indent")
        width = len(indent) if isinstance(indent, str) else indent
        if isinstance(width, int) and width > MAX_INDENT:
            raise TemplateTooCostly(f"tojson indent {width} (at most {MAX_INDENT})")
    return None


# ---------------------------------------------------------------- the environment's hooks
def _guard_filter(name: str, fn):
    from jinja2.utils import _PassArg

    skip = 1 if _PassArg.from_obj(fn) is not None else 0

    @functools.wraps(fn)
    def run(*args, **kwargs):
        budget = _ACTIVE.get()
        if budget is None or len(args) <= skip:
            return fn(*args, **kwargs)
        budget.clock()
        value = args[skip]
        if name == "join" and not isinstance(value, (str, list, tuple, dict)):
            value = list(value)  # measured before joining (join would make the list anyway)
            args = (*args[:skip], value, *args[skip + 1:])
        budget.expect(budget.text(value), f"filter {name}")
        size = _filter_size(budget, name, value, args[skip + 1:], kwargs)
        if size is not None:
            budget.expect(size, f"filter {name}")
        return budget.value(fn(*args, **kwargs), f"filter {name}")

    return run


@pass_context
def _loop_budget(context, iterable):
    budget = _ACTIVE.get()
    return iterable if budget is None else budget.iterate(iterable)


class _BoundedCodeGenerator(CodeGenerator):
    """Routes every piece of output and every `~` through the environment's counters."""

    def _output_const_repr(self, group) -> str:
        return f"environment.surgery_emit({super()._output_const_repr(group)})"

    def _output_child_pre(self, node, frame, finalize) -> None:
        self.write("environment.surgery_emit(")
        super()._output_child_pre(node, frame, finalize)
        self.write("environment.surgery_printable(")

    def _output_child_post(self, node, frame, finalize) -> None:
        self.write(")")
        super()._output_child_post(node, frame, finalize)
        self.write(")")

    @optimizeconst
    def visit_Concat(self, node, frame) -> None:
        self.write("environment.surgery_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        if frame.eval_ctx.volatile:  # the join jinja2's own visit_Concat would use
            self.write("), (markup_join if context.eval_ctx.volatile else str_join))")
        else:
            self.write("), markup_join)" if frame.eval_ctx.autoescape else "), str_join)")


class _BoundedTemplate(Template):
    """Each render starts a new budget."""

    def render(self, *args: Any, **kwargs: Any) -> str:
        token = _ACTIVE.set(_Budget())
        try:
            return super().render(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    def generate(self, *args: Any, **kwargs: Any):
        token = _ACTIVE.set(_Budget())
        try:
            yield from super().generate(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)


class _Bounds:
    """Mixed into the class of transformers' sandboxed environment."""

    code_generator_class = _BoundedCodeGenerator
    template_class = _BoundedTemplate
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def _generate(self, source, name, filename, defer_init=False):
        for loop in source.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, LOOP_FILTER, [], [], None, None, lineno=loop.iter.lineno)
            loop.iter.set_environment(self)
        return super()._generate(source, name, filename, defer_init)

    def call(self, context, obj, /, *args, **kwargs):
        budget = _ACTIVE.get()
        if budget is not None:
            budget.step()
            if isinstance(obj, LoopContext) and args:  # `loop(children)` of a recursive loop
                args = (budget.iterate(args[0]), *args[1:])
            else:
                if _is_str_join(obj) and args and not isinstance(args[0], (str, list, tuple)):
                    args = (list(args[0]), *args[1:])  # measured before joining (join makes the list anyway)
                size = _call_size(budget, obj, args, kwargs)
                if size is not None:
                    budget.expect(size, f"calling {getattr(obj, '__name__', 'a function')}")
        rv = super().call(context, obj, *args, **kwargs)
        return rv if budget is None else budget.value(rv, f"calling {getattr(obj, '__name__', 'a function')}")

    def call_binop(self, context, operator, left, right):
        budget = _ACTIVE.get()
        if budget is None:
            return super().call_binop(context, operator, left, right)
        budget.clock()
        _binop_size(budget, operator, left, right)
        return budget.value(super().call_binop(context, operator, left, right), f"`{operator}`")

    def surgery_emit(self, text: str) -> str:
        budget = _ACTIVE.get()
        return text if budget is None else budget.emit(text)

    def surgery_printable(self, value: Any) -> Any:
        budget = _ACTIVE.get()
        if budget is not None:
            budget.expect(budget.text(value), "printing a value")
        return value

    def surgery_concat(self, parts: tuple, join) -> str:
        budget = _ACTIVE.get()
        if budget is not None:
            budget.expect(sum(budget.text(p) for p in parts), "`~`")
        return join(parts)


@functools.cache
def _bounded_class(base: type) -> type:
    return type(f"Bounded{base.__name__}", (_Bounds, base), {})


@functools.lru_cache(maxsize=32)
def compile_bounded(chat_template: str) -> Template:
    """`chat_template` compiled by transformers' own environment, made bounded."""
    env = template_compiler()[1]("").environment
    env.__class__ = _bounded_class(type(env))
    env.filters = {name: _guard_filter(name, fn) for name, fn in env.filters.items()}
    env.filters[LOOP_FILTER] = _loop_budget
    return env.from_string(chat_template)


compile_bounded.surgery_bounded = True  # type: ignore[attr-defined]


def install() -> None:
    """Make transformers compile every chat template bounded (idempotent; process-wide, which is what a
    surgery command wants: it renders templates only through the tokenizer)."""
    module, _ = template_compiler()
    if not getattr(module._compile_jinja_template, "surgery_bounded", False):
        compile_bounded.surgery_unbounded = module._compile_jinja_template  # type: ignore[attr-defined]
        module._compile_jinja_template = compile_bounded
