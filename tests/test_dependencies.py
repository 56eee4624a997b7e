"""pyproject.toml and requirements/lock-cpu.txt agree: every declared dependency (and the extras `make` installs)
is pinned exactly, inside its declared range."""

from __future__ import annotations

import tomllib

from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / "lock-cpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"not an exact pin: {line!r}"
            assert canonicalize_name(name) not in pins, f"pinned twice: {name}"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_every_declared_dependency_is_pinned_inside_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = [Requirement(r) for r in project["dependencies"] + extras["dev"] + extras["qlora"]]
    pins = _lock()
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        if name == "torch":  # installed first, by the Makefile's TORCH_SPEC
            continue
        assert name in pins, f"{requirement.name} is declared but not in the lock file"
        assert pins[name] in requirement.specifier, f"lock pins {name}=={pins[name]}, outside {requirement}"


def test_datasets_is_not_a_dependency_and_no_module_imports_it():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(Requirement(r).name == "datasets" for r in project["dependencies"])
    sources = (REPO / "src" / "lorafit").rglob("*.py")
    assert not [p for p in sources if "import datasets" in (text := p.read_text()) or "from datasets" in text]
