"""The import graph of src/captioning, components/ and pipeline.py: no circles, and every arrow points down the
layers the README's "Layout" section declares."""

import ast
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("pipeline", "components")  # outside the captioning package; every other name is captioning.NAME


def declared_layers(readme: Path = REPO / "README.md") -> list[tuple[str, list[str]]]:
    """The README's layer table, top to bottom: (layer, [module or package, ...])."""
    text = readme.read_text()
    section = text[text.index("\n## Layout"):]
    section = section[:section.find("\n## ", 1)]
    layers = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) >= 2 and cells[0] and not set(cells[0]) <= set("-: ") and cells[0] != "layer":
            names = [name.strip("` /").removesuffix(".py") for name in cells[1].split(",")]
            layers.append((cells[0], [_full_name(name) for name in names if name]))
    assert layers, f"{readme}: no layer table (| layer | modules |) in its Layout section"
    return layers


def _full_name(name: str) -> str:
    """``cli`` is captioning.cli; ``__init__`` the package's own module; pipeline and components are top-level."""
    return "captioning" if name == "__init__" else name if name.split(".")[0] in TOP_LEVEL else f"captioning.{name}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO / "src" if path.is_relative_to(REPO / "src") else REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ast_imports(path: Path) -> list[tuple[str, int]]:
    """The project modules a file imports (at any depth: a function's lazy import counts), with line numbers."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found += [(name, node.lineno) for name in names if name.split(".")[0] in ("captioning", *TOP_LEVEL)]
    return found


def import_graph() -> grimp.ImportGraph:
    """grimp's graph of the two packages, with pipeline.py (a single-file module, which grimp cannot walk)
    added from its syntax tree, and the packages' imports of it, which grimp leaves out as external."""
    graph = grimp.build_graph("captioning", "components", include_external_packages=False)
    graph.add_module("pipeline")
    for name, line in _ast_imports(REPO / "pipeline.py"):
        graph.add_import(importer="pipeline", imported=_existing(graph, name), line_number=line, line_contents="")
    for path in [*(REPO / "src" / "captioning").rglob("*.py"), *(REPO / "components").rglob("*.py")]:
        for name, line in _ast_imports(path):
            if name == "pipeline":
                graph.add_import(importer=_module_name(path), imported="pipeline", line_number=line,
                                 line_contents="")
    return graph


def _existing(graph: grimp.ImportGraph, name: str) -> str:
    """``from captioning.x import y`` names a module or something inside one: the module."""
    while name not in graph.modules:
        name = name.rpartition(".")[0]
    return name


def _where(graph, importer: str, imported: str) -> str:
    lines = sorted(d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported))
    return f"{importer} -> {imported} (line {', '.join(map(str, lines)) or '?'})"


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan's, iteratively)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
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
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def layer_of(module: str, layers) -> int | None:
    """The index of the layer that declares the module or its nearest package (deploy.command before deploy)."""
    best = None
    for number, (_, names) in enumerate(layers):
        for name in names:
            inside = module.startswith(name + ".") and name != "captioning"  # the package's __init__: itself only
            if (module == name or inside) and (best is None or len(name) > len(best[1])):
                best = (number, name)
    return best[0] if best else None


def upward_imports(graph: grimp.ImportGraph, layers) -> list[str]:
    found = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            below, above = layer_of(importer, layers), layer_of(imported, layers)
            if below is not None and above is not None and above < below:
                found.append(f"{_where(graph, importer, imported)}: layer '{layers[below][0]}' imports from "
                             f"'{layers[above][0]}' above it")
    return found


def test_the_graph_covers_pipeline_py_and_the_lazy_imports():
    graph = import_graph()
    assert "captioning.workflow" in graph.find_modules_directly_imported_by("pipeline")
    assert "pipeline" in graph.find_modules_directly_imported_by("captioning.runners.kfp_local")
    # an import inside a function counts: cli imports the in-process runner only when `run` runs
    assert graph.direct_import_exists(importer="captioning.cli", imported="captioning.runners.inprocess")


def test_no_module_imports_itself_round_a_circle():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(
        " ; ".join(_where(graph, a, b) for a in circle for b in circle if graph.direct_import_exists(
            importer=a, imported=b)) for circle in found)


def test_every_module_has_a_layer_in_the_readme():
    layers = declared_layers()
    graph = import_graph()
    missing = sorted(m for m in graph.modules if layer_of(m, layers) is None)
    assert not missing, f"README.md, Layout: no layer declares {', '.join(missing)}"
    unknown = [name for _, names in layers for name in names if name not in graph.modules]
    assert not unknown, f"README.md, Layout: {', '.join(unknown)} is no module or package"


def test_every_import_points_down_the_readme_layers():
    found = upward_imports(import_graph(), declared_layers())
    assert not found, "imports that point up the README's layers:\n" + "\n".join(found)


def test_the_checks_catch_a_circle_and_an_upward_arrow():
    """The checker itself, on a made-up graph: were it blind, the tests above would pass whatever the code did."""
    graph = grimp.ImportGraph()
    for name in ("captioning.cli", "captioning.steps.promote", "captioning.workflow", "captioning.io"):
        graph.add_module(name)
    graph.add_import(importer="captioning.workflow", imported="captioning.steps.promote", line_number=3,
                     line_contents="")
    graph.add_import(importer="captioning.steps.promote", imported="captioning.workflow", line_number=7,
                     line_contents="")
    graph.add_import(importer="captioning.io", imported="captioning.cli", line_number=9, line_contents="")
    assert cycles(graph) == [["captioning.steps.promote", "captioning.workflow"]]
    layers = [("interface", ["captioning.cli"]), ("workflow", ["captioning.workflow"]),
              ("steps", ["captioning.steps"]), ("foundation", ["captioning.io"])]
    assert upward_imports(graph, layers) == [
        "captioning.io -> captioning.cli (line 9): layer 'foundation' imports from 'interface' above it",
        "captioning.steps.promote -> captioning.workflow (line 7): layer 'steps' imports from 'workflow' above it"]


@pytest.mark.parametrize("row, expected", [
    ("| commands | `bench`, `deploy.command`, `runners/` |",
     ("commands", ["captioning.bench", "captioning.deploy.command", "captioning.runners"])),
    ("| kfp | `pipeline.py`, `components/` |", ("kfp", ["pipeline", "components"])),
])
def test_the_layer_table_is_read_as_written(tmp_path, row, expected):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Layout\n\n| layer | modules |\n|---|---|\n{row}\n\n## Next\n| a | b |\n")
    assert declared_layers(readme) == [expected]
