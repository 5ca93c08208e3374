"""Built-in recipes, installed as the package data `grownfx.builtin_recipes` (see grownfx.recipe.loading)."""
