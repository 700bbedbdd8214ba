"""Package layout (issue 15, item 5): the slice dataset is data, read by training and evaluation alike,
so it lives in ``unibrain_cli.data`` and training takes nothing from ``unibrain_cli.evaluation`` for it."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import unibrain_cli

PACKAGE = Path(unibrain_cli.__file__).parent
OLD, NEW = "unibrain_cli.evaluation.slices_data", "unibrain_cli.data.slices_data"


def imported_modules(source: str, package: str) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports, as absolute names; ``from A import b``
    gives both ``A`` and ``A.b`` (``b`` may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = parts[: len(parts) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def module_imports(path: Path) -> set[str]:
    """:func:`imported_modules` of a file of the package."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    return imported_modules(path.read_text(encoding="utf-8"), package)


def test_the_slice_dataset_is_data():
    assert importlib.util.find_spec(OLD) is None
    from unibrain_cli.data.slices_data import SliceDataset, load_index, read_slices_meta  # noqa: F401


def test_training_does_not_import_the_slice_dataset_from_evaluation():
    files = sorted((PACKAGE / "training").rglob("*.py"))
    assert files
    imports = {str(f.relative_to(PACKAGE.parent)): module_imports(f) for f in files}
    offenders = {f: sorted(m for m in found if m.startswith(OLD)) for f, found in imports.items()}
    assert not {f: m for f, m in offenders.items() if m}, offenders
    assert any(NEW in found for found in imports.values()), "training reads slices through " + NEW


def test_the_import_scan_sees_every_form():
    """Absolute, ``from package import module`` and relative imports (as from training/stages/)."""
    pkg = "unibrain_cli.training.stages"
    for source in (f"import {OLD}", f"from {OLD} import SliceDataset", "from unibrain_cli.evaluation import slices_data",
                   "from ...evaluation import slices_data", "from ...evaluation.slices_data import SliceDataset",
                   f"def f():\n    from {OLD} import SliceDataset\n"):
        assert OLD in imported_modules(source, pkg), source
    assert imported_modules("from ..trainer import run_stage", pkg) >= {"unibrain_cli.training.trainer"}
