"""Which package may import which: every import statement of the project, read with `ast`.

The services talk over ZeroMQ, not through each other's code: protocol is the wire and imports
no other package; frontend, tokenizer_svc and scheduler_svc never import the worker's code
(gpu_worker, kernels: torch and Triton); only the `pagoda` command ties them all together.
Imports inside functions count too: they run as surely as those at the top.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "frontend", "tokenizer_svc", "scheduler_svc", "gpu_worker", "kernels", "bench", "pagoda")
SERVICES = ("protocol", "frontend", "tokenizer_svc", "scheduler_svc")
WORKER_CODE = ("gpu_worker", "kernels")


class Import:
    """One imported module: `where` names the importing file and line for the failure messages."""

    def __init__(self, package: str, where: str, module: str) -> None:
        self.package, self.where, self.module = package, where, module
        self.target = module.split(".")[0]

    def __repr__(self) -> str:
        return f"{self.where} imports {self.module}"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[Import]:
    """Every import of another project package, from every module of `packages` under `root`."""
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = _module_name(path, root)
            # The package a relative import starts from: the module's own for an __init__.py.
            base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    prefix = base[: len(base) - node.level + 1] if node.level else []
                    modules = [".".join([*prefix, *([node.module] if node.module else [])])]
                else:
                    continue
                where = f"{path.relative_to(root)}:{node.lineno}"
                found += [Import(package, where, m) for m in modules if m.split(".")[0] in packages]
    return [i for i in found if i.target != i.package]


def cycles(imports: list[Import]) -> list[str]:
    """Each cycle among the packages, every step shown with one import that makes it."""
    witness = {(i.package, i.target): i for i in reversed(imports)}
    graph: dict[str, list[str]] = {}
    for package, target in witness:
        graph.setdefault(package, []).append(target)
    found = []

    def visit(path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], [])):
            if nxt == path[0]:
                steps = "; ".join(str(witness[a, b]) for a, b in zip(path, [*path[1:], nxt]))
                found.append(f"{' -> '.join([*path, nxt])} ({steps})")
            elif nxt not in path and nxt > path[0]:  # each cycle once: from its smallest package
                visit([*path, nxt])

    for package in sorted(graph):
        visit([package])
    return found


def worker_code_in_services(imports: list[Import]) -> list[str]:
    return [str(i) for i in imports if i.package in SERVICES and i.target in WORKER_CODE]


def pagoda_outside_pagoda(imports: list[Import]) -> list[str]:
    return [str(i) for i in imports if i.target == "pagoda" and i.package != "pagoda"]


def protocol_imports(imports: list[Import]) -> list[str]:
    return [str(i) for i in imports if i.package == "protocol"]


@functools.cache
def _project() -> list[Import]:
    return project_imports()


def _check(found: list[str], rule: str) -> None:
    assert not found, rule + ":\n  " + "\n  ".join(found)


def test_no_cycle_among_the_packages():
    _check(cycles(_project()), "packages import each other in a cycle")


def test_services_import_nothing_of_the_worker():
    # A module the services share with the worker lives in the service that owns the concept.
    _check(worker_code_in_services(_project()), "a service imports the worker's code (torch, Triton)")


def test_only_the_pagoda_command_imports_pagoda():
    _check(pagoda_outside_pagoda(_project()), "only the pagoda package may import pagoda")


def test_protocol_imports_no_other_project_package():
    _check(protocol_imports(_project()), "protocol, the wire, imports no other project package")


def test_the_checks_catch_planted_violations(tmp_path):
    """What keeps the checks above from passing on anything: each catches its violation here."""
    files = {
        "protocol/__init__.py": "from frontend import api\n",
        "frontend/__init__.py": "",
        "frontend/api.py": "import os\n\n\ndef f():\n    import gpu_worker.loader\n",
        "gpu_worker/__init__.py": "from .loader import load\n",
        "gpu_worker/loader.py": "from protocol.config import EngineConfig\n",
        "pagoda/__init__.py": "from . import cli\n",
        "pagoda/cli.py": "from frontend import api\n",
        "bench/__init__.py": "from pagoda.cli import main\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    imports = project_imports(tmp_path, ("protocol", "frontend", "gpu_worker", "bench", "pagoda"))
    assert sorted(map(str, imports)) == [
        "bench/__init__.py:1 imports pagoda.cli",
        "frontend/api.py:5 imports gpu_worker.loader",
        "gpu_worker/loader.py:1 imports protocol.config",
        "pagoda/cli.py:1 imports frontend",
        "protocol/__init__.py:1 imports frontend",
    ]
    assert cycles(imports) == [
        "frontend -> gpu_worker -> protocol -> frontend (frontend/api.py:5 imports gpu_worker.loader; "
        "gpu_worker/loader.py:1 imports protocol.config; protocol/__init__.py:1 imports frontend)"
    ]
    assert worker_code_in_services(imports) == ["frontend/api.py:5 imports gpu_worker.loader"]
    assert pagoda_outside_pagoda(imports) == ["bench/__init__.py:1 imports pagoda.cli"]
    assert protocol_imports(imports) == ["protocol/__init__.py:1 imports frontend"]
