"""The import direction is flows -> tasks -> fusion_core, never back; fusion_core needs no Prefect or MLflow."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "fusion_core": {"prefect", "mlflow", "tasks", "flows"},
    "tasks": {"flows"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    bad = {}
    for path in sorted((REPO / package).rglob("*.py")):
        found = _imports(path) & FORBIDDEN[package]
        if found:
            bad[str(path.relative_to(REPO))] = sorted(found)
    assert not bad, f"imports against the layering: {bad}"
