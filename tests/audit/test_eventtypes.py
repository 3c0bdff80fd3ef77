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


def written_event_types() -> dict[str, str]:
    """event type -> where (file:line) for every type literal moldd passes to the log."""
    found: dict[str, str] = {}
    for path in sorted(MOLDD.rglob("*.py")):
        if "lab" in path.relative_to(MOLDD).parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            candidates: set[str] = set()
            if isinstance(node, ast.Call):
                name = _name(node.func)
                if name == "NewEvent":
                    candidates |= _strings(node.args[0] if node.args else None)
                elif name == "async_record":
                    candidates |= _strings(node.args[1] if len(node.args) > 1 else None)
                for kw in node.keywords:
                    if kw.arg == "event_type" or (kw.arg or "").endswith("_type") and name not in ("", "dict"):
                        candidates |= _strings(kw.value)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = a.posonlyargs + a.args
                for arg, default in zip(params[len(params) - len(a.defaults):], a.defaults, strict=True):
                    if arg.arg.endswith("_type"):
                        candidates |= _strings(default)
                for arg, kwdefault in zip(a.kwonlyargs, a.kw_defaults, strict=True):
                    if arg.arg.endswith("_type"):
                        candidates |= _strings(kwdefault)
            for t in candidates:
                if "." in t and " " not in t:
                    found.setdefault(t, f"{path.relative_to(MOLDD.parent)}:{getattr(node, 'lineno', '?')}")
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
