"""One graph for training and evaluation, and the logits selected from what the model returns.

fx records a forward as it runs for one value of `self.training`.  GROWN trains in train mode and measures in eval
mode, so the graph must behave like the model in both.  `tracing.trace` traces the model in each mode (like
torchvision's `feature_extraction`, which keeps a train and an eval graph) and reconciles the two here:

* the same graph: nothing depends on the mode (or only modules kept leaves, which run their own forward);
* graphs that differ only in flags equal to the mode (`F.dropout(x, p, training=self.training)`,
  `batch_norm(..., training)`): one graph whose flag reads the graph module's own `training` when it runs;
* graphs that differ inside submodules (a hand-written drop path: `if self.training: ...`): those submodules are
  made leaves, so that they run their own forward, and the model is traced again (`mode_leaves`);
* graphs whose top-level forward differs: refused (`ModelCheckError`) -- the way out is to move the train-only
  code into a submodule.

Before comparing, each graph's output is reduced to the logits (`select_output`) and nodes that no longer reach
them are removed: a train-only branch that only feeds an auxiliary output (torchvision's Inception and GoogLeNet
auxiliary heads) is dropped, as it was before in eval-mode tracing.
"""

from __future__ import annotations

import operator
import re
import warnings
from typing import Any

import torch
from torch import fx, nn

from grownfx.engine.errors import ModelCheckError
from grownfx.engine.faithful import is_inplace_op

_IMPURE_TARGETS = {"_assert", "print", "_set_grad_enabled"}


# --- selecting the logits -------------------------------------------------------------------------------------

def describe_output(value: Any) -> str:
    if isinstance(value, dict):
        return f"a dict with keys {list(value)}"
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return f"a {type(value).__name__} with fields {list(value._fields)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} values"
    return f"a {type(value).__name__}"


def pick_output(value: Any, selector: int | str | None, what: str) -> Any:
    """The logits in what a model (or a graph) returns: the value itself when it is not a container, else the
    element `selector` names (an index, a dict key or a namedtuple field).  Without a selector, a dict key or
    namedtuple field `logits` is taken (torchvision's Inception and GoogLeNet return one in train mode); any other
    container is refused with the way out."""
    if not isinstance(value, (dict, list, tuple)):
        return value
    if selector is None:
        if isinstance(value, dict) and "logits" in value:
            return value["logits"]
        if isinstance(value, tuple) and "logits" in getattr(value, "_fields", ()):
            return value.logits
        raise ModelCheckError(
            f"{what} returns {describe_output(value)}: say which one is the logits with `output=` of "
            f"`grownfx.prepare` (an index, a dict key or a field name; the recipe field `model.output`)")
    try:
        if isinstance(value, dict) or isinstance(selector, int):
            return value[selector]
        return getattr(value, selector)
    except (KeyError, IndexError, AttributeError, TypeError):
        raise ModelCheckError(f"{what} returns {describe_output(value)}: `output={selector!r}` names none of "
                              "them") from None


def select_output(gm: fx.GraphModule, selector: int | str | None) -> None:
    """Make the graph return only the logits (`pick_output`), and drop the nodes that no longer reach them."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    picked = pick_output(value, selector, f"{gm._get_name()}.forward")
    if picked is not value:
        out.args = (picked,)
    if not isinstance(picked, fx.Node):
        raise ModelCheckError(f"{gm._get_name()}.forward returns {describe_output(picked)} where the logits should "
                              "be one tensor")
    remove_dead_code(gm)


def remove_dead_code(gm: fx.GraphModule) -> None:
    """Remove nodes nothing reads, except those with side effects (in-place updates, asserts)."""
    modules = dict(gm.named_modules())
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.users or node.op in ("placeholder", "output") or is_inplace_op(node, modules):
                continue
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            if name in _IMPURE_TARGETS:
                continue
            gm.graph.erase_node(node)
            changed = True
    gm.graph.lint()
    gm.recompile()


# --- comparing the train and eval graphs ---------------------------------------------------------------------

def _norm(a: Any, bools: bool) -> Any:
    if isinstance(a, fx.Node):
        return "%"
    if isinstance(a, bool):
        return "B" if bools else a
    if isinstance(a, (list, tuple)):
        return (type(a).__name__,) + tuple(_norm(x, bools) for x in a)
    if isinstance(a, dict):
        return tuple(sorted((k, _norm(v, bools)) for k, v in a.items()))
    if isinstance(a, slice):
        return ("slice", _norm(a.start, bools), _norm(a.stop, bools), _norm(a.step, bools))
    return repr(a)


_CONSTANT = re.compile(r"_tensor_constant\d+")


def signature(node: fx.Node, bools: bool = True) -> tuple:
    """A node's op, target and constant arguments (its inputs as placeholders '%'), bools as 'B' when `bools`.
    Tensor constants fx creates while tracing are numbered per trace: their number is not part of it."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", repr(node.target))
    if node.op == "get_attr":
        target = _CONSTANT.sub("_tensor_constant", target)
    return (node.op, target, _norm(node.args, bools), _norm(node.kwargs, bools))


