"""How the command line looks to a user: click's plain help (`Command`) and the one error style for the parser's
own mistakes (`Group`), chosen through typer's `cls=`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from grownfx.errors import EXIT_BUG


def out_console() -> Console:
    return Console(highlight=False)


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


class Command(TyperCommand):
    """Help in click's plain style, through the command class typer lets an app choose (`cls=`): the usage line
    reads `RECIPE [OVERRIDES]...`, a value option shows TEXT, N, X or PATH, and a flag shows no type (typer's
    own help writes `{recipe}` and a `<bool>` beside every flag)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = (param.metavar or param.name or "").upper()
            pieces.append((name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else ""))
        return pieces

    def get_params(self, ctx) -> list:
        params = super().get_params(ctx)
        for param in params:
            if param.metavar is None:
                param.metavar = placeholder(param)
        return params


def placeholder(param) -> str:
    """click's name for what a parameter takes: its NAME for an argument, nothing for a flag, else its type."""
    if param.param_type_name == "argument":
        return (param.name or "").upper()
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    return {int: "N", float: "X", Path: "PATH"}.get(annotation, "TEXT")


class Group(TyperGroup):
    """The app's group, through the class typer lets an app choose (`cls=`): a mistake on the command line that the
    parser catches (a missing argument, an unknown option, a value of the wrong type) is printed in grownfx's one
    error style, `error: ...` and exit 2, like every other (grownfx.errors), instead of a usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            err_console().print("[yellow]aborted[/]")
            sys.exit(EXIT_BUG)
        except Exception as exc:  # noqa: BLE001 - the parser's own errors (click's UsageError and kin)
            if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":  # `grownfx` alone: the parser printed the help
                sys.exit(exc.exit_code)
            err_console().print(f"[red bold]error:[/] [red]{escape(exc.format_message())}[/]")
            if getattr(exc, "ctx", None) is not None:
                err_console().print(f"[dim]see {escape(exc.ctx.command_path)} --help[/]")
            sys.exit(exc.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)
