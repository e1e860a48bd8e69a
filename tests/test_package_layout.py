"""The package's imports point one way: commands -> areas -> core, with no circles.

Every ``import`` of a package module is read with ``ast``, function-level and ``TYPE_CHECKING``
ones included (and the names a lazy package ``__init__`` maps in ``_EXPORTS``):

* nothing imports a command (``megatron_cla.cli``, ``megatron_cla.__main__``);
* the core (the modules at the package root) imports nothing from the area folders;
* no module imports itself through a chain of imports, and the areas (folders) depend on each other
  without circles either;
* the README's package-layout table lists exactly the package's folders.

The checker is first run on small made-up packages with one violation each, so these tests fail
when the rule is broken.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Optional

import pytest

import megatron_cla

pytestmark = pytest.mark.version_independent

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(megatron_cla.__file__).parent
SPEC_ENTRY_POINTS = {"megatron_cla.pretrain_gpt_spec", "megatron_cla.pretrain_hybrid_spec"}
"""Root modules that are not core: the names Megatron-LM's ``--spec`` takes (they build hybrid
specs too)."""


def _module_name(package: str, package_dir: Path, path: Path) -> str:
    parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")[: len(module.split(".")) - (0 if is_package else 1)]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _lazy_exports(tree: ast.Module) -> set[str]:
    """Modules a lazy ``__init__`` imports on first use (``_EXPORTS = {name: module}``)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets
        ):
            assert isinstance(node.value, ast.Dict)
            return {v.value for v in node.value.values if isinstance(v, ast.Constant)}
    return set()


def import_graph(package: str, package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in the file)."""
    paths = {_module_name(package, package_dir, p): p for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = _lazy_exports(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, path.name == "__init__.py")
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in paths else base)
        graph[module] = {t for t in targets if t in paths and t != module}
    return graph


def area_of(module: str, package_dir: Path) -> str:
    """``commands``, ``core``, ``spec entry points`` or the area folder a module belongs to."""
    parts = module.split(".")
    if parts[1:2] in (["cli"], ["__main__"]):
        return "commands"
    if module in SPEC_ENTRY_POINTS:
        return "spec entry points"
    if len(parts) == 1 or (package_dir / f"{parts[1]}.py").is_file():
        return "core"
    return parts[1]


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import circle (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def area_graph(graph: dict[str, set[str]], package_dir: Path) -> dict[str, set[str]]:
    """Area -> the other areas its modules import."""
    areas: dict[str, set[str]] = {}
    for module, targets in graph.items():
        src = area_of(module, package_dir)
        areas.setdefault(src, set()).update(area_of(t, package_dir) for t in targets)
        areas[src].discard(src)
    return areas


def violations(package: str, package_dir: Path) -> list[str]:
    """Every broken rule of the package, one line each."""
    graph = import_graph(package, package_dir)
    found = []
    for module, targets in sorted(graph.items()):
        area = area_of(module, package_dir)
        for target in sorted(targets):
            if area != "commands" and area_of(target, package_dir) == "commands":
                found.append(f"{module} imports the command module {target}")
            elif area == "core" and area_of(target, package_dir) != "core":
                found.append(f"core module {module} imports {target} from an area folder")
    cycle = find_cycle(graph)
    if cycle:
        found.append("import circle: " + " -> ".join(cycle))
    area_cycle = find_cycle(area_graph(graph, package_dir))
    if area_cycle:
        found.append("areas import each other in a circle: " + " -> ".join(area_cycle))
    return found


def _made_up_package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package ``madeup`` of ``files`` (relative path -> text; ``PKG`` is its name)."""
    root = tmp_path / "madeup"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text.replace("PKG", "madeup"))
    return root


@pytest.mark.parametrize(
    "files,expected",
    [
        (
            {"core.py": "def f():\n    from PKG.training import run\n", "training/run.py": ""},
            "core module madeup.core imports madeup.training.run from an area folder",
        ),
        (
            {
                "training/__init__.py": "",
                "training/loop.py": "from PKG.cli.common import x\n",
                "cli/common.py": "",
            },
            "madeup.training.loop imports the command module madeup.cli.common",
        ),
        (
            {"a.py": "import PKG.b\n", "b.py": "def g():\n    from PKG import a\n"},
            "import circle: madeup.a -> madeup.b -> madeup.a",
        ),
        (
            {
                "data/x.py": "from PKG.training import y\n",
                "training/y.py": "",
                "training/z.py": "def h():\n    import PKG.data.w\n",
                "data/w.py": "",
            },
            "areas import each other in a circle: data -> training -> data",
        ),
        (
            {"__init__.py": "_EXPORTS = {'Thing': 'PKG.serving.thing'}\n", "serving/thing.py": ""},
            "core module madeup imports madeup.serving.thing from an area folder",
        ),
    ],
    ids=["core imports area", "area imports command", "circle", "area circle", "lazy export"],
)
def test_the_checker_finds_each_kind_of_violation(tmp_path, files, expected):
    package_dir = _made_up_package(tmp_path, files)
    assert expected in violations("madeup", package_dir)


def test_imports_point_from_commands_to_areas_to_core():
    assert violations("megatron_cla", PACKAGE_DIR) == []


def test_every_command_module_is_reachable_and_nothing_else_lives_in_cli():
    from megatron_cla.cli.common import COMMANDS

    modules = {p.stem for p in (PACKAGE_DIR / "cli").glob("*.py")}
    assert modules == {c.module for c in COMMANDS} | {"__init__", "common", "main"}


def _readme_layout_folders() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Package layout", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `megatron_cla/(\w+)/`", section, flags=re.MULTILINE))


def test_readme_layout_table_lists_the_package_folders():
    folders = {p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py")}
    assert _readme_layout_folders() == folders
