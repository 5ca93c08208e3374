"""Mutants of one Python file, found on its `ast` and applied as text edits, so that every line the mutant does
not touch keeps its exact text (comments, layout, line numbers of everything before it).

A mutant is one small, realistic bug: `>=` for `>`, a dropped statement, two arguments swapped, a dimension off by
one.  Its id is a fingerprint of *what* it changes (file, enclosing function, operator, the changed line's text
before and after, and its rank among identical changes in that function), never of the line number, so an entry
in the equivalents file survives edits elsewhere in the file.
"""

from __future__ import annotations

import ast
import hashlib
import io
import re
import tokenize
from dataclasses import asdict, dataclass, field
from typing import Optional

OPERATORS = ("comparison", "arithmetic", "constant", "drop", "swap-args", "boolean", "any-all", "min-max", "dim",
             "break-continue")

PRAGMA = re.compile(r"#.*\bpragma:\s*no\s+mutate\b")

COMPARE_SWAP = {ast.Lt: "<=", ast.LtE: "<", ast.Gt: ">=", ast.GtE: ">", ast.Eq: "!=", ast.NotEq: "==",
                ast.Is: "is not", ast.IsNot: "is", ast.In: "not in", ast.NotIn: "in"}
COMPARE_TEXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
                ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}
BINOP_SWAP = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"),
              ast.FloorDiv: ("//", "/"), ast.Mod: ("%", "/"), ast.Pow: ("**", "*"), ast.BitAnd: ("&", "|"),
              ast.BitOr: ("|", "&"), ast.LShift: ("<<", ">>"), ast.RShift: (">>", "<<")}
NAME_SWAP = {"any": ("any-all", "all"), "all": ("any-all", "any"), "min": ("min-max", "max"),
             "max": ("min-max", "min"), "amin": ("min-max", "amax"), "amax": ("min-max", "amin"),
             "argmin": ("min-max", "argmax"), "argmax": ("min-max", "argmin"), "minimum": ("min-max", "maximum"),
             "maximum": ("min-max", "minimum"), "clamp_min": ("min-max", "clamp_max"),
             "clamp_max": ("min-max", "clamp_min")}
DIM_KEYWORDS = {"dim", "axis", "start_dim", "end_dim", "dim0", "dim1"}
# tensor methods whose first positional argument is a dimension (x.sum(1)); as torch.X / F.X functions the
# dimension is the second positional argument (torch.sum(x, 1)).  split/chunk take a size first.
DIM_METHODS = {"sum", "mean", "max", "min", "amax", "amin", "argmax", "argmin", "softmax", "log_softmax", "cumsum",
               "cumprod", "prod", "std", "var", "norm", "flatten", "unsqueeze", "squeeze", "size", "cat", "concat",
               "stack", "transpose", "movedim", "narrow", "select", "gather", "index_select", "all", "any",
               "logsumexp", "sort", "argsort", "unbind", "count_nonzero", "nansum", "median", "flip"}
DIM_SECOND = {"split", "chunk"}
MODULE_NAMES = {"torch", "F", "functional", "np", "numpy"}
# calls whose argument order does not matter, or whose swap is a TypeError that says nothing about the tests
NO_SWAP = {"min", "max", "maximum", "minimum", "add", "mul", "eq", "equal", "allclose", "isclose", "hypot",
           "logical_and", "logical_or", "union", "intersection", "isinstance", "issubclass", "getattr", "setattr",
           "hasattr", "zip", "print"}
# calls that only print or log: their arguments are messages, dropping them changes no result
MESSAGE_OWNERS = {"logging", "logger", "log", "_log", "_logger", "LOGGER", "warnings", "console", "typer", "rich"}
MESSAGE_ATTRS = {"echo", "secho", "warn"}
SKIP_FUNCTIONS = {"__repr__", "__str__", "__format__", "__rich__", "__rich_repr__"}


