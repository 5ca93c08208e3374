"""Refining a dimension variable into pieces, so that channels of different segmentations can still be tied.

GhostNet adds `cat([primary, cheap])` (two producers, 8 + 8 channels) to a shortcut conv's 16 channels; a
squeeze-excitation multiplies the same cat by one conv's 16 gates.  The 16 channels of the single producer are
the 8 + 8 of the cat, in order: the single variable is *refined* into two pieces, each tied to its counterpart,
and every variable tied to it (the residual stream it belongs to) is refined the same way.  Each piece then
grows on its own, and the producer's output axis simply has two segments, like a concatenation's.

A mixin of `CouplingAnalysis`: layouts read after a refinement are expanded (`expand_value`), bindings and the
logits' variables at the end (`finish_refinement`).  A refinement that would cut a conv group (granularity)
or a flatten factor is not made: the layouts are then tied as before, and fixed.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx

from grownfx.engine.coupling.layouts import Seq, TVal
from grownfx.engine.coupling.types import Binding, Layout, Seg
from grownfx.engine.splits import get_sizes, set_sizes


class Refinement:
    """Refine variables so that two layouts of the same channels line up segment by segment."""

    def _refinements(self) -> dict[int, tuple]:
        if "_refined" not in self.__dict__:
            self.__dict__["_refined"] = {}
        return self.__dict__["_refined"]

    # -- reading layouts --------------------------------------------------------------------------------------
    def expand_layout(self, lay: Layout | None) -> Layout | None:
        ref = self._refinements()
        if not ref or not lay or not any(s.var in ref for s in lay):
            return lay
        out: list[Seg] = []
        for s in lay:
            pieces = ref.get(s.var)
            if pieces is None or s.width != sum(p.width * p.factor for p in pieces):  # a cut part stays as it is
                out.append(s)
                continue
            out.extend(Seg(p.var, p.width, s.factor * p.factor) for p in self.expand_layout(pieces))
        return tuple(out)

    def expand_value(self, value: Any) -> Any:
        if not self._refinements():
            return value
        axes = getattr(value, "axes", None)
        if isinstance(axes, tuple) and hasattr(value, "origin"):
            new = tuple(self.expand_layout(lay) for lay in axes)
            return value if new == axes else dataclasses.replace(value, axes=new)
        items = getattr(value, "items", None)
        if isinstance(items, list):
            return dataclasses.replace(value, items=[self.expand_value(x) for x in items])
        return value

    # -- tying by refinement ----------------------------------------------------------------------------------
    def refine_tie(self, a: Layout, b: Layout, where: str) -> bool:
        """Tie `a` and `b` (same channels, different segmentations) by refining variables; False if it cannot."""
        if not a or not b or any(s.factor != 1 for s in a + b):
            return False
        if sum(s.width for s in a) != sum(s.width for s in b):
            return False
        for s in a + b:  # only whole variables are refined
            if s.width != self.ties.nodes[s.var]["width"]:
                return False
        cuts = set()
        for lay in (a, b):
            pos = 0
            for s in lay:
                pos += s.width
                cuts.add(pos)
        plans = []
        for lay in (a, b):
            pos = 0
            for s in lay:
                inner = sorted(c for c in cuts if pos < c < pos + s.width)
                if inner:
                    bounds = [pos] + inner + [pos + s.width]
                    widths = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
                    if any(w % self.ties.nodes[s.var]["gran"] for w in widths):
                        return False
                    plans.append((s.var, widths))
                pos += s.width
        cut_vars = [v for v, _ in plans]
        if len(cut_vars) != len(set(cut_vars)):  # a variable cut at two places (one repeated whole is fine)
            return False
        for v, widths in plans:
            self._refine(v, widths)
        a, b = self.expand_layout(a), self.expand_layout(b)
        if [s.width for s in a] != [s.width for s in b]:  # pragma: no cover - the cuts line them up
            return False
        for x, y in zip(a, b):
            self.ties.add_edge(x.var, y.var, via=where)
        return True

    def factor_tie(self, a: Layout, b: Layout, where: str) -> bool:
        """`x + fc2(y)` where x's channels are a depthwise conv's with a channel multiplier f (FastViT's patch
        embedding: each of w channels gives f) and fc2's are one variable of w·f: fc2's channels are read as w
        units of f (a refinement with a factor) tied to x's, so both grow f channels per unit.  False if it cannot
        (several segments, a variable already cut, a granularity that f does not divide)."""
        a, b = self.expand_layout(a), self.expand_layout(b)
        for x, y in ((a, b), (b, a)):
            if len(x) != 1 or len(y) != 1 or x[0].factor == 1 or y[0].factor != 1:
                continue
            s, u = x[0], y[0]
            data = self.ties.nodes[u.var]
            if u.width != data["width"] or u.width != s.width * s.factor or u.var in self._refinements():
                continue
            if data["gran"] % s.factor and data["gran"] != 1:
                continue
            self._refine(u.var, [s.width], factor=s.factor)
            piece = self._refinements()[u.var][0]
            self.ties.add_edge(piece.var, s.var, via=where)
            return True
        return False

    def _refine(self, v: int, widths: list[int], factor: int = 1) -> None:
        ref = self._refinements()
        if v in ref:
            return
        node = self.ties.nodes[v]
        gran = node["gran"] // factor if node["gran"] % factor == 0 else 1
        pieces = []
        for i, w in enumerate(widths):
            p = self.new_var(w, f"{node['label']}[{i}]" if factor == 1 else f"{node['label']}/{factor}", gran=gran)
            self.ties.nodes[p]["reasons"] = list(node["reasons"])
            pieces.append(Seg(p, w, factor))
        ref[v] = tuple(pieces)
        for u in list(self.ties.neighbors(v)):
            via = self.ties.edges[v, u].get("via")
            self.ties.remove_edge(v, u)
            data = self.ties.nodes[u]
            if (u not in ref and data["width"] == node["width"] and all(w * factor % data["gran"] == 0 for w in widths)
                    and (factor == 1 or data["gran"] % factor == 0 or data["gran"] == 1)):
                self._refine(u, widths, factor)
            if u in ref and [(p.width, p.factor) for p in ref[u]] == [(w, factor) for w in widths]:
                for p, q in zip(pieces, ref[u]):
                    self.ties.add_edge(p.var, q.var, via=via)
            else:  # a different width (an opaque op's chain): every piece stays tied to it, and fixed with it
                for p in pieces:
                    self.ties.add_edge(p.var, u, via=via)
        node["reasons"].append("refined into pieces")  # the variable itself no longer appears anywhere

    def finish_refinement(self) -> None:
        """Expand every binding's layout and the logits' variables."""
        ref = self._refinements()
        if not ref:
            return
        for b in self.bindings:
            b.layout = self.expand_layout(b.layout)
        out = set()
        for v in self.output_vars:
            out.update(s.var for s in self.expand_layout((Seg(v, self.ties.nodes[v]["width"]),)))
        self.output_vars = out

    def fix_targets(self, layout_or_vars) -> list[int]:
        """The variables a fix applies to: a refined variable's pieces too (a layout read before it was refined)."""
        ref = self._refinements()
        out: list[int] = []
        stack = [x.var if isinstance(x, Seg) else x for x in layout_or_vars]
        while stack:
            v = stack.pop()
            out.append(v)
            stack.extend(p.var for p in ref.get(v, ()))
        return out

    # -- splits at positions written as numbers ---------------------------------------------------------------
    def split_by_numbers(self, node, x, dim: int, meta) -> Any:
        """`split(x, sizes, dim)` over channels: refine the variables it cuts so that every piece is whole
        segments, and bind the node (role 'split') so that its sizes follow growth (`engine/splits.py`).
        None when it cannot (a flatten factor, a conv group or a variable cut at two places)."""
        from_sizes = [int(m.shape[dim]) for m in meta]
        pieces = self.cut_layout(x.axes[dim], from_sizes)
        if pieces is None:
            return None
        lay = self.expand_layout(x.axes[dim])
        sizes = get_sizes(node)
        if isinstance(sizes, int):  # the same split for the traced shape, with sizes that can be rewritten
            set_sizes(node, list(from_sizes))
            self.gm.recompile()
        self.bindings.append(Binding(node.name, "split", lay, dim, node.name))
        items = []
        for m, piece in zip(meta, pieces):
            shape = tuple(int(s) for s in m.shape)
            items.append(TVal(x.axes[:dim] + (piece,) + x.axes[dim + 1:], shape))
        return Seq(items)

    def cut_layout(self, lay: Layout, from_sizes: list[int]) -> list[Layout] | None:
        """Refine the variables of `lay` that the pieces `from_sizes` cut, so that every piece is whole segments;
        the pieces' layouts, or None (nothing refined) when a cut falls in a flatten factor, a conv group or a
        variable that is cut at two places or repeated."""
        lay = self.expand_layout(lay)
        if any(s.factor != 1 for s in lay) or sum(s.width for s in lay) != sum(from_sizes):
            return None
        cuts, acc = set(), 0
        for n in from_sizes[:-1]:
            acc += n
            cuts.add(acc)
        plans, pos = [], 0
        for s in lay:
            inner = sorted(c for c in cuts if pos < c < pos + s.width)
            if inner:
                if s.width != self.ties.nodes[s.var]["width"]:
                    return None
                bounds = [pos] + inner + [pos + s.width]
                widths = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
                if any(w % self.ties.nodes[s.var]["gran"] for w in widths):
                    return None
                plans.append((s.var, widths))
            pos += s.width
        cut_vars = [v for v, _ in plans]
        if len(cut_vars) != len(set(cut_vars)) or any(lay.count(Seg(v, self.ties.nodes[v]["width"])) > 1
                                                       for v in cut_vars):
            return None
        for v, widths in plans:
            self._refine(v, widths)
        lay = self.expand_layout(lay)
        pieces, i = [], 0
        for n in from_sizes:
            piece, acc = [], 0
            while acc < n:
                piece.append(lay[i])
                acc += lay[i].width
                i += 1
            pieces.append(tuple(piece))
        return pieces

    def slice_by_numbers(self, node, x, index: list) -> Any:
        """`x[:, a:b]` over channels with bounds written as numbers (DPN's residual and dense parts, ReXNet's
        partial shortcut) is the middle piece of `split(x, [a, b - a, n - b], 1)`: the node is rewritten so, and
        the split's sizes then follow growth like any numeric split.  None (the caller fixes the channels) when
        another axis is indexed too, the tensor is a parameter, or the cut is not at whole segments."""
        if len(index) != len(x.shape) or not all(isinstance(i, slice) for i in index) or any(x.origin):
            return None
        if any(isinstance(b, fx.Node) for i in index for b in (i.start, i.stop, i.step)):
            return None
        cut = [(d, i.indices(n)) for d, (i, n) in enumerate(zip(index, x.shape)) if i.indices(n) != (0, n, 1)]
        if len(cut) != 1 or cut[0][1][2] != 1 or not x.axes[cut[0][0]]:
            return None
        dim, (start, stop, _) = cut[0]
        if stop <= start:
            return None
        n = x.shape[dim]
        sizes = [s for s in (start, stop - start, n - stop) if s > 0]
        meta = node.args[0].meta.get("tensor_meta")
        if not hasattr(meta, "shape"):
            return None
        metas = [meta._replace(shape=torch.Size([s if d == dim else w for d, w in enumerate(meta.shape)]))
                 for s in sizes]
        graph = self.gm.graph
        with graph.inserting_before(node):
            split = graph.call_function(torch.split, (node.args[0], sizes, dim))
        split.meta["tensor_meta"] = metas
        batch = node.args[0].meta.get("batch_axes")
        if isinstance(batch, tuple):
            split.meta["batch_axes"] = [batch] * len(sizes)
        pieces = self.split_by_numbers(split, x, dim, metas)
        if pieces is None:
            graph.erase_node(split)
            return None
        node.target, node.args, node.kwargs = operator.getitem, (split, int(start > 0)), {}
        self.gm.recompile()
        self.values[split.name] = pieces
        return pieces.items[int(start > 0)]
