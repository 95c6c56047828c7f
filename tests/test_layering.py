"""The floors stay straight: imports go one way, model -> checkpoints -> embedding -> training ->
evaluation -> {bench, demo, serve} -> cli, and no library is reached through its private modules.

Oracle: Python's own parser (ast) over every module of the package, imports inside functions
included; a module may import its own package, or a floor below its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import diffemb_jax

PACKAGE = Path(diffemb_jax.__file__).parent
# Lowest first. A module's floor is its first dotted prefix found here.
FLOORS = (
    ("diffemb_jax.errors",),  # UserError and its kinds: every floor raises them
    ("diffemb_jax.atomic", "diffemb_jax.assets", "diffemb_jax.cache", "diffemb_jax.memory", "diffemb_jax.parallel",
     "diffemb_jax.batching"),
    ("diffemb_jax.model",),
    ("diffemb_jax.checkpoints",),
    ("diffemb_jax.embedding",),
    ("diffemb_jax.training",),
    ("diffemb_jax.evaluation",),
    ("diffemb_jax.bench", "diffemb_jax.demo", "diffemb_jax.reproduce", "diffemb_jax.serve"),
    ("diffemb_jax.cli",),
)


def _unit(module: str) -> tuple[int, str]:
    """(floor, the package or module that owns `module` on it)."""
    for floor, units in enumerate(FLOORS):
        for unit in units:
            if module == unit or module.startswith(unit + "."):
                return floor, unit
    raise AssertionError(f"{module} is on no floor of tests/test_layering.py: give it one")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, path.name == "__init__.py"


def _imports(name: str, path: Path, is_package: bool):
    """(line, imported module) of every import in the file, relative ones resolved."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield node.lineno, module
            for alias in node.names:  # `from diffemb_jax import bench` imports the module bench
                yield node.lineno, f"{module}.{alias.name}"


def test_every_module_has_a_floor():
    for name, _, _ in _modules():
        if name != "diffemb_jax":
            _unit(name)


def test_imports_go_one_way():
    back_edges = []
    for name, path, is_package in _modules():
        if name == "diffemb_jax":
            continue
        floor, unit = _unit(name)
        for line, module in _imports(name, path, is_package):
            if not module.startswith("diffemb_jax."):
                continue  # outside the project (or the package's root, which imports nothing)
            target_floor, target = _unit(module)
            if target != unit and target_floor >= floor:
                back_edges.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} (floor {floor}) imports "
                                  f"{module} (floor {target_floor})")
    assert not back_edges, "imports against the floors:\n" + "\n".join(back_edges)


def _imports_in_functions(path: Path):
    """(line, module) of the project's own imports made inside a function."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("diffemb_jax")):
                    yield inner.lineno, inner.module
                elif isinstance(inner, ast.Import):
                    yield from ((inner.lineno, a.name) for a in inner.names if a.name.startswith("diffemb_jax"))


# Where the project's own modules may be imported inside a function: the CLI, which imports a
# command's modules (and jax with them) only when that command runs, so `diffemb --help` is instant.
LAZY_IMPORTS_ALLOWED = ("diffemb_jax/cli.py",)


def test_the_project_imports_its_own_modules_at_the_top():
    """No import inside a function to dodge a cycle: with one-way floors there is none to dodge."""
    lazy = [f"{path.relative_to(PACKAGE.parent)}:{line}: {module}"
            for _, path, _ in _modules() if str(path.relative_to(PACKAGE.parent)) not in LAZY_IMPORTS_ALLOWED
            for line, module in _imports_in_functions(path)]
    assert not lazy, "the project's modules imported inside functions:\n" + "\n".join(lazy)


# The one private module used, and why: cuDNN's packed layout (a packed row's texts as offsets, no
# L x L mask) has no public entry in JAX (jax.nn.dot_product_attention takes no offsets). The kernel
# checks the entry's signature before it calls it and takes the mask where it differs (README: GPU).
PRIVATE_ALLOWED = {("diffemb_jax/model/attention.py", "jax._src.cudnn"),
                   ("diffemb_jax/model/attention.py", "jax._src.cudnn.fused_attention_stablehlo")}


def test_no_library_is_used_through_its_private_modules():
    private = []
    for name, path, is_package in _modules():
        for line, module in _imports(name, path, is_package):
            where = str(path.relative_to(PACKAGE.parent))
            if (not module.startswith("diffemb_jax") and (where, module) not in PRIVATE_ALLOWED
                    and any(part.startswith("_") and not part.startswith("__") for part in module.split("."))):
                private.append(f"{where}:{line}: {module}")
    assert not private, "private modules of libraries imported:\n" + "\n".join(private)


def test_the_checks_catch_a_back_edge(tmp_path):
    """The walk itself: a floor-0 module importing the CLI, inside a function, is found."""
    fake = tmp_path / "parallel.py"
    fake.write_text("def f():\n    from diffemb_jax.cli import main\n")
    found = [(line, module) for line, module in _imports("diffemb_jax.parallel", fake, False)]
    assert (2, "diffemb_jax.cli") in found
    assert _unit("diffemb_jax.cli")[0] > _unit("diffemb_jax.parallel")[0]
