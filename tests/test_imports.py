"""The import graph of our packages has no circle, and reading a job file stays light.

Imports are read from the source (AST), those inside functions included: a lazy import
hides a circle from Python, not from the reader.
"""
import ast
import subprocess
import sys

from conftest import ROOT

# The packages from the bottom up: a package may import those of a lower layer only.
# pipeline/ and robustness/ share a layer and never import each other.
LAYERS = [("breakscene",), ("batchjob",), ("pipeline", "robustness"), ("commands",), ("benchmarks",)]
LAYER = {pkg: i for i, names in enumerate(LAYERS) for pkg in names}
PACKAGES = [p for p in LAYER if (ROOT / p).is_dir()]


def modules() -> dict[str, ast.Module]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = (ast.parse(path.read_text(), str(path)), path.name == "__init__.py")
    return found


def imported(name: str, tree: ast.Module, is_package: bool, known) -> set[str]:
    """Our modules that ``name`` imports (``from pkg import mod`` imports ``pkg`` and, where
    it is a module, ``pkg.mod``)."""
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, tree, is_pkg, mods) for name, (tree, is_pkg) in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-loops."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_relative_and_lazy_imports():
    edges = graph()
    assert "robustness.grid" in edges["commands.jobs"]  # inside load_job
    assert "breakscene.scenes.masks" in edges["pipeline.stages"]  # from breakscene.scenes.masks import ...
    tree = ast.parse("from . import settings\nfrom .manifest import plan\ndef f():\n    from ..pipeline import row\n")
    known = {"batchjob", "batchjob.settings", "batchjob.manifest", "pipeline", "pipeline.row"}
    assert imported("batchjob.x", tree, False, known) == {"batchjob", "batchjob.settings", "batchjob.manifest",
                                                         "pipeline", "pipeline.row"}


def back_edges(edges: dict[str, set[str]]) -> list[str]:
    """Imports that point up or sideways between packages: ``a -> b`` where b's package is
    not in a lower layer than a's."""
    def layer(module: str) -> int:
        return LAYER[module.split(".")[0]]

    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                  if a.split(".")[0] != b.split(".")[0] and layer(b) >= layer(a))


def test_packages_point_one_way():
    """breakscene <- batchjob <- pipeline, robustness (never each other) <- commands <- benchmarks."""
    found = back_edges(graph())
    assert not found, "imports against the package order: " + "; ".join(found)


def test_the_order_check_finds_a_planted_back_edge():
    edges = graph()
    assert back_edges(edges) == []
    planted = {**edges, "batchjob.lease": edges["batchjob.lease"] | {"pipeline.run"},
               "robustness.grid": edges["robustness.grid"] | {"pipeline.config"},
               "breakscene.config": edges["breakscene.config"] | {"commands.main"}}
    assert back_edges(planted) == ["batchjob.lease -> pipeline.run", "breakscene.config -> commands.main",
                                   "robustness.grid -> pipeline.config"]


def test_no_import_circle():
    found = cycles(graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_job_config_imports_no_torch():
    """Validating a job file (the driver, `breakscene submit`) needs neither torch nor diffusers."""
    code = ("import sys, pipeline.config, commands.jobs; "
            "job = commands.jobs.load_job('jobs/extract.yaml', {'manifest': 's3://b/m.csv'}); "
            "job = pipeline.config.JobConfig(output='o', manifest={'uri': 'm', 'columns': {'image_uri': 'url'}}); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_package_face_exports_what_users_import_without_loading_torch_early():
    code = ("import sys, breakscene; assert 'torch' not in sys.modules, 'import breakscene loaded torch'; "
            "from breakscene import Extractor, ExtractConfig, ExtractionResult, TrainedScene, load_scene, "
            "load_scene_dir, load_bundle_pipeline; "
            "assert Extractor.__module__ == 'breakscene.extraction.extractor' and callable(load_bundle_pipeline); "
            "assert set(breakscene.__all__) >= {'Extractor', 'ExtractConfig', 'ExtractionResult', 'load_scene'}")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_architecture_names_every_module_and_only_modules_that_exist():
    """ARCHITECTURE.md stays true to the code: each path it names exists, and each module of
    the packages is named there (by its path, or by its file name in a row of its folder)."""
    import re

    text = (ROOT / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"\b((?:breakscene|batchjob|pipeline|robustness|commands|benchmarks)/[\w/]+\.py)\b", text))
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"ARCHITECTURE.md names modules that do not exist: {missing}"
    unnamed = []
    for pkg in ("breakscene", "batchjob", "pipeline", "commands"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.name == "__init__.py" and path.parent.name != "breakscene":
                continue
            rel = str(path.relative_to(ROOT))
            if rel not in text and f"`{path.name}`" not in text and f", {path.stem}.py" not in text:
                unnamed.append(rel)
    assert not unnamed, f"modules ARCHITECTURE.md does not mention: {unnamed}"
