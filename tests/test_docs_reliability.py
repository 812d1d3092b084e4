"""Every test that docs/reliability.md names in its tables exists in the file it names: `test_x.py::test_name`, or
a bare `test_name` in the file its section names ("Tests: `tests/test_x.py`"). A `[case]` after a test (or alone,
for the test before it) must be one of its parameter ids. Reads source text only (no torch). Run this file with
python to list the problems."""
import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
DOC = TESTS.parent / "docs" / "reliability.md"
NAME = re.compile(r"^(?:(?P<file>test_\w+\.py)::)?(?P<test>test_\w+)?(?:\[(?P<case>[^\]]+)\])?$")
SECTION_FILE = re.compile(r"Tests: `tests/(test_\w+\.py)`")


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def named_tests(doc: str):
    """(section, file or None, test, case or None) for each test named in a table row's last column."""
    section, default = "", None
    for line in doc.splitlines():
        if line.startswith("## "):
            section, default = line[3:].strip(), None
        elif SECTION_FILE.search(line) and not line.startswith("|"):
            default = SECTION_FILE.search(line).group(1)
        elif line.startswith("|") and not set(line) <= set("|- "):
            last, test = line.strip().strip("|").split("|")[-1], None
            for token in re.findall(r"`([^`]+)`", last):
                match = NAME.match(token)
                if not match or not (match["test"] or match["case"]):
                    continue
                if match["test"]:
                    file, test = match["file"] or default, match["test"]
                yield section, file, test, match["case"]


def problems(doc_path: Path = DOC, tests_dir: Path = TESTS) -> list[str]:
    found, cache = [], {}
    for section, file, test, case in named_tests(doc_path.read_text()):
        where = f"docs/reliability.md, {section!r}: {test or ''}{f'[{case}]' if case else ''}"
        if test is None:
            found.append(f"{where}: a [case] with no test before it")
        elif file is None:
            found.append(f"{where}: names no file, and its section has no 'Tests: `tests/test_x.py`' line")
        elif not (tests_dir / file).exists():
            found.append(f"{where}: {file} does not exist")
        else:
            if file not in cache:
                cache[file] = defined_tests(tests_dir / file), (tests_dir / file).read_text()
            functions, text = cache[file]
            if test not in functions:
                found.append(f"{where}: no {test} in {file}")
            elif case and f'"{case}"' not in text:
                found.append(f"{where}: no case {case!r} in {file}")
    return found


def test_every_test_the_reliability_doc_names_exists():
    assert list(named_tests(DOC.read_text())), "no test names found in docs/reliability.md's tables"
    assert problems() == []


def test_the_check_finds_a_wrong_file_a_missing_test_and_a_missing_case(tmp_path):
    (tmp_path / "test_a.py").write_text('import pytest\n\n@pytest.mark.parametrize("kind", ["one"])\n'
                                        'def test_here(kind):\n    pass\n')
    doc = tmp_path / "reliability.md"
    doc.write_text("## A\n\nTests: `tests/test_a.py`.\n\n| input | test |\n|---|---|\n"
                   "| x | `test_here[one]`, `[two]`, `test_gone` |\n| y | `test_b.py::test_here` |\n\n"
                   "## B\n\n| input | test |\n|---|---|\n| z | `test_here` |\n")
    assert problems(doc, tmp_path) == [
        "docs/reliability.md, 'A': test_here[two]: no case 'two' in test_a.py",
        "docs/reliability.md, 'A': test_gone: no test_gone in test_a.py",
        "docs/reliability.md, 'A': test_here: test_b.py does not exist",
        "docs/reliability.md, 'B': test_here: names no file, and its section has no 'Tests: `tests/test_x.py`' line",
    ]


if __name__ == "__main__":
    print("\n".join(problems()) or "docs/reliability.md: every named test exists")
