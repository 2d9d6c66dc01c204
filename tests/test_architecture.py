"""The map of docs/design.md, checked: which part may import which, and room sizes.

Imports are read from the source with `ast` (every `import` and `from ... import`,
also those inside functions and under `TYPE_CHECKING`, relative ones resolved), so
a lazy import cannot slip an arrow past the rules. Each failure names the file,
the line and the import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MAX_MODULE_LINES = 600
"""A module longer than this in bridge/ or actor_sdk/ is two rooms (#17)."""

IO_LIBRARIES = frozenset({"asyncio", "aiomqtt", "grpc", "sqlite3", "socket"})
"""What the pure schedule core never imports, directly or through a module of ours."""


@dataclass(frozen=True)
class Import:
    """One imported module name, where it is imported."""

    module: str
    path: Path
    line: int
    package_of_from: bool = False
    """The `a` of `from a import b`: a package whose names are imported."""

    def __str__(self) -> str:
        where = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{where}:{self.line} imports {self.module}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files(*parts: str) -> list[Path]:
    files = [
        path
        for part in parts
        if (REPO / part).exists()
        for path in sorted((REPO / part).rglob("*.py"))
        if "__pycache__" not in path.parts
    ]
    assert files or not any((REPO / part).exists() for part in parts), parts
    return files


def imports_of(path: Path, name: str | None = None) -> Iterator[Import]:
    """Every module a file imports (`from a import b` yields `a` and `a.b`).

    `name` is the file's module name (None: from its place in the repository).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = (name or module_name(path)).split(".")
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                stem = ".".join([*base, *([node.module] if node.module else [])])
            else:
                stem = node.module or ""
            yield Import(stem, path, node.lineno, package_of_from=True)
            for alias in node.names:
                yield Import(f"{stem}.{alias.name}", path, node.lineno)


def top(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


def offending(files: list[Path], forbidden: set[str]) -> list[str]:
    """The imports in `files` of a package in `forbidden` (by top-level name)."""
    return sorted(
        {str(i) for path in files for i in imports_of(path) if top(i.module) in forbidden}
    )


def test_actor_sdk_never_imports_the_bridge() -> None:
    assert offending(python_files("actor_sdk"), {"bridge"}) == []


def test_the_wire_contract_imports_nothing_else_of_ours() -> None:
    files = python_files("actor_sdk/wire")
    assert files, "actor_sdk/wire/ is gone: update this test and docs/design.md"
    ours = [
        str(i)
        for path in files
        for i in imports_of(path)
        if top(i.module) in {"actor_sdk", "bridge"} and not i.module.startswith("actor_sdk.wire")
    ]

    assert ours == []


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for path in python_files("bridge", "actor_sdk")}


def modules_imported(name: str, modules: dict[str, Path]) -> Iterator[tuple[str, Import]]:
    """The modules of ours that module `name` imports, each with its import."""
    for imported in imports_of(modules[name]):
        if imported.package_of_from:
            # `from actor_sdk import wire` is followed to actor_sdk.wire, not to what
            # actor_sdk/__init__.py re-exports (the SDK's shell): the rules are about
            # the code a module uses.
            continue
        # `from a import b`: `a.b` when it is a module, else the module `a`.
        target = imported.module
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            yield target, imported


def reachable_from(start: set[str], modules: dict[str, Path]) -> dict[str, list[str]]:
    """Every module of ours reachable by imports from `start`, with the chain that gets there."""
    chains: dict[str, list[str]] = {name: [name] for name in start}
    pending = sorted(start)
    while pending:
        name = pending.pop()
        for target, _ in modules_imported(name, modules):
            if target not in chains:
                chains[target] = [*chains[name], target]
                pending.append(target)
    return chains


PURE_CORES = [
    "bridge.schedule",
    "bridge.core",
    "bridge.publish_queue",
    "bridge.status",
    "bridge.requests",
    "bridge.watch_state",
    "actor_sdk.wire",
    "actor_sdk._planner",
    "actor_sdk._view",
    "actor_sdk._resync",
    "actor_sdk._bridge_clock",
    "bridge.api_clock",
]
"""The sans-I/O cores of docs/design.md (a package stands for its modules)."""


@pytest.mark.parametrize("core", PURE_CORES)
def test_a_pure_core_imports_no_io_library_even_indirectly(core: str) -> None:
    modules = project_modules()
    start = {name for name in modules if name == core or name.startswith(f"{core}.")}
    assert start, f"{core} is gone: update this test and docs/design.md"

    found = []
    for name, chain in reachable_from(start, modules).items():
        for imported in imports_of(modules[name]):
            if top(imported.module) in IO_LIBRARIES:
                found.append(f"{imported} (via {' -> '.join(chain)})")

    assert sorted(set(found)) == []


TOOLS = frozenset(
    {
        "bridge.audit_command",
        "bridge.demo",
        "bridge.demo_broker",
        "bridge.demo_samples",
        "bridge.embedded_broker",
        "bridge.health",
        "bridge.request_command",
        "bridge.watch",
        "bridge.watch_app",
        "bridge.watch_state",
        "bridge.watch_text",
        "bridge.watch_view",
        "bridge.web",
    }
)
"""The subcommands other than `run` and `api`, and their parts."""

ENTRY = frozenset({"bridge", "bridge.cli"})


def room(name: str) -> str:
    if name in ENTRY:
        return "entry"
    if name in TOOLS:
        return "tool"
    if name == "bridge.api" or name.startswith("bridge.api."):
        return "api"
    return "daemon" if top(name) == "bridge" else "sdk"


def arrows(modules: dict[str, Path]) -> Iterator[tuple[str, str, Import]]:
    """(importer, imported module of ours, the import) for every import between our modules."""
    for name in modules:
        for target, imported in modules_imported(name, modules):
            yield name, target, imported


def test_the_daemon_never_imports_a_tool_or_the_api_server() -> None:
    """`dispatch-bridge run` loads the daemon alone (cli.py imports subcommands by name)."""
    modules = project_modules()
    wrong = [
        str(i)
        for source, target, i in arrows(modules)
        if room(source) == "daemon" and room(target) in {"tool", "api"}
    ]

    assert wrong == []


def test_the_api_server_imports_only_the_schedule_config_and_contract() -> None:
    modules = project_modules()
    # bridge.convert: the contract's Dispatch from the client library's (as the daemon).
    allowed = {"bridge", "bridge.config", "bridge.convert", "actor_sdk.wire"}
    wrong = [
        str(i)
        for source, target, i in arrows(modules)
        if room(source) == "api"
        and room(target) != "api"
        and target not in allowed
        and not target.startswith("bridge.schedule")
    ]

    assert wrong == []


def test_tests_never_import_bench() -> None:
    assert offending(python_files("tests"), {"bench"}) == []


def test_bench_never_imports_tests() -> None:
    """What tests and benchmarks both need lives in one package both import (testkit/)."""
    assert offending(python_files("bench"), {"tests"}) == []


def test_testkit_imports_neither_tests_nor_bench() -> None:
    files = python_files("testkit")
    assert files, "testkit/ is gone: update this test and docs/design.md"

    assert offending(files, {"tests", "bench"}) == []


@pytest.mark.parametrize("part", ["bridge", "actor_sdk"])
def test_no_module_is_over_600_lines(part: str) -> None:
    long = {
        str(path.relative_to(REPO)): lines
        for path in python_files(part)
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }

    assert long == {}, f"split these along their seams: {long}"


def test_the_reader_finds_lazy_and_relative_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from . import wire\n"
        "from ._view import BridgeView\n"
        "def f() -> None:\n"
        "    import bridge.schedule\n"
    )

    found = {i.module for i in imports_of(probe, "actor_sdk._probe")}

    assert found == {
        "actor_sdk",
        "actor_sdk.wire",
        "actor_sdk._view",
        "actor_sdk._view.BridgeView",
        "bridge.schedule",
    }
