"""The package's layers (mm_rec/__init__.py): no module imports from a layer above its own, the
task modules do not import their package's __init__, and imports inside functions are there for
import time only (never to dodge an import loop)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mm_rec"

# Lowest first; a module may import from its own layer and the ones before it.
LAYERS = [
    ["mm_rec.constants", "mm_rec.config"],
    ["mm_rec.ops", "mm_rec.jax", "mm_rec.cuda"],  # mm_rec.jax: JAX ops, optional (below); mm_rec.cuda: C++ kernels
    ["mm_rec.core"],
    ["mm_rec.blocks"],
    # the package root re-exports the model API, and installs the integrations' registration hook
    ["mm_rec.decoding", "mm_rec.quantization", "mm_rec.model", "mm_rec", "mm_rec.integrations.hook"],
    ["mm_rec.baselines"],
    ["mm_rec.data", "mm_rec.utils", "mm_rec.distributed"],
    ["mm_rec.loading", "mm_rec.generation"],
    ["mm_rec.training"],
    ["mm_rec.evaluation"],
    ["mm_rec.integrations"],  # transformers and lm_eval (optional)
    ["mm_rec.cli", "mm_rec.__main__"],
]
# Imported inside functions because they are slow to import (FSDP, DCP) or optional (Triton).
LAZY_IMPORTS_ALLOWED = ("mm_rec.distributed", "mm_rec.ops")
# The one upward import: `import mm_rec` installs the hook, which imports an integration (which
# registers itself) only once its library (transformers, lm_eval) has been imported. Inside a function only.
DEFERRED_REGISTRATION = {"mm_rec.integrations.hook": ("mm_rec.integrations.hf", "mm_rec.integrations.lm_eval")}


def layer_of(module: str) -> int:
    """Index of the layer whose longest prefix names `module` (the root "mm_rec" only as itself)."""
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "mm_rec" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST, module: str) -> list[tuple[str, int, bool]]:
    """(imported mm_rec module, line, inside a function) for every import of the package; for
    `from X import name`, name counts when it is a submodule."""
    package_dir = PACKAGE.parent
    found = []
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    in_function = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package holding this module
                parts = module.split(".")
                is_package = (package_dir / module.replace(".", "/")).is_dir()
                parent = parts[:len(parts) - node.level + is_package]
                base = ".".join(parent + ([base] if base else []))
            names = [base]
            for alias in node.names:
                submodule = package_dir / f"{base}.{alias.name}".replace(".", "/")
                if submodule.with_suffix(".py").is_file() or submodule.is_dir():
                    names.append(f"{base}.{alias.name}")
        else:
            continue
        for name in names:
            if name == "mm_rec" or name.startswith("mm_rec."):
                found.append((name, node.lineno, id(node) in in_function))
    return found


def violations(source: str, module: str) -> list[str]:
    tree = ast.parse(source)
    problems = []
    own = layer_of(module)
    for name, line, lazy in imports(tree, module):
        if lazy and name in DEFERRED_REGISTRATION.get(module, ()):
            continue
        if layer_of(name) > own:
            problems.append(f"{module}:{line} imports {name}, a higher layer")
        if lazy and not name.startswith(LAZY_IMPORTS_ALLOWED):
            problems.append(f"{module}:{line} imports {name} inside a function")
    return problems


def package_modules() -> dict[str, str]:
    return {module_name(path): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_imports_a_higher_layer():
    problems = [p for module, source in package_modules().items() for p in violations(source, module)]
    assert not problems, "\n".join(problems)


def test_evaluation_never_imports_the_cli_and_tasks_not_their_package():
    modules = package_modules()
    for module, source in modules.items():
        names = {name for name, _, _ in imports(ast.parse(source), module)}
        if module.startswith("mm_rec.evaluation"):
            assert not any(n == "mm_rec.cli" or n.startswith("mm_rec.cli.") for n in names), module
        if module in ("mm_rec.evaluation.mqar", "mm_rec.evaluation.passkey"):
            assert "mm_rec.evaluation" not in names, module


def test_the_jax_package_is_optional_and_standalone():
    """mm_rec imports without JAX: nothing outside mm_rec.jax imports it. And mm_rec.jax needs
    neither torch nor the rest of the package (only the parent package's __init__ runs)."""
    for module, source in package_modules().items():
        tree = ast.parse(source)
        names = {name for name, _, _ in imports(tree, module)}
        top_level = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names}
        top_level |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                      if isinstance(node, ast.ImportFrom) and not node.level}
        if module == "mm_rec.jax" or module.startswith("mm_rec.jax."):
            assert all(n == "mm_rec.jax" or n.startswith("mm_rec.jax.") for n in names), (module, names)
            assert "torch" not in top_level, module
        else:
            assert not any(n == "mm_rec.jax" or n.startswith("mm_rec.jax.") for n in names), module
            assert "jax" not in top_level, module


def test_the_checker_finds_what_it_forbids():
    assert violations("from mm_rec.training.trainer import train\n", "mm_rec.model") == [
        "mm_rec.model:1 imports mm_rec.training.trainer, a higher layer"]
    assert violations("from mm_rec.cli import main\n", "mm_rec.evaluation.mqar")
    assert violations("def f():\n    from mm_rec.evaluation import scoring\n", "mm_rec.cli.tasks") == [
        "mm_rec.cli.tasks:2 imports mm_rec.evaluation inside a function",
        "mm_rec.cli.tasks:2 imports mm_rec.evaluation.scoring inside a function"]
    assert violations("def f():\n    from mm_rec.distributed import barrier\n", "mm_rec.training.trainer") == []
    assert violations("from . import scoring\n", "mm_rec.evaluation.mqar") == []
    hook = "mm_rec.integrations.hook"
    assert violations("def f():\n    import mm_rec.integrations.hf\n", hook) == []
    assert violations("import mm_rec.integrations.hf\n", hook) == [f"{hook}:1 imports mm_rec.integrations.hf, "
                                                                     "a higher layer"]
    assert violations("def f():\n    from mm_rec.loading import load_model\n", hook)
    assert violations("from ..cli import main\n", "mm_rec.evaluation.mqar")
