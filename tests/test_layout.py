"""The project's layout rules, asserted: imports go one way (models <- tasks <- rewards, eval <-
common <- harness <- scripts <- experiment drivers) and no script imports another script."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("common.py", "harness.py", "tasks.py")
SCRIPTS = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and f not in LIBRARY}
# what each layer may import of ours (itself included)
ALLOWED = {
    "models": {"models"},
    "tasks": {"models", "tasks"},
    "rewards": {"models", "tasks", "rewards"},
    "eval": {"models", "tasks", "rewards", "eval"},
    "common": {"models", "tasks", "rewards", "eval", "common"},
    "harness": {"models", "tasks", "rewards", "eval", "common", "harness"},
    "script": {"models", "tasks", "rewards", "eval", "common", "harness"},
    "experiments": {"models", "tasks", "rewards", "eval", "common", "harness", "experiments"}
    | SCRIPTS,
}
OURS = {"models", "tasks", "rewards", "eval", "common", "harness", "experiments"} | SCRIPTS


def layer_of(rel):
    top = rel.split(os.sep)[0]
    name = top[:-3] if top.endswith(".py") else top
    return "script" if name in SCRIPTS else name


def imports_of(path):
    """Top-level names of every import in the file, function-level ones included; relative imports
    count as the file's own package."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield None
            elif node.module:
                yield node.module.split(".")[0]


def project_files():
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [
            x
            for x in dirs
            if not x.startswith(".") and x not in ("tests", "runs", "docs", "__pycache__")
        ]
        for f in files:
            if f.endswith(".py"):
                yield os.path.relpath(os.path.join(d, f), ROOT)


def test_imports_go_one_way():
    bad = []
    files = list(project_files())
    assert {
        "graft.py",
        "pgraft.py",
        "pretrain.py",
        "inverse_noise.py",
        "common.py",
        "harness.py",
        "tasks.py",
    } <= set(files)
    for rel in files:
        layer = layer_of(rel)
        assert layer in ALLOWED, f"{rel}: no layer rule for it"
        for name in imports_of(os.path.join(ROOT, rel)):
            if name is not None and name in OURS and name not in ALLOWED[layer]:
                bad.append(f"{rel} imports {name}")
    assert not bad, bad


def test_the_checker_catches_a_wrong_import(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("def f():\n    import graft\nfrom common import fail\n")
    assert sorted(imports_of(str(p))) == ["common", "graft"]
    assert "graft" not in ALLOWED["script"] and "common" not in ALLOWED["rewards"]


def code_names(path):
    """The functions, classes, methods (Class.method) and module-level names of a file."""
    tree = ast.parse(open(path).read(), path)
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{m.name}" for m in node.body
                          if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_docs_point_at_code_that_exists():
    """Every `file.py:name` the README, tests/README.md and docs/ cite is a function, class,
    method or module-level name of that file (a renamed function leaves no stale pointer)."""
    import re

    texts = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "tests", "README.md")]
    texts += [os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
              if f.endswith(".md")]
    stale, seen = [], 0
    for text in texts:
        for f, name in re.findall(r"`([\w/]+\.py):([A-Za-z_][\w.]*)", open(text).read()):
            seen += 1
            path = os.path.join(ROOT, f)
            if not os.path.isfile(path) or name not in code_names(path):
                stale.append(f"{os.path.relpath(text, ROOT)}: {f}:{name}")
    assert seen >= 10 and not stale, stale
