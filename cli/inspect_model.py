"""`grownfx inspect`: build a backbone, prepare it for growth, and describe its coupling groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from rich.markup import escape
from rich.text import Text
from rich.tree import Tree

from grownfx.errors import UserError

_DEFAULT_SHAPE = (3, 224, 224)


def is_recipe(target: str) -> bool:
    from grownfx.recipe.loading import list_builtin_recipes

    return Path(target).is_file() or target.endswith((".yaml", ".yml")) or target in list_builtin_recipes()


def run_folder_recipe(folder: Path, trust: Optional[bool] = None):
    """(recipe, input shape or None) of the run in `folder`: the recipe its checkpoint holds (verified), else its
    config.resolved.yaml; a builder naming code is refused unless `trust` (grownfx.recipe.trust)."""
    from pydantic import ValidationError

    from grownfx import files
    from grownfx.recipe.loading import load_recipe
    from grownfx.recipe.schema import Recipe
    from grownfx.recipe.trust import require_trust

    last = folder / "checkpoints" / "last.pt"
    if last.is_file():
        raw = files.load(last).get("recipe")
        require_trust(raw if isinstance(raw, dict) else {}, f"{last} (its recipe)", trust)
        try:
            recipe = Recipe.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            raise files.CorruptFileError(f"{last} holds a recipe grownfx cannot read "
                                         f"({'.'.join(map(str, first['loc']))}: {first['msg']})") from None
    elif (folder / "config.resolved.yaml").is_file():
        recipe = load_recipe(folder / "config.resolved.yaml", check_data=False, trust=trust)
    else:
        raise UserError(f"{folder} is a folder but not a run folder (no checkpoints/last.pt, no config.resolved.yaml)")
    shape = None
    if (folder / "stream.json").is_file():
        from grownfx.report.formats import StreamMeta, read_model

        shape = tuple(read_model(folder / "stream.json", StreamMeta)["input_shape"])
    return recipe, shape


def inspect_data(target: str, seed_width: Optional[float] = None,
                 input_shape: Optional[tuple[int, ...]] = None, trust: Optional[bool] = None) -> dict[str, Any]:
    """Everything `inspect` shows, as plain data (also what --json writes).  `target`: a recipe (file or built-in
    name), a run folder, or a builder name; `trust`: see grownfx.recipe.trust (a run folder's recipe, or a recipe
    file lying in one, runs a `module:callable` builder only when trusted)."""
    import torch

    import grownfx
    from grownfx.recipe.schema import GrowthConfig, ModelConfig

    notes = []
    if Path(target).is_dir() or is_recipe(target):
        if Path(target).is_dir():
            recipe, shape = run_folder_recipe(Path(target), trust)
        else:
            from grownfx.recipe.loading import load_recipe

            recipe, shape = load_recipe(target, check_data=False, trust=trust), None
        model_cfg, sites, data = recipe.model, recipe.growth.sites, recipe.data
        shape, classes = input_shape or shape or data_shape(data), data_classes(data)
        code_dir = recipe.code_dir
        if shape is None and data.name == "python":  # the factory says (a recipe from a run folder: trusted above)
            from grownfx.data import stream_for

            stream = stream_for(recipe)
            shape, classes = tuple(stream.input_shape), stream.tasks[0].num_classes
        if shape is None:
            shape = _DEFAULT_SHAPE
            notes.append(f"input shape of {data.name} data unknown without the files; assumed "
                         f"{'x'.join(map(str, shape))} (set --input-shape)")
    else:
        from grownfx.recipe.checks import resolve_builder

        try:  # a typo gets its "did you mean" here, not a traceback from the model zoo
            resolve_builder(target)
        except ValueError as exc:
            raise UserError(f"{exc}; or a recipe (grownfx ls lists the built-in ones)") from None
        model_cfg, sites, classes = ModelConfig(builder=target), GrowthConfig().sites, 10
        shape = input_shape or builder_input_shape(target)
        code_dir = None
    width = model_cfg.seed_width if seed_width is None else seed_width
    model = build_model(model_cfg.builder, classes, model_cfg.kwargs, code_dir).eval()
    if seed_width is None and getattr(model_cfg, "seed_size", None) is not None:  # a parameter fraction
        from grownfx.learn.seed_size import width_for_size

        width = width_for_size(model, torch.randn(1, *shape), model_cfg.seed_size, leaf_modules=model_cfg.leaf_modules)
    try:
        net = grownfx.prepare(model, torch.randn(1, *shape), width, leaf_modules=model_cfg.leaf_modules,
                              granularity=model_cfg.granularity)
    except grownfx.TraceError as exc:
        if input_shape is not None:
            raise
        raise grownfx.TraceError(f"{exc}. The input {'x'.join(map(str, shape))} is a guess; pass the model's "
                                 "own with --input-shape (C,H,W for images, C,L for sequences, F for "
                                 "tabular rows)") from None
    net.add_task(classes)  # a head of `classes` outputs, as the runner adds for a task
    site_ids = set(net.groups_matching(sites.include, sites.exclude, sites.layer_types))
    full_width = {g.id: g.width for g in net.coupling.groups}
    groups = sorted(net.coupling_groups, key=lambda g: (not g.growable, g.id))
    seed_params = net.num_parameters()
    return {
        "target": target, "builder": model_cfg.builder, "input_shape": list(shape), "num_classes": classes,
        "seed_width": width, "full_params": net.full_params, "seed_params": seed_params,
        "seed_fraction": seed_params / net.full_params if net.full_params else None,
        "growth_sites": sorted(site_ids), "notes": notes,
        "groups": [{"id": g.id, "width": full_width.get(g.id, g.width), "seed_width": g.width,
                    "growable": g.growable, "growth_site": g.id in site_ids, "granularity": g.granularity,
                    "reasons": list(g.reasons),
                    "members": [{"target": b.target, "role": b.role} for b in g.members]} for g in groups],
    }


def builder_input_shape(builder: str) -> tuple[int, ...]:
    """The input shape a grownfx builder declares (`vgg16_bn_cifar`: 3x32x32), else the ImageNet default."""
    try:
        from grownfx.models import BUILDERS
    except ImportError:
        return _DEFAULT_SHAPE
    return tuple(getattr(BUILDERS.get(builder), "input_shape", _DEFAULT_SHAPE))


def build_model(builder: str, num_classes: int, kwargs: dict, code_dir: Optional[str] = None):
    from grownfx.models import build_backbone

    return build_backbone(builder, num_classes, kwargs, code_dir)


def data_shape(data) -> Optional[tuple[int, ...]]:
    """The shape of one input of a data config (C, H, W for the image kinds), when it follows from the config."""
    name = data.name
    if name.startswith("cifar100"):
        return (3, 32, 32)
    if name == "miniimagenet":
        return (3, data.image_size, data.image_size)
    if name == "digits":
        return (1, 8, 8)
    if name == "fashion_mnist":
        return (1, 28, 28)
    if name == "synthetic":
        return tuple(data.input_shape)
    if name == "imagefolder" and data.image_size:
        return (data.channels, *data.image_size)
    return None


def data_classes(data) -> int:
    if data.name == "cifar100_superclass":
        return 5
    cpt = getattr(data, "classes_per_task", None)
    if cpt:
        return cpt
    return 100 // data.num_tasks if data.name == "cifar100_split" else 10


def render(data: dict[str, Any]) -> tuple[Tree, list[Text]]:
    """The tree of coupling groups, and footer lines (parameter counts, notes)."""
    shape = "x".join(map(str, data["input_shape"]))
    tree = Tree(f"[bold]{escape(data['builder'])}[/] (input {shape}, seed width {data['seed_width']}, "
                f"{data['num_classes']}-way head)")
    growable = [g for g in data["groups"] if g["growable"]]
    fixed = [g for g in data["groups"] if not g["growable"]]
    branch = tree.add(f"[green bold]growable coupling groups ({len(growable)})[/]")
    for g in growable:
        site = "" if g["growth_site"] else " [dim](excluded from growth by growth.sites)[/]"
        node = branch.add(f"group {g['id']}: width {g['width']}, seed width {g['seed_width']}, "
                          f"granularity {g['granularity']}{site}")
        _members(node, g)
    branch = tree.add(f"[yellow bold]fixed coupling groups ({len(fixed)})[/]")
    for g in fixed:
        reasons = group_reasons(g["reasons"])
        if len(reasons) <= 1:
            why = reasons[0] if reasons else "fixed"
            node = branch.add(f"group {g['id']}: width {g['width']}, [yellow]fixed: {escape(why)}[/]")
        else:  # one line per kind of reason (a ViT has 25 LayerNorms and 12 attentions in one group)
            node = branch.add(f"group {g['id']}: width {g['width']}, [yellow]fixed, for {len(reasons)} reasons:[/]")
            for why in reasons:
                node.add(f"[yellow]{escape(why)}[/]")
        _members(node, g)
    frac = data["seed_fraction"]
    footer = Text.from_markup(
        f"parameters: full backbone {data['full_params']:,}, seed {data['seed_params']:,}"
        + (f" ({frac:.2f}x)" if frac is not None else "")
        + f"; growth sites: {len(data['growth_sites'])} of {len(growable)} growable groups")
    notes = [Text(f"note: {n}", style="dim") for n in data["notes"]]
    return tree, [footer, *notes]


def group_reasons(reasons: list[str], show: int = 2) -> list[str]:
    """Reasons that differ only in the module they name, as one line each: "LayerNorm normalises across
    channels (25 modules: encoder.layers.encoder_layer_0.ln_1, encoder.layers.encoder_layer_0.ln_2, ...)"."""
    import re

    kinds: dict[str, list[str]] = {}  # template -> the reasons it stands for, in order
    for text in reasons:
        names = re.findall(r"'([^']*)'", text)
        kinds.setdefault(re.sub(r" ?'[^']*'", "", text) if len(names) == 1 else text, []).append(text)
    out = []
    for template, texts in kinds.items():
        if len(texts) == 1:
            out.append(texts[0])
            continue
        names = [re.findall(r"'([^']*)'", t)[0] for t in texts]
        more = ", ..." if len(names) > show else ""
        out.append(f"{template} ({len(names)} modules: {', '.join(names[:show])}{more})")
    return out


def _members(node: Tree, group: dict) -> None:
    for m in group["members"]:
        node.add(f"{escape(m['target'])} [dim]({m['role']})[/]")
