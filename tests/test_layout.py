"""The dependency direction of the two packages, read from every module's imports.

    basics (errors, fileio, config, logging_setup, run_lease)  import nothing else of the project
    data_pipelines.*                                 import data_pipelines.* and the basics
    pretrain.*                                       import pretrain.* and data_pipelines.loaders, and
                                                     data_pipelines.scrub.canaries (the memorization
                                                     audit reads the canary registry and draws its
                                                     reference secrets from the same spaces)

Inside data_pipelines, one stage a subpackage, and each stage imports only what it needs:

    scrub        (raw corpus -> shards)      scrub.* only
    tokenizer    (BPE on scrubbed text)      loading.sources, scrub.filters.pii_types
    loading      (the training loaders)      loading.*, tokenizer, scrub.manifest, scrub.readers,
                                             scrub.filters.pii_types
    loaders      (the facade pretrain uses)  loading.*, tokenizer, scrub.manifest
    evaluation   (PII sets and scoring)      evaluation.*, scrub.filters.*
    bench, __main__                          anything in data_pipelines

Also: no import cycle between modules (imports inside functions count: a cycle hidden in a
function is still a cycle), no private name imported from another module, and an import of a
project module inside a function only in a ``__main__`` (commands load lazily so a config error is
reported before torch loads) or with a ``# lazy: <reason>`` comment on its line.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "data_pipelines")
BASICS = {"pretrain.errors", "pretrain.fileio", "pretrain.config", "pretrain.logging_setup", "pretrain.run_lease"}
LOADER_ENTRY = "data_pipelines.loaders"
# What pretrain may import from data_pipelines, and why: the training loader (and tokenizer) entry,
# and the canary registry reader, which the audit needs to know what was planted (one light module).
PRETRAIN_MAY_IMPORT = (LOADER_ENTRY, "data_pipelines.scrub.canaries")
# Within data_pipelines: stage -> module prefixes it may import (its own stage always allowed).
STAGES = {
    "data_pipelines.scrub": (),
    "data_pipelines.tokenizer": ("data_pipelines.loading.sources", "data_pipelines.scrub.filters.pii_types"),
    "data_pipelines.loading": ("data_pipelines.tokenizer", "data_pipelines.scrub.manifest",
                               "data_pipelines.scrub.readers", "data_pipelines.scrub.filters.pii_types"),
    "data_pipelines.loaders": ("data_pipelines.loading", "data_pipelines.tokenizer", "data_pipelines.scrub.manifest"),
    "data_pipelines.evaluation": ("data_pipelines.scrub.filters",),
    "data_pipelines.bench": ("data_pipelines",),
    "data_pipelines.__main__": ("data_pipelines",),
}


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    target: str  # imported module (a submodule when `from pkg import submodule`)
    names: tuple[str, ...]  # names taken from the target (empty for `import x`)
    line: int
    in_function: bool
    lazy_reason: bool  # a `# lazy:` comment on the line


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    src = path.read_text()
    lines = src.splitlines()
    tree = ast.parse(src)
    func_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    func_lines.add(sub.lineno)
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = []
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in modules:  # `from pkg import submodule`
                    targets.append((sub, ()))
                else:
                    targets.append((mod, (a.name,)))
        else:
            continue
        comment = lines[node.lineno - 1]
        for target, names in targets:
            if _is_project(target):
                out.append(Import(name, target, names, node.lineno, node.lineno in func_lines, "# lazy:" in comment))
    return out


def _all_imports() -> list[Import]:
    modules = _modules()
    return [imp for name, path in modules.items() for imp in _imports(name, path, modules)]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _stage(name: str) -> str:
    return ".".join(name.split(".")[:2])


def _allowed(importer: str, target: str) -> bool:
    if importer in BASICS:
        return target in BASICS
    if importer.startswith("data_pipelines"):
        if target in BASICS:
            return True
        if not target.startswith("data_pipelines"):
            return False
        stage = _stage(importer)
        if stage not in STAGES:  # a new stage must say what it may import
            return False
        return _within(target, stage) or any(_within(target, p) for p in STAGES[stage])
    if target.startswith("data_pipelines"):
        return target in PRETRAIN_MAY_IMPORT
    return True


def test_dependencies_run_one_way():
    wrong = sorted({f"{i.importer}:{i.line} imports {i.target}" for i in _all_imports() if not _allowed(i.importer, i.target)})
    assert not wrong, "imports against the dependency direction (see the module docstring):\n" + "\n".join(wrong)


def test_no_private_names_imported_across_modules():
    wrong = sorted({f"{i.importer}:{i.line} imports {n} from {i.target}" for i in _all_imports()
                    for n in i.names if n.startswith("_") and not n.startswith("__") and i.target != i.importer})
    assert not wrong, "private names imported across modules:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for i in _all_imports():
        if i.target != i.importer:
            graph.setdefault(i.importer, set()).add(i.target)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_function_level_project_imports_say_why():
    wrong = sorted({f"{i.importer}:{i.line} imports {i.target} inside a function" for i in _all_imports()
                    if i.in_function and not i.lazy_reason and not i.importer.endswith("__main__")})
    assert not wrong, ("move these imports to the top of the module, or say why they must stay lazy "
                       "with a '# lazy: <reason>' comment on the line:\n" + "\n".join(wrong))


@pytest.mark.parametrize("importer,target,ok", [
    ("pretrain.config", "pretrain.errors", True),
    ("pretrain.config", "data_pipelines.scrub.filters.pii_types", False),
    ("pretrain.fileio", "pretrain.model", False),
    ("data_pipelines.scrub.runner", "pretrain.fileio", True),
    ("data_pipelines.loading.stream", "pretrain.model", False),
    ("pretrain.trainer", "data_pipelines.loaders", True),
    ("pretrain.trainer", "data_pipelines.loading.stream", False),
    ("pretrain.audit", "data_pipelines.scrub.canaries", True),
    ("pretrain.audit", "data_pipelines.scrub.planting", False),
    ("pretrain.audit", "data_pipelines.scrub.runner", False),
    ("data_pipelines.scrub.runner", "data_pipelines.loading.sources", False),
    ("data_pipelines.scrub.runner", "data_pipelines.scrub.filters.pii", True),
    ("data_pipelines.loading.stream", "data_pipelines.scrub.manifest", True),
    ("data_pipelines.loading.stream", "data_pipelines.scrub.filters.pii", False),
    ("data_pipelines.loading.stream", "data_pipelines.evaluation.pii_eval", False),
    ("data_pipelines.evaluation.pii_eval", "data_pipelines.scrub.filters.pii", True),
    ("data_pipelines.evaluation.pii_eval", "data_pipelines.loading.stream", False),
    ("data_pipelines.loaders", "data_pipelines.loading.stream", True),
    ("data_pipelines.bench.scrub", "data_pipelines.scrub.runner", True),
    ("data_pipelines.newstage.x", "data_pipelines.scrub.runner", False),
])
def test_direction_rule_itself(importer, target, ok):
    assert _allowed(importer, target) is ok


def test_import_reader_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pretrain"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pretrain.b import _x\n    from .c import y  # lazy: heavy\n")
    mods = {"pretrain": pkg / "__init__.py", "pretrain.a": pkg / "a.py"}
    got = _imports("pretrain.a", pkg / "a.py", mods)
    assert [(i.target, i.names, i.in_function, i.lazy_reason) for i in got] == [
        ("pretrain.b", ("_x",), True, False), ("pretrain.c", ("y",), True, True)]
