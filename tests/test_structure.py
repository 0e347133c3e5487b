"""The package's structure: no import circle (module level or between subpackages, counting imports inside
functions, which lazy imports would otherwise hide), no private name imported across modules, and importing the
package changes nothing in the process environment."""

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peft_alps"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """``(imported peft_alps module, [names], line)`` of every import in ``path``, at any depth."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target == "peft_alps" or target.startswith("peft_alps."):
                for alias in node.names:  # `from . import gmt` imports a module
                    sub = f"{target}.{alias.name}"
                    is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").is_file() \
                        or (PACKAGE.parent / sub.replace(".", "/")).is_dir()
                    yield (sub, [], node.lineno) if is_module else (target, [alias.name], node.lineno)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("peft_alps"):
                    yield alias.name, [], node.lineno


def graph():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {m: set() for m in modules}
    for m, path in modules.items():
        for target, _, _ in imports(path):
            if target in modules and target != m:
                edges[m].add(target)
    return edges


def cycle(edges):
    """One cycle of the directed graph ``edges`` as a list of nodes, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_between_modules():
    assert cycle(graph()) is None


def test_no_import_circle_between_subpackages():
    """heads <- io <- tuner <- deploy, scoring <- heads, io; the top-level modules (cli, demo, ...) use them."""
    packages = {}
    for m, targets in graph().items():
        src = ".".join(m.split(".")[:2])
        packages.setdefault(src, set()).update(".".join(t.split(".")[:2]) for t in targets)
    for src in packages:
        packages[src].discard(src)
    subpackages = {p for p in packages if (PACKAGE.parent / p.replace(".", "/")).is_dir()}
    found = cycle({p: packages[p] & subpackages for p in subpackages})
    assert found is None, found


def test_no_private_name_is_imported_across_modules():
    private = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}.{name}"
               for path in PACKAGE.rglob("*.py") for target, names, line in imports(path)
               for name in names if name.startswith("_") and not name.startswith("__")]
    private += [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
                for path in PACKAGE.rglob("*.py") for target, _, line in imports(path)
                if any(part.startswith("_") and not part.startswith("__") for part in target.split("."))]
    assert private == []


def test_importing_every_module_leaves_the_environment_alone():
    names = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")
    code = ("import json, os; before = dict(os.environ); import importlib; "
            f"[importlib.import_module(m) for m in {names!r}]; "
            "print(json.dumps({k: v for k, v in os.environ.items() if before.get(k) != v}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {}
