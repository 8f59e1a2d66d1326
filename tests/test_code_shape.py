"""Code stays easy to enter: no class over 200 lines and no function over 60 in our packages
(issue 13's limits), read from the source so a new long one fails here, named."""
import ast
import functools

import pytest
from test_imports import modules

sources = functools.cache(modules)  # parsed once for every test here

LIMITS = {ast.ClassDef: 200, ast.FunctionDef: 60, ast.AsyncFunctionDef: 60}


def too_long(tree: ast.Module) -> list[tuple[str, int, int]]:
    return [(node.name, node.lineno, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if type(node) in LIMITS and node.end_lineno - node.lineno + 1 > LIMITS[type(node)]]


def test_the_check_finds_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    assert too_long(ast.parse(f"def long():\n{body}\n")) == [("long", 1, 62)]
    assert too_long(ast.parse("def short():\n    return 1\n")) == []


@pytest.mark.parametrize("name", sorted(sources()))
def test_no_class_or_function_is_too_long(name):
    tree, _ = sources()[name]
    assert too_long(tree) == [], f"{name}: (name, line, length) over the limits {too_long(tree)}"
