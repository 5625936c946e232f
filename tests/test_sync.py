"""Method = diff: each method script is grpo.py plus marked method blocks (SPEC.md).

Deleting the marked blocks (and the module docstring) from a method script must
leave grpo.py exactly, so `diff grpo.py ecvgpo.py` *is* the method and a fix in
grpo.py cannot be forgotten in a copy.
"""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHODS = {"ecvgpo.py": "ECVGPO", "vicra.py": "VICRA", "vepo.py": "VEPO"}


def strip_docstring(src):
    doc = ast.get_docstring(ast.parse(src), clean=False)
    if doc is None:
        return src
    node = ast.parse(src).body[0]
    lines = src.splitlines(keepends=True)
    return "".join(lines[node.end_lineno:])


def strip_blocks(src, name):
    """Remove every `# --- NAME ---...` .. `# --- end NAME ---...` block, markers included."""
    out, inside = [], False
    for n, line in enumerate(src.splitlines(keepends=True), 1):
        s = line.strip()
        if re.match(rf"# --- {name} -+$", s):
            assert not inside, f"nested {name} block at line {n}"
            inside = True
        elif re.match(rf"# --- end {name} -+$", s):
            assert inside, f"'end {name}' without a start at line {n}"
            inside = False
        elif not inside:
            out.append(line)
    assert not inside, f"unterminated {name} block"
    return "".join(out)


@pytest.mark.parametrize("script,name", sorted(METHODS.items()))
def test_method_minus_blocks_equals_grpo(script, name):
    path = ROOT / script
    if not path.exists():
        pytest.fail(f"{script} is missing")
    method = strip_blocks(strip_docstring(path.read_text()), name)
    base = strip_docstring((ROOT / "grpo.py").read_text())
    assert method == base, f"{script} minus its {name} blocks differs from grpo.py"
    assert f"# --- {name} " in path.read_text(), f"{script} has no {name} block"


def test_strip_blocks_catches_drift():
    base = "a = 1\nb = 2\n"
    method = "a = 1\n# --- X ----\nc = 3\n# --- end X ----\nb = 2\n"
    assert strip_blocks(method, "X") == base
    assert strip_blocks(method.replace("b = 2", "b = 3"), "X") != base
