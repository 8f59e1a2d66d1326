"""No private name (a leading underscore, not a dunder) defined in one of our modules is
used from another module of ours or from the tests: modules talk through public names.

Read from the source (AST). A use is ``from mod import _name``, ``something._name`` and
``getattr`` / ``setattr`` / ``hasattr`` / ``monkeypatch.setattr`` with the name as a string.
A name counts as ours when one of our modules defines it (at module level, in a class
body, or as ``self._name`` / ``cls._name``): third-party private attributes (argparse's
``parser._actions``) are not our concern. When the receiver of ``x._name`` is one of our
modules (``import pipeline.tables as T``), any private name of that module is a use.
"""
import ast
from collections import defaultdict
from pathlib import Path

from conftest import ROOT

PACKAGES = [p for p in ("breakscene", "pipeline", "robustness", "benchmarks") if (ROOT / p).is_dir()]
STRING_ACCESS = {"getattr", "setattr", "hasattr", "delattr"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name != "_"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, tuple[Path, ast.Module]]:
    """Our modules by dotted name, and the tests (``tests.<file>``)."""
    files = [f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))]
    files += sorted((ROOT / "tests").glob("*.py"))
    return {module_name(f): (f, ast.parse(f.read_text(), str(f))) for f in files}


def definitions(tree: ast.Module) -> set[str]:
    """Private names this file defines: module level, class bodies, ``self._x`` / ``cls._x``."""
    found: set[str] = set()

    def body(nodes, in_class: bool):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.add(node.name)
                if isinstance(node, ast.ClassDef):
                    body(node.body, True)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            found.add(n.id)
            elif isinstance(node, (ast.If, ast.Try)) and not in_class:
                body(node.body, False)
                body(getattr(node, "orelse", []), False)

    body(tree.body, False)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            found.add(node.attr)
    return {n for n in found if is_private(n)}


def module_aliases(tree: ast.Module, here: str, known: set[str]) -> dict[str, str]:
    """Local names bound to our modules: ``import a.b as X``, ``from a import b as X``."""
    package = here.rpartition(".")[0]
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node, package)
            for a in node.names:
                if f"{base}.{a.name}" in known:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
    return aliases


def resolve(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def uses(tree: ast.Module, here: str, known: set[str]):
    """(line, name, module it is taken from or None) of every private attribute or import."""
    package = here if (ROOT / here.replace(".", "/") / "__init__.py").is_file() else here.rpartition(".")[0]
    aliases = module_aliases(tree, here, known)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = resolve(node, package)
            if base in known:
                for a in node.names:
                    if is_private(a.name):
                        yield node.lineno, a.name, base
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = aliases.get(node.value.id) if isinstance(node.value, ast.Name) else None
            yield node.lineno, node.attr, owner
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            arg = node.args[1]
            if ((name in STRING_ACCESS or name == "setattr") and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str) and is_private(arg.value)):
                target = node.args[0]
                owner = aliases.get(target.id) if isinstance(target, ast.Name) else None
                yield node.lineno, arg.value, owner


def violations() -> list[str]:
    files = sources()
    ours = {m for m in files if not m.startswith("tests.")}
    defined = {m: definitions(tree) for m, (_, tree) in files.items()}
    owners = defaultdict(set)
    for m in ours:
        for name in defined[m]:
            owners[name].add(m)
    found = []
    for here, (path, tree) in files.items():
        for line, name, owner in uses(tree, here, ours):
            if owner == here or (owner is None and name in defined[here]):
                continue  # its own module's name
            if owner is None and not owners.get(name):
                continue  # not a name of ours: a third-party object's attribute
            where = owner or ", ".join(sorted(owners[name]))
            found.append(f"{path.relative_to(ROOT)}:{line}: {name} (private to {where})")
    return sorted(set(found))


def test_checker_sees_imports_attributes_and_strings(tmp_path):
    tree = ast.parse("from pipeline import tables as T\nfrom pipeline.tables import _x\n"
                     "T._y\nobj._z\nsetattr(T, '_w', 1)\nparser._actions\n")
    found = {(name, owner) for _, name, owner in uses(tree, "tests.t", {"pipeline", "pipeline.tables"})}
    assert found == {("_x", "pipeline.tables"), ("_y", "pipeline.tables"), ("_z", None), ("_w", "pipeline.tables"),
                     ("_actions", None)}
    assert definitions(ast.parse("_a = 1\nclass C:\n    _b = 2\n    def _c(self):\n        self._d = 3\n"
                                 "def f():\n    other._e = 4\n")) == {"_a", "_b", "_c", "_d"}


def test_no_private_name_used_outside_its_module():
    found = violations()
    assert not found, f"{len(found)} uses of private names outside their module:\n" + "\n".join(found)
