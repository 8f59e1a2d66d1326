"""The import graph of our packages has no circle, and reading a job file stays light.

Imports are read from the source (AST), those inside functions included: a lazy import
hides a circle from Python, not from the reader.
"""
import ast
import subprocess
import sys

from conftest import ROOT

PACKAGES = [p for p in ("breakscene", "pipeline", "robustness", "benchmarks") if (ROOT / p).is_dir()]


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
    assert "pipeline.config" in edges["pipeline.jobfile"]  # from .config import JobConfig
    assert "robustness.grid" in edges["pipeline.jobfile"]  # inside load_job
    assert "breakscene.masks" in edges["pipeline.stages"]  # from breakscene import masks as M


def test_no_import_circle():
    found = cycles(graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_job_config_imports_no_torch():
    """Validating a job file (the driver, `breakscene submit`) needs neither torch nor diffusers."""
    code = ("import sys, pipeline.config, pipeline.jobfile; "
            "job = pipeline.jobfile.load_job('jobs/extract.yaml', {'manifest': 's3://b/m.csv'}); "
            "job = pipeline.config.JobConfig(output='o', manifest={'uri': 'm', 'columns': {'image_uri': 'url'}}); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_package_face_exports_what_users_import_without_loading_torch_early():
    code = ("import sys, breakscene; assert 'torch' not in sys.modules, 'import breakscene loaded torch'; "
            "from breakscene import Extractor, ExtractConfig, ExtractionResult, TrainedScene, load_scene, "
            "load_scene_dir, load_bundle_pipeline; "
            "assert Extractor.__module__ == 'breakscene.extractor' and callable(load_bundle_pipeline); "
            "assert set(breakscene.__all__) >= {'Extractor', 'ExtractConfig', 'ExtractionResult', 'load_scene'}")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
