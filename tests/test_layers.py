"""The layers import one way: federated <- attacks/defenses <- eval <- cli, with common/ below all of
them and reports/ reading results files only. Checked on the source (every import statement, also
those inside functions), so a late import cannot hide a cycle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What each layer must never import (fedleak.X prefixes).
FORBIDDEN = {
    "common": ("attacks", "defenses", "eval", "federated", "reports", "cli"),
    "federated": ("attacks", "defenses", "eval", "reports", "cli"),
    "attacks": ("eval", "reports", "cli"),
    "defenses": ("attacks", "eval", "reports", "cli"),
    "eval": ("reports", "cli"),
    "reports": ("attacks", "defenses", "eval", "federated", "cli"),
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]  # `from fedleak import cli`
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no sources under {layer}/"
    bad = [f"{path.relative_to(ROOT)} imports {name}" for path in files for name in _imports(path)
           if any(name == f"fedleak.{up}" or name.startswith(f"fedleak.{up}.") for up in FORBIDDEN[layer])]
    assert not bad, bad


def test_no_eval_or_reports_file_is_over_about_400_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for folder in ("eval", "reports") for p in sorted((ROOT / folder).glob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420]
    assert not long, long