@dataclass
class Mutant:
    file: str                      # path relative to the project root, posix
    line: int                      # first line the edit touches (1-based)
    end_line: int                  # last line the edit touches
    operator: str
    function: str                  # qualified name of the enclosing def/class, "<module>" at top level
    original: str                  # the touched lines before ...
    mutated: str                   # ... and after the edit (whole physical lines)
    cover_lines: tuple[int, int]   # the lines whose coverage says a test reaches the mutant (its statement)
    edits: list = field(default_factory=list)   # [(start_offset, end_offset, text)] in the file's text
    id: str = ""

    def apply(self, source: str) -> str:
        for start, end, text in sorted(self.edits, reverse=True):
            source = source[:start] + text + source[end:]
        return source

    def describe(self) -> str:
        return f"{self.file}:{self.line} {self.operator}: {one_line(self.original)}  ->  {one_line(self.mutated)}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("edits")
        d["cover_lines"] = list(self.cover_lines)
        return d


def one_line(text: str) -> str:
    return " ⏎ ".join(part.strip() for part in text.strip("\n").splitlines())


class _Source:
    """Offsets in the file's text from ast positions (ast columns count UTF-8 bytes), and its tokens."""

    def __init__(self, text: str):
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))
        self.tokens = []  # (start_offset, end_offset, type, string)
        self.pragma_lines = set()
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT and PRAGMA.search(tok.string):
                self.pragma_lines.add(tok.start[0])
            if tok.type in (tokenize.OP, tokenize.NAME):
                self.tokens.append((self.char(tok.start[0], tok.start[1]), self.char(tok.end[0], tok.end[1]),
                                    tok.type, tok.string))

    def char(self, lineno: int, col_chars: int) -> int:
        return self.starts[lineno - 1] + col_chars

    def offset(self, lineno: int, col_bytes: int) -> int:
        line = self.lines[lineno - 1] if lineno - 1 < len(self.lines) else ""
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col_bytes].decode("utf-8", errors="ignore"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)

    def line_of(self, offset: int) -> int:
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:  # last start <= offset
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1

    def tokens_between(self, start: int, end: int) -> list[tuple]:
        return [t for t in self.tokens if start <= t[0] and t[1] <= end and t[3] not in "()[]{},"]


def _call_name(func: ast.AST) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _owner_name(func: ast.AST) -> str:
    if isinstance(func, ast.Attribute):
        v = func.value
        if isinstance(v, ast.Name):
            return v.id
        if isinstance(v, ast.Attribute):
            return v.attr
    return ""


def _is_message_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Name):
        return func.id == "print"
    if isinstance(func, ast.Attribute):
        owner = _owner_name(func)
        return owner in MESSAGE_OWNERS or "console" in owner.lower() or func.attr in MESSAGE_ATTRS
    return False


def _int_literal(node: ast.AST) -> Optional[int]:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) is int):
        return -node.operand.value
    return None


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _skipped_if(node: ast.If) -> bool:
    """`if TYPE_CHECKING:` and `if __name__ == "__main__":` blocks are never mutated."""
    t = node.test
    if isinstance(t, ast.Name) and t.id == "TYPE_CHECKING":
        return True
    if isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING":
        return True
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and len(t.comparators) == 1 and isinstance(t.comparators[0], ast.Constant)
            and t.comparators[0].value == "__main__")


def _header_lines(stmt: ast.stmt) -> tuple[int, int]:
    """The lines of a statement that hold its own expressions: the whole of a simple statement, the header of a
    compound one (`if ...:`, `for ...:`, `def ...(defaults):`)."""
    body = getattr(stmt, "body", None)
    if isinstance(body, list) and body and not isinstance(stmt, ast.Module):
        return stmt.lineno, max(stmt.lineno, body[0].lineno - 1)
    return stmt.lineno, stmt.end_lineno or stmt.lineno


