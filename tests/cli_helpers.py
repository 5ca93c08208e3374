"""What the command-line tests share: invoking the app in-process, and patching functions of real modules."""

from __future__ import annotations

from typer.testing import CliRunner

from grownfx.cli.app import app


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def fake_module(monkeypatch, name: str, **attrs) -> None:
    """Replace functions of the real module `name` (imported as the CLI imports it), not the module itself:
    a command importing a name the module lacks, or a module that fails to import, still fails here."""
    for k, v in attrs.items():
        monkeypatch.setattr(f"{name}.{k}", v)  # raises AttributeError when `name` has no such function
