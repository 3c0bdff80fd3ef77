"""Production vs lab code: the wheel holds `events` and `moldd` only, and production code never imports the lab.

`moldlab/` (lab libvirtd hosts, the guest builder, the fence-by-kill script, the demo) and `moldlab/testing/`
(test and benchmark helpers) are used from a source checkout; a production install must not carry them.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = ("events", "moldd")
LAB = "moldlab"


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in one file, including importlib.import_module("...")."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.lineno, node.module
                yield from ((node.lineno, f"{node.module}.{a.name}") for a in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def production_files() -> list[Path]:
    files = [p for pkg in PRODUCTION for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 50, files  # the scan really ran over the tree
    return files


def test_production_code_imports_nothing_from_the_lab() -> None:
    bad = [
        f"{p.relative_to(REPO)}:{line}: {mod}"
        for p in production_files()
        for line, mod in imported_modules(p)
        if _top(mod) == LAB
    ]
    assert not bad, bad


def test_production_code_does_not_name_the_lab_in_strings() -> None:
    """A default such as fence_command = ["python3", "-m", "moldlab.fence"] would need the lab at run time."""
    bad = [
        f"{p.relative_to(REPO)}:{node.lineno}: {node.value!r}"
        for p in production_files()
        for node in ast.walk(ast.parse(p.read_text(), str(p)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and LAB in node.value
    ]
    assert not bad, bad


def test_events_imports_nothing_from_moldd_or_the_lab() -> None:
    bad = [
        f"{p.relative_to(REPO)}:{line}: {mod}"
        for p in sorted((REPO / "events").rglob("*.py"))
        for line, mod in imported_modules(p)
        if _top(mod) in ("moldd", LAB)
    ]
    assert not bad, bad


def test_the_scan_sees_every_kind_of_import(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "import moldlab\nimport os, moldlab.fence as f\nfrom moldlab.testing import harness\n"
        "from moldlab import Lab\nimport importlib\nimportlib.import_module('moldlab.demo')\n"
        "__import__('moldlab.hosts')\nfrom . import sibling\n"
    )
    found = [(line, mod) for line, mod in imported_modules(src) if _top(mod) == LAB]
    assert [line for line, _ in found] == [1, 2, 3, 3, 4, 4, 6, 7]


def test_lab_entry_points_run_from_a_checkout() -> None:
    """The commands the scripts and docs give: `python -m moldlab`, `python -m moldlab.demo`, `... .fence`."""
    for mod, prog in (("moldlab", "python -m moldlab"), ("moldlab.demo", "moldlab.demo"),
                      ("moldlab.fence", "python -m moldlab.fence")):
        res = subprocess.run([sys.executable, "-m", mod, "--help"], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, (mod, res.stderr)
        assert f"usage: {prog}" in res.stdout, (mod, res.stdout)


def _build_wheel(tmp_path: Path) -> Path:
    """Build the production wheel from a copy of the checkout (a setuptools build writes build/ and *.egg-info
    into the source tree). Offline: the venv's setuptools + wheel, no build isolation."""
    src = tmp_path / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in (*PRODUCTION, LAB):  # the lab is copied too: the build must leave it out by configuration
        shutil.copytree(REPO / name, src / name, ignore=skip)
    out = tmp_path / "dist"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = out.glob("moldd-*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_holds_production_code_only(tmp_path: Path) -> None:
    pytest.importorskip("wheel", reason="the offline wheel build needs the `wheel` package (test extra)")
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        files = {n: z.read(n) for n in z.namelist()}
    tops = {n.split("/", 1)[0] for n in files}
    assert tops == {*PRODUCTION, "moldd-0.1.0.dist-info"}, tops
    assert not [n for n in files if n.startswith(f"{LAB}/")]
    # no lab or testing module under another name, and no fence-by-kill script (nor its killing code)
    parts = {part for n in files for part in n.removesuffix(".py").split("/")}
    assert not parts & {"lab", "testing", "fence", "demo", "harness", "reaper"}, sorted(parts)
    assert not [n for n, data in files.items() if b"kill_host_processes" in data or b"moldlab" in data]
    # ... and every production module and the status page are there (the include list is not too narrow)
    assert {str(p.relative_to(REPO)) for p in production_files()} == {n for n in files if n.endswith(".py")}
    assert {"moldd/observe/static/index.html", "moldd/observe/static/status.js"} <= files.keys()
    # the console scripts point into the wheel
    (entry_points,) = [data.decode() for n, data in files.items() if n.endswith(".dist-info/entry_points.txt")]
    scripts = [line.split("=", 1)[1].strip() for line in entry_points.splitlines() if "=" in line]
    assert len(scripts) == 3, entry_points
    for target in scripts:
        module = target.split(":")[0].replace(".", "/")
        assert f"{module}.py" in files or f"{module}/__init__.py" in files, target
