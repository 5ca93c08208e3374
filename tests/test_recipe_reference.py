"""docs/recipe.md is generated from the schema, up to date, and names every field; `validate`'s new checks."""

from __future__ import annotations

import re
from pathlib import Path

from grownfx.recipe.checks import unwrap
from grownfx.recipe.reference import READ_BY, reference_markdown, schema_fields
from grownfx.recipe.schema import Recipe
from cli_helpers import invoke

REPO = Path(__file__).resolve().parents[1]
RECIPE_MD = REPO / "docs" / "recipe.md"


def test_docs_recipe_md_is_what_the_schema_generates():
    assert RECIPE_MD.read_text() == reference_markdown(), (
        "docs/recipe.md is out of date: regenerate it with `grownfx schema --out docs/recipe.md`")


def _every_field_path() -> set[str]:
    """Every field a recipe can hold, as written in a recipe: data.<field> / method.<field> for each kind."""
    paths = {p for p, *_ in schema_fields(Recipe)}
    for section in ("data", "method"):
        for member in unwrap(Recipe.model_fields[section].annotation).__args__:
            paths |= {f"{section}.{name}" for name in member.model_fields}
    return paths


def test_every_schema_field_appears_in_docs_recipe_md():
    text = RECIPE_MD.read_text()
    documented = set(re.findall(r"^\| `([\w.]+)` \|", text, flags=re.M))
    documented |= {f"{s}.name" for s in ("data", "method")}  # the kinds' headings: ### `data.name: digits`
    missing = _every_field_path() - documented
    assert not missing, f"fields of the schema missing from docs/recipe.md: {sorted(missing)}"
    for kind in ("python", "digits", "cifar100_split"):
        assert f"### `data.name: {kind}`" in text
    assert "`grownfx schema --out docs/recipe.md`" in text


def test_read_by_names_real_fields():
    paths = _every_field_path()
    assert set(READ_BY) <= paths, set(READ_BY) - paths


def test_schema_command_prints_the_reference_and_writes_it(tmp_path):
    printed = invoke("schema")
    assert printed.exit_code == 0 and printed.output == reference_markdown()
    written = invoke("schema", "--out", str(tmp_path / "recipe.md"))
    assert written.exit_code == 0 and (tmp_path / "recipe.md").read_text() == reference_markdown()


def test_validate_rejects_num_classes_in_model_kwargs_with_its_line(tmp_path):
    (tmp_path / "r.yaml").write_text("name: r\nmodel:\n  builder: small_cnn\n  kwargs:\n    num_classes: 10\n"
                                     "data: {name: digits}\n")
    result = invoke("validate", str(tmp_path / "r.yaml"))
    assert result.exit_code == 2
    assert re.search(r"r\.yaml:4: model\.kwargs: num_classes is not a builder argument", result.output)
    assert "its own head" in result.output


def test_validate_warns_about_classes_left_out_of_every_task():
    result = invoke("validate", "digits_quickstart", "data.classes_per_task=3")
    assert result.exit_code == 0
    assert "1 class(es) are in no task" in result.output and "9 of the 10 classes" in result.output
    assert "in no task" not in invoke("validate", "digits_quickstart").output  # 5 tasks of 2: all ten
