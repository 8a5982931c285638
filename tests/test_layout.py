"""The package's folders follow the pipeline and its imports flow one way: no module imports itself
back through others, and each stage imports only what comes before it. Read from the source (every
import, those inside functions too), so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stmae_edge"

# What each part may import, besides itself and the shared modules at the package's top level
# (errors, metadata, preprocessing, scoring, data, checkpoint, engine_plan, wire_format, ...). The
# wire format of served models is one of those, so that the runtime's Triton client and the serving
# side share it without the runtime importing serving.
ALLOWED = {
    "models": set(),
    "training": {"models"},
    "engines": {"models"},
    "runtime": set(),
    "serving": {"runtime"},
    "evaluation": {"runtime"},  # scores through the runtime, torch-cpu for a checkpoint: no training import
    "shared": {"models"},
}
ENTRY_POINTS = {"stmae_edge.cli", "stmae_edge.demo", "stmae_edge"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    # `if TYPE_CHECKING:` imports never run: they name types for checkers (runtime/__init__.py's exports)
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for statement in node.body for inner in ast.walk(statement)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules]
            candidates = submodules or [target]  # `from . import data` imports data, not the package
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def import_graph(parents: bool = False) -> dict[str, set[str]]:
    """Each module and the package's modules it imports; with `parents`, their parent packages too:
    importing a.b.c runs a/__init__.py and a/b/__init__.py first, so a cycle through an __init__ counts."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imports_of(path, set(files)) for name, path in files.items()}
    for name, targets in graph.items() if parents else ():
        for target in list(targets):
            parts = target.split(".")
            targets |= {".".join(parts[:k]) for k in range(1, len(parts))} - {name}
    return graph


def part_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()):
        return parts[1]
    return "shared"


def test_no_module_imports_itself_back():
    graph = import_graph(parents=True)
    assert len(graph) > 40 and sum(map(len, graph.values())) > 150  # the parse found the package
    # Tarjan's strongly connected components: any with more than one module is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_each_stage_imports_only_what_comes_before_it():
    graph = import_graph()
    wrong = []
    for module, targets in sorted(graph.items()):
        if module in ENTRY_POINTS:
            continue
        part = part_of(module)
        for target in sorted(targets):
            target_part = part_of(target)
            allowed = ALLOWED[part] | {part, "shared"}
            if target_part not in allowed and target.partition(".")[2] not in allowed:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong
    # The checks themselves can fail: these pairs are the directions that must stay forbidden.
    assert "runtime" not in ALLOWED["training"] | ALLOWED["engines"] | ALLOWED["shared"]
    assert not {"training", "engines", "evaluation", "serving"} & {p.partition(".")[0] for p in ALLOWED["runtime"]}


def test_every_error_class_is_defined_in_errors():
    """One place for the typed errors a user catches (README, "Errors"): a class deriving from an
    exception, defined anywhere else in the package, is named here."""
    from stmae_edge import errors

    error_names = {name for name, value in vars(errors).items() if isinstance(value, type)
                   and issubclass(value, BaseException)}
    elsewhere = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if bases & (error_names | {"Exception", "BaseException", "ValueError", "RuntimeError"}):
                    elsewhere.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert not elsewhere, elsewhere
    assert {"TensorRTMissingError", "RemoteError", "ModelFileMissingError"} <= error_names
