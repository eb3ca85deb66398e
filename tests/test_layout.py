"""The package's shape: every module described in docs/ARCHITECTURE.md, and no import cycle (imports under
TYPE_CHECKING count too)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "latent_diffusion"
ARCHITECTURE = Path(__file__).parents[1] / "docs" / "ARCHITECTURE.md"


def modules() -> dict[str, Path]:
    return {path.relative_to(PACKAGE).with_suffix("").as_posix(): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_is_in_the_architecture_page():
    """Each module by its path in the package (`models/unet.py`); a wing's __init__ holds only its docstring."""
    page = ARCHITECTURE.read_text()
    described = [f"{name}.py" for name in modules() if not name.endswith("/__init__")]
    missing = [path for path in described if f"`{path}`" not in page]
    assert not missing, f"docs/ARCHITECTURE.md does not describe {missing}"


def imports(name: str, path: Path) -> set[str]:
    """The package's modules that `name` imports, relative imports resolved, wherever they stand in the file."""
    package = name.split("/")[:-1]  # the folder it is in (a package's __init__ too)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = "/".join([*package[: len(package) - node.level + 1], *(node.module or "").split(".")]).strip("/")
            # `from ..sampling import noise_schedule` imports the package and, where it names one, its module
            found |= {base or "__init__", f"{base}/__init__", *(f"{base}/{a.name}".strip("/") for a in node.names)}
    return found


def test_no_import_cycle():
    known = modules()
    graph = {name: {t for t in imports(name, path) if t in known and t != name} for name, path in known.items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in graph[name]:
            assert state.get(target) != "open", f"import cycle: {' -> '.join([*path, target])}"
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
