"""The registry of event types (moldd/eventtypes.py) lists every type moldd writes: scan moldd/ for event type
literals passed to NewEvent(...) / async_record(...) (and *_type= arguments / defaults that name an event type
forwarded to them), and for the types the read model folds."""

from __future__ import annotations

import ast
from pathlib import Path

from moldd.eventtypes import EVENT_TYPES, upcasters
from moldd.projection.readmodel import _HANDLERS

MOLDD = Path(__file__).resolve().parents[2] / "moldd"


def _strings(node: ast.AST | None) -> set[str]:
    if node is None:
        return set()
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


Func = ast.FunctionDef | ast.AsyncFunctionDef


def _params(fn: Func) -> list[str]:
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    return names[1:] if names and names[0] in ("self", "cls") else names


def _arg(call: ast.Call, index: int, keyword: str) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value
    return call.args[index] if index < len(call.args) else None


def _defaults(fn: Func) -> dict[str, ast.expr]:
    a = fn.args
    params = a.posonlyargs + a.args
    out = {p.arg: d for p, d in zip(params[len(params) - len(a.defaults) :], a.defaults, strict=True)}
    out |= {p.arg: d for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None}
    return out


def written_event_types() -> dict[str, str]:
    """event type -> where (file:line) for every type literal moldd passes to the log.

    NewEvent(type, ...) and App.async_record(vm, type, ...) write events; so does any function that forwards
    one of its parameters to them as the type (found by a fixpoint: ``_async_ha_event(name, event_type, ...)``,
    ``async_start_on(..., ok_type="vm.started")``): literals passed to, or defaulted for, that parameter count.
    """
    funcs: list[tuple[Path, Func]] = []
    calls: list[tuple[Path, Func | None, ast.Call]] = []
    for path in sorted(MOLDD.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((path, node))
        owner: dict[ast.AST, Func | None] = {}
        fn: Func
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for n in ast.walk(fn):
                if isinstance(n, ast.Call):
                    owner[n] = fn  # innermost wins: nested defs are walked after their parent
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                calls.append((path, owner.get(node), node))
    # writer name -> {(positional index of a type argument in a call, its keyword name)}
    writers: dict[str, set[tuple[int, str]]] = {
        "NewEvent": {(0, "event_type")},
        "async_record": {(1, "event_type")},
    }
    changed = True
    while changed:
        changed = False
        for _, caller, call in calls:
            if caller is None:
                continue
            fn = caller
            for w in list(writers.get(_name(call.func), ())):
                expr = _arg(call, *w)
                used = (
                    {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)} if expr is not None else set()
                )
                params = _params(fn)
                kwonly = [a.arg for a in fn.args.kwonlyargs]
                for p in used:
                    entry = (params.index(p), p) if p in params else (10**6, p) if p in kwonly else None
                    if entry is not None and entry not in writers.setdefault(fn.name, set()):
                        writers[fn.name].add(entry)
                        changed = True
    found: dict[str, str] = {}

    def add(values: set[str], path: Path, node: ast.AST) -> None:
        for t in values:
            if "." in t and " " not in t and "{" not in t:
                found.setdefault(t, f"{path.relative_to(MOLDD.parent)}:{getattr(node, 'lineno', '?')}")

    for path, caller, call in calls:
        for w in writers.get(_name(call.func), ()):
            expr = _arg(call, *w)
            add(_strings(expr), path, call)
            if caller is None or expr is None:
                continue
            fn = caller
            names = {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)}
            for node in ast.walk(fn):  # a local such as `fail = "vm.x.failed" if ... else "vm.y.failed"`
                if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id in names for t in node.targets
                ):
                    add(_strings(node.value), path, node)
    for path, fn in funcs:
        defaults = _defaults(fn)
        for _, kw in writers.get(fn.name, ()):
            if kw in defaults:
                add(_strings(defaults[kw]), path, fn)
    return found


def test_every_event_type_moldd_writes_is_registered() -> None:
    written = written_event_types()
    assert len(written) >= 25, "the scan found too little: has the append API changed?"
    missing = {t: where for t, where in written.items() if t not in EVENT_TYPES}
    assert not missing, f"add these event types to moldd/eventtypes.py: {missing}"


def test_every_event_type_the_projection_folds_is_registered() -> None:
    missing = sorted(set(_HANDLERS) - set(EVENT_TYPES))
    assert not missing, f"add these event types to moldd/eventtypes.py: {missing}"


def test_registry_versions_and_upcasters() -> None:
    assert all(isinstance(v, int) and v >= 1 for v in EVENT_TYPES.values())
    assert upcasters().known == dict(EVENT_TYPES)
