"""The type stubs of the native module (kvdex/_native.pyi) name everything it exports, and
nothing it does not: a new native method without a stub fails here."""

import ast
import inspect
from pathlib import Path

import kvdex._native as native

STUB = Path(__file__).resolve().parents[1] / "kvdex" / "_native.pyi"
OPTIONAL = {"LocalSession", "InProcessServer"}  # only in builds with the `inproc` feature


def stub_names():
    tree = ast.parse(STUB.read_text())
    top, members = set(), {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            top.add(node.name)
            members[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
        elif isinstance(node, ast.FunctionDef):
            top.add(node.name)
    return top, members


def public(obj):
    return {n for n in dir(obj) if not n.startswith("_")}


def test_every_native_name_has_a_stub_and_every_stub_a_native_name():
    top, members = stub_names()
    exported = {n for n in public(native) if inspect.isclass(getattr(native, n))
                or callable(getattr(native, n))}
    assert exported - top == set(), "native names without a stub"
    assert top - exported - OPTIONAL == set(), "stubs of names the module does not export"
    for name in exported & top:
        obj = getattr(native, name)
        if inspect.isclass(obj):
            assert public(obj) - members[name] == set(), f"{name}: members without a stub"
            assert members[name] - {"__init__"} - public(obj) == set(), f"{name}: stubs of no member"
