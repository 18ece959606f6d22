"""The project's modules import each other downward only: no cycles, and the engine rooms never
import gradio or matplotlib. Imports are read from the source with ``ast`` (top-level ones and
those inside functions alike), so no module has to be imported to be checked."""

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# every module of the engine: nothing here may import the page's libraries
ENGINE = ("autoencoder_concat_predictor_world_model", "run_controller", "model_pool", "run_history", "checkpoints",
          "frame_metrics", "atomic_files", "private_files", "validation", "world_model_analysis", "run_export", "session_explorer_lib",
          "config", "toroidal_dot_robot", "toroidal_action_selectors", "recording_robot", "record_session",
          "models", "models.autoencoder_concat_predictor", "models.masked_autoencoder_vit", "models.cuda_graphs",
          "tensorboard_log")
UI_LIBRARIES = ("gradio", "matplotlib")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every project module (the root's .py files and the models package)."""
    found = {p.stem: p for p in REPO.glob("*.py")}
    for p in (REPO / "models").glob("*.py"):
        found["models" if p.stem == "__init__" else f"models.{p.stem}"] = p
    return found


def imported_names(path: Path) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` anywhere in the file names (for
    ``from package import name`` also ``package.name``, which may be a submodule)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {m for m in imported_names(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_project_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert "autoencoder_concat_predictor_world_model" in graph and "run_controller" in graph
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_engine_modules_name_no_ui_library_anywhere():
    modules = project_modules()
    for name in ENGINE:
        assert name in modules, f"{name} is listed as an engine module but does not exist"
        bad = {m for m in imported_names(modules[name]) if m.split(".")[0] in UI_LIBRARIES}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_importing_the_engine_loads_no_ui_library():
    code = f"import sys, {', '.join(ENGINE)}; sys.exit(bool({set(UI_LIBRARIES)!r} & set(sys.modules)))"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)


def test_the_engine_rooms_stay_under_a_thousand_lines():
    for name, path in project_modules().items():
        if name in ENGINE:
            assert len(path.read_text().splitlines()) < 1000, f"{path.name} has grown past 1,000 lines"


def test_importing_the_modules_reads_no_setting_from_the_environment():
    """Settings come from ``config.from_env()`` in a program's ``main()``, never from an import."""
    code = """
import os, sys
read = []

class Watched(dict):
    def __getitem__(self, key):
        read.append(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        read.append(key)
        return super().get(key, default)

    def __contains__(self, key):
        read.append(key)
        return super().__contains__(key)

os.environ = Watched(os.environ)
import config, server_guard, concat_world_model_explorer_gradio, train_world_model
import %s
sys.exit(str(sorted({k for k in read if k.startswith("CWM_")})) if any(k.startswith("CWM_") for k in read) else 0)
""" % ", ".join(ENGINE)
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)


def documented_imports() -> dict[str, set[str]]:
    """The "who imports whom" table of docs/ARCHITECTURE.md: module -> the project modules it names."""
    table = {}
    for line in (REPO / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`") and cells[0].count("`") == 2:
            table[cells[0].strip("`")] = set(re.findall(r"`([\w.]+)`", cells[1]))
    return table


def test_the_documented_import_table_is_the_code():
    """docs/ARCHITECTURE.md lists every module with exactly the project modules it imports."""
    assert documented_imports() == import_graph()