def node_scope(node: fx.Node) -> str:
    """The module whose own forward recorded the node ('' for the model's forward)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]
    return paths[-1] if paths else ""


def _body(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def flag_positions(train: fx.GraphModule, eval_: fx.GraphModule) -> list[tuple[int, tuple, bool]] | None:
    """When the graphs are the same but for boolean constants that equal the mode (True in train, False in eval,
    or the reverse), the (node index, argument path, negated) of each; [] when identical; None when they differ in
    anything else."""
    a, b = _body(train), _body(eval_)
    if len(a) != len(b):
        return None
    found: list[tuple[int, tuple, bool]] = []
    for i, (x, y) in enumerate(zip(a, b)):
        if signature(x) != signature(y):
            return None
        for path, (u, v) in _bool_pairs((x.args, x.kwargs), (y.args, y.kwargs), ()):
            if u != v:
                found.append((i, path, not u))  # train True, eval False: the flag; the reverse: `not flag`
    return found


def _bool_pairs(a: Any, b: Any, path: tuple):
    if isinstance(a, bool) and isinstance(b, bool):
        yield path, (a, b)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        for k, (x, y) in enumerate(zip(a, b)):
            yield from _bool_pairs(x, y, path + (k,))
    elif isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            yield from _bool_pairs(a[k], b.get(k), path + (k,))


def install_flags(gm: fx.GraphModule, flags: list[tuple[int, tuple, bool]]) -> list[str]:
    """Replace each flag found by `flag_positions` in the eval graph by a read of the graph module's `training`
    (or its negation); returns the names of the nodes that now read the mode."""
    if not flags:
        return []
    body = _body(gm)
    first = body[0] if body else next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(first), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx warns that `training` is no parameter, buffer or module: it is a bool
        mode = gm.graph.get_attr("training")
        negated = gm.graph.call_function(operator.not_, (mode,))
    names = []
    for i, path, neg in flags:
        node = body[i]
        node.args, node.kwargs = _replace((node.args, node.kwargs), path, negated if neg else mode)
        names.append(node.name)
    if not negated.users:
        gm.graph.erase_node(negated)
    gm.graph.lint()
    gm.recompile()
    return names


def _replace(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    k, rest = path[0], path[1:]
    if isinstance(obj, dict):
        return {**obj, k: _replace(obj[k], rest, value)}
    items = list(obj)
    items[k] = _replace(items[k], rest, value)
    return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)


def differing_scopes(train: fx.GraphModule, eval_: fx.GraphModule) -> list[str]:
    """Modules whose own forward records different ops in train and eval mode (bool flags aside), innermost first:
    a module whose descendant differs is left for the next round (the descendant, once a leaf, may be the whole
    difference)."""
    seqs: dict[str, list[list]] = {}
    for k, gm in enumerate((train, eval_)):
        for n in _body(gm):
            seqs.setdefault(node_scope(n), [[], []])[k].append(signature(n))
    diff = [s for s, (x, y) in seqs.items() if x != y]
    return [s for s in diff if not any(o != s and (s == "" or o.startswith(s + ".")) for o in diff)]


def root_difference(train: fx.GraphModule, eval_: fx.GraphModule) -> str:
    """The first op the model's own forward records in one mode and not the other, for the refusal."""
    a = [signature(n) for n in _body(train) if node_scope(n) == ""]
    b = [signature(n) for n in _body(eval_) if node_scope(n) == ""]
    names_a = [n.name for n in _body(train) if node_scope(n) == ""]
    names_b = [n.name for n in _body(eval_) if node_scope(n) == ""]
    for i in range(max(len(a), len(b))):
        if i >= len(a):
            return f"'{names_b[i]}' only in eval mode"
        if i >= len(b):
            return f"'{names_a[i]}' only in train mode"
        if a[i] != b[i]:
            return f"'{names_a[i]}' in train mode where eval mode has '{names_b[i]}'"
    return "the same ops in another order"


# --- modules made leaves because of the mode: do their channels pass unchanged? ----------------------------------

def passes_channels(m: nn.Module, shape: tuple, axes: list[int], dtype: torch.dtype, device) -> bool:
    """A module without parameters or buffers that computes each channel of each axis in `axes` from the same
    channel alone, in eval and in train mode (a hand-written drop path: one random factor per sample): the output
    has the input's shape, appending channels leaves the others' outputs unchanged, and permuting the channels
    permutes the outputs -- bit for bit, with the same random numbers (probed on random inputs)."""
    if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
        return False
    was = m.training
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for axis in axes:
                x = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
                more = list(shape)
                more[axis] = 3
                extra = torch.randn(more, generator=g).to(dtype=dtype, device=device)
                perm = torch.randperm(shape[axis], generator=g).to(device)
                for training in (False, True):
                    m.train(training)
                    y = _seeded(m, x)
                    wide = _seeded(m, torch.cat([x, extra], axis))
                    permuted = _seeded(m, x.index_select(axis, perm))
                    if not (isinstance(y, torch.Tensor) and y.shape == x.shape and wide.shape[axis] == shape[axis] + 3
                            and torch.equal(wide.narrow(axis, 0, shape[axis]), y)
                            and torch.equal(permuted, y.index_select(axis, perm))):
                        return False
    except Exception:  # noqa: BLE001 - a module that fails on other widths does not pass channels
        return False
    finally:
        m.train(was)
    return True


def _seeded(m: nn.Module, x: torch.Tensor):
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(0)
        return m(x)
