"""The arrows between the packages run one way: ``server`` and ``client`` import
``common``, ``simulations`` imports all three, ``common`` imports neither side.

Every module under ``common/``, ``client/`` and ``server/`` is read as source (not
imported) and every ``import`` and ``from ... import`` in it is checked, those
inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "common": {"client", "server", "simulations"},
    "client": {"server", "simulations"},
    "server": {"client", "simulations"},
}
"""Package -> the top-level packages its modules may not import."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The modules ``node`` imports, relative imports resolved against ``module``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        return [node.module or ""]
    package = module.split(".")
    anchor = package[:len(package) - node.level + (1 if is_package else 0)]
    if node.module:
        return [".".join([*anchor, node.module])]
    return [".".join([*anchor, alias.name]) for alias in node.names]


def wrong_way_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """Each import in ``source`` (the text of ``module``) that its package may not make,
    as "``module`` imports ``target`` (line N)"."""
    forbidden = FORBIDDEN[module.split(".")[0]]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in _imported(node, module, is_package):
                if target.split(".")[0] in forbidden:
                    found.append(f"{module} imports {target} (line {node.lineno})")
    return found


def _sources() -> list[Path]:
    return sorted(path for package in FORBIDDEN for path in (ROOT / package).rglob("*.py"))


def test_every_package_is_walked() -> None:
    walked = {_module_name(path) for path in _sources()}
    assert {"common.atomic_files", "client.site_cli", "server.run_report"} <= walked


@pytest.mark.parametrize("path", _sources(), ids=_module_name)
def test_imports_run_one_way(path: Path) -> None:
    module = _module_name(path)
    wrong = wrong_way_imports(path.read_text(encoding="utf-8"), module,
                              path.name == "__init__.py")
    assert not wrong, "; ".join(wrong)


def test_the_walk_finds_imports_anywhere_in_a_module() -> None:
    source = (
        "import numpy\n"
        "from common.atomic_files import atomic_write\n"
        "def later():\n"
        "    import server.run_records\n"
        "    from simulations import runner\n"
        "class Site:\n"
        "    def method(self):\n"
        "        from server.run_report import write_report\n"
    )
    assert wrong_way_imports(source, "client.site_cli") == [
        "client.site_cli imports server.run_records (line 4)",
        "client.site_cli imports simulations (line 5)",
        "client.site_cli imports server.run_report (line 8)",
    ]
    assert wrong_way_imports("from client import site_cli\n", "common.records") == [
        "common.records imports client (line 1)"]
    assert wrong_way_imports("from ..client import x\n", "server.checks") == [
        "server.checks imports client (line 1)"]
    assert wrong_way_imports("from .. import simulations\n", "server.checks") == [
        "server.checks imports simulations (line 1)"]
    assert wrong_way_imports("from . import strategy\nimport common\n", "server.app") == []
