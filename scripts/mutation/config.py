"""The tool's settings: `[tool.grownfx.mutation]` in pyproject.toml, then the command line over them."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from scripts.mutation.mutants import OPERATORS


class ToolError(Exception):
    """Bad input or a broken set-up: one line for the user, exit code 2."""


DEFAULT_HASH_EXCLUDE = ["docs/*", "*.md", "*.png", "*.svg", "*.jpg", "*.pdf", "benchmarks/results/*"]


@dataclass
class Config:
    root: Path
    targets: list[str] = field(default_factory=list)        # "path" (file or folder) or "path::Qualified.name"
    tests: list[str] = field(default_factory=lambda: ["tests"])
    pytest_args: list[str] = field(default_factory=lambda: ["-m", "not slow"])
    changed_scope: list[str] = field(default_factory=list)  # folders --changed looks in (default: the packages)
    equivalents: str = "scripts/mutation_equivalents.yaml"
    jobs: int = 2
    timeout_factor: float = 3.0    # a mutant's tests may use this many times their normal CPU time ...
    timeout_base: float = 30.0     # ... plus this many seconds (start-up, collection)
    changed_test_budget: float = 180.0  # --changed: seconds of the fastest reaching tests per mutant (0: all)
    cache_dir: str = "~/.cache/grownfx/mutation"
    work_dir: str = ".mutation"
    operators: list[str] = field(default_factory=lambda: list(OPERATORS))
    hash_exclude: list[str] = field(default_factory=lambda: list(DEFAULT_HASH_EXCLUDE))
    packages: dict[str, str] = field(default_factory=dict)  # import name -> folder, for the copies' import hook
    name: str = ""

    @property
    def work(self) -> Path:
        return self.root / self.work_dir

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir).expanduser()


_KEYS = {"targets": list, "tests": list, "pytest_args": list, "changed_scope": list, "equivalents": str,
         "jobs": int, "timeout_factor": (int, float), "timeout_base": (int, float),
         "changed_test_budget": (int, float), "cache_dir": str,
         "work_dir": str, "operators": list, "hash_exclude": list, "packages": dict}


def load_config(root: Path) -> Config:
    pyproject = root / "pyproject.toml"
    data: dict = {}
    project: dict = {}
    if pyproject.exists():
        try:
            doc = tomllib.loads(pyproject.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ToolError(f"{pyproject}: not valid TOML ({exc})") from None
        data = doc.get("tool", {}).get("grownfx", {}).get("mutation", {})
        project = doc
    cfg = Config(root=root)
    for key, value in data.items():
        if key not in _KEYS:
            raise ToolError(f"{pyproject}: [tool.grownfx.mutation] has an unknown key {key!r} "
                            f"(known: {', '.join(sorted(_KEYS))})")
        if not isinstance(value, _KEYS[key]):
            raise ToolError(f"{pyproject}: [tool.grownfx.mutation] {key} has the wrong type "
                            f"({type(value).__name__})")
        setattr(cfg, key, value)
    bad = [op for op in cfg.operators if op not in OPERATORS]
    if bad:
        raise ToolError(f"{pyproject}: unknown mutation operator(s) {', '.join(bad)} (known: {', '.join(OPERATORS)})")
    cfg.name = project.get("project", {}).get("name", root.name)
    if not cfg.packages:
        cfg.packages = _packages_from_setuptools(project, root, cfg.targets)
    if not cfg.changed_scope:
        cfg.changed_scope = sorted(set(cfg.packages.values()))
    return cfg


def _packages_from_setuptools(doc: dict, root: Path, targets: list[str]) -> dict[str, str]:
    """{import name: folder} for the import hook: each top-level package, and every package-dir entry (which puts
    a subpackage somewhere else, as grownfx.cli -> cli/)."""
    st = doc.get("tool", {}).get("setuptools", {})
    package_dir = dict(st.get("package-dir", {}))
    names = st.get("packages") if isinstance(st.get("packages"), list) else []
    if not names:
        names = sorted({t.split("::")[0].split("/")[0] for t in targets if (root / t.split("/")[0]).is_dir()})
    out = {}
    for name in names:
        if "." not in name:
            out[name] = package_dir.get(name, name)
    for name, folder in package_dir.items():
        if name:
            out[name] = folder
    return out


def parse_target(spec: str) -> tuple[str, Optional[str]]:
    path, _, qual = spec.partition("::")
    return path.rstrip("/"), (qual or None)
