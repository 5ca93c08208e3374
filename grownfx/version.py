"""The package version, importable without torch (the CLI reads it at start-up)."""

__version__ = "0.1.0"