class _Finder:
    def __init__(self, relpath: str, text: str, tree: ast.Module, operators: set[str]):
        self.path, self.src, self.tree, self.operators = relpath, _Source(text), tree, operators
        self.found: list[Mutant] = []
        self.scope: list[str] = []
        self.stmt: Optional[ast.stmt] = None
        self.dim_nodes: set[int] = set()
        self.funcs: list = []  # per enclosing def/class: the def's bindings (None for a class body)

    # -- recording ---------------------------------------------------------------------------------------------
    def add(self, operator: str, edits: list[tuple[int, int, str]]) -> None:
        if operator not in self.operators or not edits:
            return
        src = self.src
        first = src.line_of(min(e[0] for e in edits))
        last = src.line_of(max(max(e[0], e[1] - 1) for e in edits))
        lo, hi = _header_lines(self.stmt) if self.stmt is not None else (first, last)
        if any(n in src.pragma_lines for n in range(min(lo, first), max(hi, last) + 1)):
            return
        a, b = src.starts[first - 1], src.starts[last]
        original = src.text[a:b]
        mutated = original
        for start, end, text in sorted(edits, reverse=True):
            mutated = mutated[: start - a] + text + mutated[end - a:]
        if mutated == original:
            return
        self.found.append(Mutant(self.path, first, last, operator, ".".join(self.scope) or "<module>", original,
                                 mutated, (min(lo, first), max(hi, last)), list(edits)))

    def replace_node(self, operator: str, node: ast.AST, text: str) -> None:
        start, end = self.src.span(node)
        self.add(operator, [(start, end, text)])

    # -- walking -----------------------------------------------------------------------------------------------
    def run(self) -> list[Mutant]:
        self.body(self.tree.body)
        return self.found

    def body(self, stmts: list[ast.stmt], in_class: bool = False) -> None:
        for i, stmt in enumerate(stmts):
            if i == 0 and _is_docstring(stmt):
                continue
            self.statement(stmt, in_class)

    def statement(self, stmt: ast.stmt, in_class: bool = False) -> None:
        outer, self.stmt = self.stmt, stmt
        try:
            self._statement(stmt, in_class)
        finally:
            self.stmt = outer

    def _statement(self, stmt: ast.stmt, in_class: bool) -> None:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if stmt.name in SKIP_FUNCTIONS or stmt.lineno in self.src.pragma_lines:
                return
            self.scope.append(stmt.name)
            self.funcs.append(None if isinstance(stmt, ast.ClassDef) else _bindings(stmt))
            if isinstance(stmt, ast.ClassDef):
                for e in [*stmt.bases, *(k.value for k in stmt.keywords)]:
                    self.expr(e)
            else:  # default values belong to the function (they run when the module is imported)
                for d in [*stmt.args.defaults, *(d for d in stmt.args.kw_defaults if d is not None)]:
                    self.expr(d)
            self.body(stmt.body, in_class=isinstance(stmt, ast.ClassDef))
            self.scope.pop()
            self.funcs.pop()
            return
        if isinstance(stmt, ast.If) and _skipped_if(stmt):
            return
        if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal, ast.Pass)):
            return
        if isinstance(stmt, ast.Raise):
            return  # the exception and its message: what raises it is mutated where it is decided
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and _assigns_all(stmt):
            return
        if isinstance(stmt, ast.Expr) and (_is_message_call(stmt.value) or isinstance(stmt.value, ast.Constant)):
            return
        if isinstance(stmt, ast.Break):
            self.replace_node("break-continue", stmt, "continue")
            return
        if isinstance(stmt, ast.Continue):
            self.replace_node("break-continue", stmt, "break")
            return
        self.drop(stmt, in_class)
        if isinstance(stmt, ast.AugAssign) and type(stmt.op) in BINOP_SWAP:
            old, new = BINOP_SWAP[type(stmt.op)]
            t_end = self.src.span(stmt.target)[1]
            v_start = self.src.span(stmt.value)[0]
            for s, e, _, string in self.src.tokens_between(t_end, v_start):
                if string == old + "=":
                    self.add("arithmetic", [(s, e, new + "=")])
                    break
        if isinstance(stmt, ast.Assert):
            self.expr(stmt.test)  # its message is not mutated
            return
        for name, value in ast.iter_fields(stmt):
            if name in ("annotation", "returns", "type_comment", "decorator_list", "target", "targets"):
                if name in ("target", "targets"):
                    for t in (value if isinstance(value, list) else [value]):
                        self.target(t)
                continue
            if isinstance(value, list):
                if value and isinstance(value[0], ast.stmt):
                    for s in value:
                        self.statement(s)
                else:
                    for v in value:
                        if isinstance(v, ast.excepthandler):
                            self.handler(v)
                        elif isinstance(v, ast.withitem):
                            self.expr(v.context_expr)
                        elif isinstance(v, ast.AST):
                            self.expr(v)
            elif isinstance(value, ast.expr):
                self.expr(value)

    def handler(self, h: ast.excepthandler) -> None:
        for s in h.body:
            self.statement(s)

    def target(self, t: ast.AST) -> None:
        """Assignment targets: only what they index (`x[i] = ...`), never the names they bind."""
        if isinstance(t, ast.Subscript):
            self.expr(t.value)
            self.expr(t.slice)
        elif isinstance(t, ast.Attribute):
            self.expr(t.value)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                self.target(e)

    def drop(self, stmt: ast.stmt, in_class: bool) -> None:
        if isinstance(stmt, ast.Return):
            if stmt.value is not None and not (isinstance(stmt.value, ast.Constant) and stmt.value.value is None):
                self.replace_node("drop", stmt.value, "None")
            return
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            if stmt.value is None or not self.funcs or self.funcs[-1] is None:
                return  # a module constant or class attribute: dropping it is a NameError at import
            if _first_binding_read_later(stmt, self.funcs[-1]):
                return  # the first value of a local that is read later: dropping it is an UnboundLocalError
        if isinstance(stmt, (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign)):
            self.replace_node("drop", stmt, "pass")

    # -- expressions -------------------------------------------------------------------------------------------
    def expr(self, node: ast.AST) -> None:
        if node is None or isinstance(node, ast.JoinedStr) or _is_message_call(node):
            return
        m = getattr(self, "on_" + type(node).__name__, None)
        if m is not None:
            m(node)
        for name, value in ast.iter_fields(node):
            if isinstance(value, list):
                for v in value:
                    if isinstance(v, ast.AST):
                        self.child(node, v)
            elif isinstance(value, ast.AST):
                self.child(node, value)

    def child(self, parent: ast.AST, node: ast.AST) -> None:
        if isinstance(node, (ast.expr_context, ast.operator, ast.boolop, ast.unaryop, ast.cmpop)):
            return
        if isinstance(node, ast.keyword):
            self.expr(node.value)
        elif isinstance(node, ast.comprehension):
            self.expr(node.iter)
            for cond in node.ifs:
                self.expr(cond)
        elif isinstance(node, ast.arguments):
            for d in [*node.defaults, *(d for d in node.kw_defaults if d is not None)]:
                self.expr(d)
        elif isinstance(node, ast.expr):
            self.expr(node)

    def on_Compare(self, node: ast.Compare) -> None:
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            a, b = self.src.span(left)[1], self.src.span(right)[0]
            toks = self.src.tokens_between(a, b)
            if toks and " ".join(t[3] for t in toks) == COMPARE_TEXT[type(op)]:
                self.add("comparison", [(toks[0][0], toks[-1][1], COMPARE_SWAP[type(op)])])
            left = right

    def on_BinOp(self, node: ast.BinOp) -> None:
        if type(node.op) not in BINOP_SWAP:
            return
        if isinstance(node.op, ast.Add) and (_is_str(node.left) or _is_str(node.right)
                                             or isinstance(node.left, (ast.List, ast.Tuple))
                                             or isinstance(node.right, (ast.List, ast.Tuple))):
            return  # concatenation
        if isinstance(node.op, ast.Div) and _is_str(node.right):
            return  # path / "name"
        if isinstance(node.op, ast.Mod) and _is_str(node.left):
            return  # "%s" % x
        old, new = BINOP_SWAP[type(node.op)]
        a, b = self.src.span(node.left)[1], self.src.span(node.right)[0]
        for s, e, _, string in self.src.tokens_between(a, b):
            if string == old:
                self.add("arithmetic", [(s, e, new)])
                return

    def on_BoolOp(self, node: ast.BoolOp) -> None:
        old, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        edits = []
        for left, right in zip(node.values, node.values[1:]):
            a, b = self.src.span(left)[1], self.src.span(right)[0]
            edits += [(s, e, new) for s, e, _, string in self.src.tokens_between(a, b) if string == old]
        self.add("boolean", edits)

    def on_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not):
            start = self.src.span(node)[0]
            end = start + len("not")
            while self.src.text[end] in " \t":
                end += 1
            self.add("boolean", [(start, end, "")])

    def on_Constant(self, node: ast.Constant) -> None:
        v = node.value
        if id(node) in self.dim_nodes:
            return
        if type(v) is bool:
            self.replace_node("boolean", node, "False" if v else "True")
        elif type(v) is int:
            self.replace_node("constant", node, repr(v + 1))
        elif type(v) is float:
            self.replace_node("constant", node, repr(v * 2) if v != 0 else "1.0")

    def on_Call(self, node: ast.Call) -> None:
        name = _call_name(node.func)
        if name in NAME_SWAP:
            operator, other = NAME_SWAP[name]
            end = self.src.span(node.func)[1]
            self.add(operator, [(end - len(name), end, other)])
        # dimension arguments
        for kw in node.keywords:
            if kw.arg in DIM_KEYWORDS:
                self.dim(kw.value)
        if isinstance(node.func, ast.Attribute) and (name in DIM_METHODS or name in DIM_SECOND):
            is_module = _owner_name(node.func) in MODULE_NAMES
            index = (1 if name in DIM_SECOND else 0) + (1 if is_module else 0)
            if len(node.args) > index:
                self.dim(node.args[index])
        # swapped arguments
        args = node.args
        if (len(args) >= 2 and name not in NO_SWAP and not any(isinstance(a, ast.Starred) for a in args[:2])):
            (s0, e0), (s1, e1) = self.src.span(args[0]), self.src.span(args[1])
            t0, t1 = self.src.text[s0:e0], self.src.text[s1:e1]
            if t0 != t1:
                self.add("swap-args", [(s0, e0, t1), (s1, e1, t0)])

    def on_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.value, ast.Attribute) and node.value.attr == "shape":
            self.dim(node.slice)

    def dim(self, node: ast.AST) -> None:
        value = _int_literal(node)
        if value is None:
            return
        self.dim_nodes.add(id(node))
        if isinstance(node, ast.UnaryOp):
            self.dim_nodes.add(id(node.operand))
        for new in (value + 1, value - 1):
            self.replace_node("dim", node, str(new))


