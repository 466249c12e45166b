"""The `surgery` command line. Each sub-command lives in `surgery/commands/<name>.py` and registers
itself on `app`; this module only assembles them and turns user errors into one line + exit 2."""

from __future__ import annotations

import importlib
import sys

import typer

from surgery.errors import SurgeryError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Streaming, out-of-core weight surgery (REAP expert pruning) for MoE checkpoints.",
)

@app.callback()
def _root() -> None:
    """Streaming, out-of-core weight surgery (REAP expert pruning) for MoE checkpoints."""


COMMAND_MODULES = (
    "inspect", "calibrate", "plan", "rewrite", "prune", "verify", "eval", "fidelity", "report", "data", "demo",
    "quantize",
)


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"surgery.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"surgery.commands.{name}":
                raise


_register()


def main() -> None:
    try:
        from surgery.compat import check_transformers

        check_transformers()
        app()
    except SurgeryError as exc:
        print(f"surgery: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("surgery: interrupted", file=sys.stderr)
        sys.exit(130)
