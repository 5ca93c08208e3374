"""Recipes: the pydantic schema, loading YAML with file:line errors and overrides, and cheap semantic checks."""
