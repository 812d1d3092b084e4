"""The package's structure (issue 32): kinds are named only inside atp/kinds/, and config.py is a leaf."""
import ast
from pathlib import Path

import atp
from atp.kinds import KINDS

PACKAGE = Path(atp.__file__).parent
# A string that equals a kind's name but names something else: "mlp" is also a decoder layer's MLP block (transformers'
# per_layer_config `skip` vocabulary, written into exported configs) and its submodule attribute, in the architecture
# table and in the self-contained modeling file that exports carry.
NOT_KINDS = {"arch.py": {"mlp"}, "hf_modeling.py": {"mlp"}}


def kind_names_in(source: str, allowed: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every string constant in `source` that is a kind's name (docstrings and f-string text
    are longer strings, so they do not count)."""
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in KINDS
            and node.value not in allowed]


def test_no_module_outside_kinds_names_a_kind():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "kinds":
            continue
        allowed = NOT_KINDS.get(str(relative), set())
        found += [f"{relative}:{line}: {name!r}" for line, name in kind_names_in(path.read_text(), allowed)]
    assert not found, "kind names outside atp/kinds/ (ask the kinds instead):\n" + "\n".join(found)


def test_the_kind_name_check_finds_names():
    assert kind_names_in('x = cfg.space\nif "hidden" in x or y["heads"]:\n    pass\n', set()) == [(2, "hidden"),
                                                                                               (2, "heads")]
    assert kind_names_in('f"{kept[\'qk-dims\']}"', set()) == [(1, "qk-dims")]
    assert kind_names_in('"""heads and mlp"""\nz = f"--space hidden"', set()) == []


def package_imports(source: str) -> set[str]:
    """The atp modules a module's source imports (relative or absolute, lazy ones included)."""
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            imported |= {alias.name for alias in node.names} if node.module is None else {node.module}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("atp"):
            imported.add(node.module.removeprefix("atp").removeprefix(".") or "atp")
        elif isinstance(node, ast.Import):
            imported |= {alias.name.removeprefix("atp.") for alias in node.names if alias.name.startswith("atp")}
    return imported


def test_config_imports_nothing_from_the_package_but_errors():
    assert package_imports((PACKAGE / "config.py").read_text()) <= {"errors"}


def test_the_import_check_finds_imports():
    source = "from .errors import E\nfrom . import kinds\ndef f():\n    from .schedule import S\nimport atp.data\n"
    assert package_imports(source) == {"errors", "kinds", "schedule", "data"}
