"""The package's modules import one way: no import cycle in src/atp, counting every import, also those inside
functions and under TYPE_CHECKING (a lazy import only hides a cycle from the interpreter, not from the reader)."""
import ast
from pathlib import Path

import atp

PACKAGE = Path(atp.__file__).parent

# cycles (strongly connected components) that still exist in this branch
ALLOWED: set[frozenset] = set()  # cycles tolerated for now: none


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, names relative to the package ("" is atp/__init__.py)."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = [part for part in package if part]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                elif node.module and (node.module == "atp" or node.module.startswith("atp.")):
                    base = []
                else:
                    continue
                module = (node.module or "").split(".") if node.level else node.module.split(".")[1:]
                target = ".".join([*base, *[part for part in module if part]])
                # `from . import x` imports the module x; `from .m import f` imports m
                submodules = [f"{target}.{alias.name}".lstrip(".") for alias in node.names]
                targets = [m if m in files else target for m in submodules]
            elif isinstance(node, ast.Import):
                targets = [alias.name.removeprefix("atp.") for alias in node.names if alias.name.startswith("atp.")]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], set(), 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.add(frozenset(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_graph_sees_lazy_and_type_checking_imports():
    graph = import_graph()
    assert "models" in graph["bench"]  # only inside run_bench_command
    assert "modelfiles" in graph["export"] and "export" in graph["models"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


def test_no_import_cycles():
    found = cycles(import_graph())
    new = sorted(sorted(c) for c in found - ALLOWED)
    assert not new, f"import cycles: {new}; move the shared piece to the lower module or a new one"
    gone = sorted(sorted(c) for c in ALLOWED - found)
    assert not gone, f"these allowed cycles no longer exist; remove them from ALLOWED: {gone}"
