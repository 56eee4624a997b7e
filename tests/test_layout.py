"""The package layout is a rule, not a habit: imports point down the stages of a run, with no cycle.

Layers (a module may import its own package and any lower layer, never a higher one):
    errors, hashing, run_folder, run_lock, config  <  data  <  model  <  evaluate  <  artifact  <  export  <  training  <  cli
Function-level (lazy) imports count too: a lazy import upwards is still a dependency upwards.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lorafit"
LAYERS = [
    {"errors", "hashing", "processes", "run_folder", "run_lock", "config"},
    {"data"},
    {"model"},
    {"evaluate"},
    {"artifact"},
    {"export"},
    {"training"},
    {"cli", "__init__", "__main__"},
]
MAX_LINES = 400


def _layer(unit: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if unit in names)


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """Top-level lorafit units imported anywhere in ``path`` (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "lorafit":
                if len(parts) > 1:
                    found.add(parts[1])
                else:  # from lorafit import x
                    found.update(alias.name for alias in node.names if (PACKAGE / alias.name).exists()
                                 or (PACKAGE / f"{alias.name}.py").exists())
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "lorafit" and len(parts) > 1:
                    found.add(parts[1])
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    unit = _unit(path)
    upward = sorted(u for u in _imports(path) - {unit} if _layer(u) > _layer(unit))
    assert not upward, f"{path.relative_to(PACKAGE)} ({unit}, layer {_layer(unit)}) imports higher layers: {upward}"


def test_every_unit_has_a_layer_and_every_package_says_what_it_owns():
    units = {_unit(p) for p in MODULES}
    unknown = sorted(u for u in units if not any(u in layer for layer in LAYERS))
    assert not unknown, f"add these to LAYERS (and docs/design.md): {unknown}"
    for package in (p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8")))
        assert doc and ("may use" in doc.lower() or "bottom layer" in doc.lower()), \
            f"{package.name}/__init__.py must open with what it owns and which packages it may use"


def test_no_module_is_over_the_size_limit():
    too_long = {str(p.relative_to(PACKAGE)): n for p in MODULES
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not too_long, f"split these modules (limit {MAX_LINES} lines): {too_long}"


def test_hashlib_is_used_in_one_module_only():
    users = sorted(str(p.relative_to(PACKAGE)) for p in MODULES if "hashlib" in p.read_text(encoding="utf-8"))
    assert users == ["hashing.py"], f"every sha256 goes through lorafit.hashing; also found in {users}"


MAX_FUNCTION_LINES = 80


def test_long_functions_say_why():
    """A function over 80 lines needs a comment right above it saying why it is one function."""
    unexplained = []
    for path in MODULES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and not lines[first - 2].strip().startswith("#"):
                    unexplained.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not unexplained, f"split these, or say above each why it is one function: {unexplained}"


def test_no_import_cycle_between_modules():
    """Module-level imports between lorafit modules form no cycle (inside a package too)."""
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorafit") and node.level == 0:
                deps |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        graph[name] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1  # on the current path
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path[path.index(dep):] + [dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2  # done, no cycle through it

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_design_doc_layout_matches_the_tree():
    """docs/design.md's layout tree names every module, in its package, and nothing that is not there."""
    text = (PACKAGE.parents[1] / "docs" / "design.md").read_text(encoding="utf-8")
    layout = text.split("## Layout", 1)[1].split("## The flow", 1)[0]
    tree = next(block for block in layout.split("```")[1::2] if block.lstrip().startswith("src/lorafit/"))
    documented, package = set(), ""
    for line in tree.strip("\n").splitlines()[1:]:
        indent, name = len(line) - len(line.lstrip()), (line.split() or [""])[0]
        if indent == 2 and name.endswith("/"):
            package = name if name != "resources/" else None
        elif indent == 2 and name.endswith(".py"):
            package = ""
            documented.add(name)
        elif indent == 4 and name.endswith(".py") and package:
            documented.add(package + name)
        elif indent == 0:
            break  # examples/, tests/: outside the package
    actual = {str(p.relative_to(PACKAGE)) for p in MODULES}
    actual -= {p for p in actual if p.endswith("/__init__.py") and p not in documented}  # package docstrings say enough
    assert documented == actual, f"missing from docs/design.md: {sorted(actual - documented)}; " \
                                 f"documented but absent: {sorted(documented - actual)}"


# Private attributes of other libraries lorafit reads, each with its reason; anything else private it reads must
# be lorafit's own. (transformers' Trainer internals lorafit once overrode are gone: training/loop.py.)
FOREIGN_PRIVATE = {
    "_attn_implementation": "transformers config property; no public getter (model/attention.py: attention_of)",
    "_reset_state": "accelerate keeps one state per process; no public reset (training/strategy.py)",
}


def _own_names() -> set[str]:
    names = set()
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def test_no_module_subclasses_transformers_trainer_or_touches_its_private_api():
    """The training step is lorafit's own loop (training/loop.py): nothing subclasses or imports transformers'
    Trainer, TrainingArguments or TrainerCallback, and the only private attributes of other libraries lorafit reads
    are the few named in FOREIGN_PRIVATE, so any transformers 5.x minor can be installed beside lorafit."""
    forbidden = {"Trainer", "TrainingArguments", "TrainerCallback", "TrainerState", "TrainerControl", "Seq2SeqTrainer"}
    own = _own_names()
    found = []
    for path in MODULES:
        where = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
                names = {alias.name for alias in node.names}
                if names & forbidden or "trainer" in node.module.split("."):
                    found.append(f"{where}:{node.lineno} from {node.module} import {sorted(names)}")
                found += [f"{where}:{node.lineno} imports private {n}" for n in names if n.startswith("_")]
            elif isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if bases & forbidden:
                    found.append(f"{where}:{node.lineno} class {node.name}({sorted(bases & forbidden)})")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if node.attr not in own and node.attr not in FOREIGN_PRIVATE:
                    found.append(f"{where}:{node.lineno} reads another library's private .{node.attr}")
    assert not found, "lorafit must not depend on transformers' Trainer or other private APIs: " + "; ".join(found)
