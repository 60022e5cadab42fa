"""The type stubs match the compiled module: the same public names, and the same methods and
attributes on each class."""

import ast
import pathlib

import prpm_playground
from prpm_playground import _native

STUB = pathlib.Path(prpm_playground.__file__).with_name("_native.pyi")
ALIASES = {"Money", "Time"}


def stub_names():
    tree = ast.parse(STUB.read_text())
    classes, functions = {}, set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
            classes[node.name] = members
        elif isinstance(node, ast.FunctionDef):
            functions.add(node.name)
    return classes, functions


def test_stubs_match_the_module():
    classes, functions = stub_names()
    public = {n for n in dir(_native) if not n.startswith("_")}
    assert public == set(classes) | functions, "public names"
    for name, members in classes.items():
        cls = getattr(_native, name)
        if issubclass(cls, BaseException):
            continue  # attributes are set per instance
        actual = {m for m in dir(cls) if not m.startswith("_") or m in {"__arrow_c_stream__", "__arrow_c_schema__", "__enter__", "__exit__", "__len__", "__bool__", "__init__"}}
        stubbed = {m for m in members if not m.startswith("__") or m in actual}
        assert stubbed - {"__init__"} == actual - {"__init__"}, name
    assert STUB.with_name("py.typed").exists()
    assert set(prpm_playground.__all__) - {"open"} <= public
