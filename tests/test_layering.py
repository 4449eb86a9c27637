"""The import graph follows the flow: each package imports only the layers below it, and nothing forms a cycle.

Every import counts, including those under ``TYPE_CHECKING`` and inside functions: a type-only import
is still the lower module knowing the higher one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Import name -> folder (pyproject.toml's package-dir).
PACKAGES = {
    "vitcache": ROOT / "vitcache",
    "vitcache.server": ROOT / "server",
    "vitcache.client": ROOT / "client",
    "vitcache.integrations": ROOT / "integrations",
}
# The library, lowest first. A module may import modules of its own layer or lower ones only.
LIBRARY_LAYERS = (
    ("vitcache.errors", "vitcache.digest", "vitcache.inputs", "vitcache.config"),
    ("vitcache.wire",),
    ("vitcache.cache",),
    ("vitcache.outcomes", "vitcache.observer", "vitcache.stats"),
    ("vitcache.models",),
    ("vitcache.encode",),
    ("vitcache.engine", "vitcache.build", "vitcache"),
)
# What the client side may import: it runs inside inference servers, without the library's model code.
CLIENT_MAY_IMPORT = (
    "vitcache.client",
    "vitcache.v1",
    "vitcache.wire",
    "vitcache.digest",
    "vitcache.errors",
    "vitcache.inputs",
)
INTEGRATIONS_MAY_IMPORT = (*CLIENT_MAY_IMPORT, "vitcache.integrations")
# The load test's ideal-LRU curve replays requests through L1's own policy (no Redis, no model code).
ALSO_ALLOWED = {"vitcache.client.loadtest": ("vitcache.cache.l1",)}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder)
            if package == "vitcache" and relative.parts[0] in ("server", "client"):
                continue
            parts = relative.with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """The vitcache modules ``module`` imports (``from package import submodule`` names the submodule)."""
    names = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if submodule in MODULES else node.module)
    return {name for name in names if name == "vitcache" or name.startswith("vitcache.")}


GRAPH = {module: _imports(module) for module in MODULES}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _layer(module: str) -> int | None:
    """The library layer of ``module``, the most specific prefix winning (``vitcache`` itself is the top)."""
    best: tuple[int, int] | None = None
    for level, prefixes in enumerate(LIBRARY_LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (level, len(prefix))
    return None if best is None else best[0]


def _is_library(module: str) -> bool:
    return not _within(module, ("vitcache.server", "vitcache.client", "vitcache.integrations", "vitcache.v1"))


def test_every_library_module_has_a_layer():
    unplaced = [m for m in MODULES if _is_library(m) and _layer(m) is None]
    assert not unplaced, f"add these modules to LIBRARY_LAYERS: {unplaced}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _is_library(m)))
def test_library_imports_only_lower_layers(module):
    own = _layer(module)
    upward = sorted(
        imported
        for imported in GRAPH[module]
        if not _is_library(imported) or (imported in MODULES and (_layer(imported) or 0) > own)
    )
    assert not upward, f"{module} (layer {own}) imports {upward}"


@pytest.mark.parametrize(
    ("side", "allowed"),
    [("vitcache.client", CLIENT_MAY_IMPORT), ("vitcache.integrations", INTEGRATIONS_MAY_IMPORT)],
)
def test_client_side_imports_no_library_internals(side, allowed):
    wrong = {
        m: sorted(i for i in GRAPH[m] if not _within(i, (*allowed, *ALSO_ALLOWED.get(m, ()))))
        for m in MODULES
        if _within(m, (side,))
    }
    assert not {m: i for m, i in wrong.items() if i}


def test_no_import_cycles():
    """Depth-first search over the whole graph (library, server, client, integrations)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(GRAPH[module]):
            if imported not in MODULES or imported == module:
                continue
            if state.get(imported) == 1:
                cycle = [*path[path.index(imported) :], imported]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])


def test_the_graph_is_read():
    """The checks above see real edges (a parser that found nothing would pass them all)."""
    assert "vitcache.cache.entry" in GRAPH["vitcache.engine"]
    assert "vitcache.wire.tensor_codec" in GRAPH["vitcache.client.client"]


def test_the_public_api_resolves_and_loads_lazily():
    """Every name ``vitcache`` exports resolves; importing the client loads no model code (it runs in vLLM, SGLang)."""
    import vitcache

    assert all(getattr(vitcache, name) is not None for name in vitcache.__all__)
    probe = (
        "import sys, vitcache, vitcache.client; "
        "loaded = [m for m in ('transformers', 'vitcache.engine', 'vitcache.models', 'redis') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True)


def test_a_frontend_process_loads_neither_torch_nor_transformers():
    """--frontends processes only parse, check and serialize: the model code would cost each ~6 s and ~0.7 GB."""
    probe = (
        "import sys, vitcache.server.frontends.frontend; "
        "loaded = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
