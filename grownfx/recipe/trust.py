"""The trust rule: what grownfx runs when it opens files a user did not write themselves.

A recipe names code in three fields: `model.builder` and, for the python data kind, `data.factory` and
`model.weights_data.factory`.  A plain builder name (grownfx's own builders, torchvision's classification
builders) is looked up in a fixed table: building it runs grownfx's or torchvision's code and nothing the file
names.  `module:callable` imports `module` (its top-level
code runs) and calls `callable`; `torch.hub:load` with a local repo runs that repo's `hubconf.py`.

* A recipe the user names on the command line (or passes to Python) is theirs: it runs, as a script would.
* A recipe that comes from a run folder (the recipe stored in `checkpoints/last.pt` or its config.resolved.yaml,
  or a recipe file lying in a folder that holds a run) was written by whoever made the folder.  Opening the folder
  (`export`, `inspect`, `validate`, `run --resume`, `grownfx.load_run(...).method()`) builds what it names only
  when no field names code, or when the user says they trust the folder's author: `--trust`, `trust=True` in
  Python, or the environment variable GROWNFX_TRUST=1 for scripts.  Otherwise `UntrustedCodeError` says, in one
  line, what would run and how to allow it; nothing is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from grownfx import files
from grownfx.errors import UserError

__all__ = ["TRUST_ENV", "UntrustedCodeError", "names_user_code", "require_trust", "run_folder_of", "trusted"]

TRUST_ENV = "GROWNFX_TRUST"


class UntrustedCodeError(UserError):
    """A file from a run folder names code (a `module:callable` builder) and the user did not trust it."""


def trusted(trust: Optional[bool]) -> bool:
    """The user's word: `trust` when given (True/False), else GROWNFX_TRUST=1 in the environment."""
    if trust is not None:
        return bool(trust)
    return os.environ.get(TRUST_ENV, "").strip() == "1"


def names_user_code(raw: Any) -> list[str]:
    """The `module:callable` values a recipe (a dict or a Recipe) would import: its model builder, its data factory
    (`model.builder 'pkg.mod:fn'`, ...); empty when it names no code."""
    if hasattr(raw, "model_dump"):
        raw = raw.model_dump(mode="json")
    if not isinstance(raw, Mapping):
        return []
    model, data = raw.get("model"), raw.get("data")
    found = []
    if isinstance(model, Mapping) and isinstance(model.get("builder"), str) and ":" in model["builder"]:
        found.append(f"model.builder {model['builder']!r}")
    task0 = model.get("weights_data") if isinstance(model, Mapping) else None  # the pretrained task 0's data
    for where, spec in (("data", data), ("model.weights_data", task0)):
        if isinstance(spec, Mapping) and spec.get("name") == "python" and isinstance(spec.get("factory"), str):
            found.append(f"{where}.factory {spec['factory']!r}")
    return found


def _what_runs(raw: Mapping) -> str:
    """What building the recipe `raw` would run, in words (for the refusal)."""
    model = raw.get("model") if isinstance(raw.get("model"), Mapping) else {}
    builder = str(model.get("builder", ""))
    if builder.startswith("torch.hub:") or builder.startswith("torch.hub."):
        kwargs = model.get("kwargs") if isinstance(model.get("kwargs"), Mapping) else {}
        repo = kwargs.get("repo_or_dir") or kwargs.get("repo") or "a repository"
        return f"call torch.hub.{builder.partition(':')[2]}(...), which runs the hubconf.py of {repo!s}"
    return "import those Python modules (running their top-level code) and call them"


def require_trust(recipe: Any, where: str, trust: Optional[bool]) -> None:
    """UntrustedCodeError unless the recipe `recipe` (a Recipe or its dict) names no code (`names_user_code`), or
    the user trusts it.  `where` names the file it comes from, for the message."""
    code = names_user_code(recipe)
    if not code or trusted(trust):
        return
    raw = recipe.model_dump(mode="json") if hasattr(recipe, "model_dump") else recipe
    raise UntrustedCodeError(f"{where} names code: {', '.join(code)}; building it would {_what_runs(raw)}. grownfx "
                             "runs code that a run folder names only when you trust whoever wrote it: pass --trust "
                             f"(Python: trust=True; scripts: {TRUST_ENV}=1)")


def run_folder_of(path: str | os.PathLike) -> Optional[Path]:
    """The run folder `path` (a recipe file) lies in, or None: a file of a run folder is that folder's author's,
    not the user's, even when the user names it on the command line."""
    folder = Path(path).resolve().parent
    return folder if files.holds_run(folder) else None