def _bindings(fn: ast.AST) -> tuple[set[str], dict[str, list[int]], dict[str, list[int]]]:
    """(parameters, {name: lines it is stored on}, {name: lines it is read on}) of a function."""
    a = fn.args
    params = {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg] if x is not None}
    stores: dict[str, list[int]] = {}
    loads: dict[str, list[int]] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name):
            (stores if isinstance(node.ctx, ast.Store) else loads).setdefault(node.id, []).append(node.lineno)
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):  # x += 1 reads x too
            loads.setdefault(node.target.id, []).append(node.lineno)
    return params, stores, loads


def _first_binding_read_later(stmt, info) -> bool:
    params, stores, loads = info
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    names: list[str] = []
    stack = list(targets)
    while stack:
        t = stack.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            stack += t.elts
        elif isinstance(t, ast.Starred):
            stack.append(t.value)
        elif isinstance(t, ast.Name):
            names.append(t.id)
        else:
            return False  # an attribute or item: dropping the store is a real mutant
    return all(n not in params and not any(line < stmt.lineno for line in stores.get(n, ()))
               and bool(loads.get(n)) for n in names)


def _assigns_all(stmt) -> bool:
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    return any(isinstance(t, ast.Name) and t.id in ("__all__", "__slots__") for t in targets)


def find_mutants(relpath: str, text: str, operators: Optional[set[str]] = None,
                 check: bool = False) -> list[Mutant]:
    """Every mutant of one file, with stable ids.  `check` drops any edit that would not compile (slow: a
    compile per mutant; the runner compiles each mutant it runs anyway and reports one that does not)."""
    tree = ast.parse(text)
    found = _Finder(relpath, text, tree, set(operators or OPERATORS)).run()
    seen: dict[str, int] = {}
    out = []
    for m in sorted(found, key=lambda m: (m.edits[0][0], m.operator, m.mutated)):
        if check:
            try:
                compile(m.apply(text), relpath, "exec", dont_inherit=True)
            except SyntaxError:
                continue
        key = "|".join([m.file, m.function, m.operator, _norm(m.original), _norm(m.mutated)])
        rank = seen.get(key, 0)
        seen[key] = rank + 1
        m.id = hashlib.sha1(f"{key}|{rank}".encode()).hexdigest()[:10]
        out.append(m)
    return out


def _norm(text: str) -> str:
    return "\n".join(line.strip() for line in text.strip().splitlines())
