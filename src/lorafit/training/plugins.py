"""Load an objective or callback class (``package.module:ClassName``) or a reward function (``package.module:function``).

Importing a module runs its code with the user's rights, so where the module may come from is checked
*before* anything is imported: the top-level package is located with ``importlib.util.find_spec`` (which
imports nothing for a top-level name) and its files must lie in an installed-packages folder (site-packages),
in lorafit itself, or in the config file's folder (searched first, so a ``losses.py`` next to the config works
without installing it). Anything else found on ``sys.path`` (the working directory, PYTHONPATH entries) is
refused unless ``plugins.allow_external_code`` is true.
"""

from __future__ import annotations

import importlib
import importlib.util
import site
import sys
import sysconfig
from contextlib import contextmanager
from pathlib import Path

from lorafit.config.objective import is_dotted_path
from lorafit.errors import LorafitError


def _installed_roots() -> list[Path]:
    roots = {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib", "platstdlib")}
    roots.update(getattr(site, "getsitepackages", lambda: [])())
    roots.add(site.getusersitepackages())
    roots.add(str(Path(__file__).resolve().parents[1]))  # lorafit's own package (built-in plugins)
    return [Path(r).resolve() for r in roots if r]


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


@contextmanager
def _searching_first(folder: Path | None):
    """Put the config's folder first on sys.path for the import, and take it off again afterwards."""
    if folder is None:
        yield
        return
    entry = str(folder)
    sys.path.insert(0, entry)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)


def _package_locations(top: str) -> list[Path] | None:
    spec = importlib.util.find_spec(top)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return [Path(p).resolve() for p in spec.submodule_search_locations]
    return [Path(spec.origin).resolve()] if spec.origin and spec.origin not in ("built-in", "frozen") else []


def check_origin(spec: str, *, field: str, config_dir: Path | None, allow_external_code: bool) -> None:
    """Raise LorafitError if the module of ``spec`` cannot be found, or lies where code may not be loaded from."""
    top = spec.split(":")[0].split(".")[0]
    if top in sys.modules and not hasattr(sys.modules[top], "__file__"):
        return  # a built-in module
    with _searching_first(config_dir):
        locations = _package_locations(top)
    if locations is None:
        where = f"the config's folder ({config_dir}) or " if config_dir else ""
        raise LorafitError(f"{field}: module {top!r} not found (from {spec!r})",
                           why=f"a plugin is imported from {where}the installed packages",
                           fix="check the spelling, put the module next to the config file, or pip install its package")
    allowed = _installed_roots() + ([config_dir.resolve()] if config_dir else [])
    outside = [p for p in locations if not _inside(p, allowed)]
    if outside and not allow_external_code:
        raise LorafitError(
            f"{field}: {spec!r} would be imported from {outside[0]}, outside the installed packages and the config's folder",
            why="importing a module runs its code; lorafit loads plugins only from places you installed or wrote "
            "next to the config",
            fix="move the module next to the config file, install its package, or set plugins.allow_external_code: "
            "true if you trust that folder",
        )


def _module_of(spec: str, *, field: str, config_dir: Path | str | None, allow_external_code: bool):
    """The module ``spec`` names, imported (run) after its origin was checked."""
    if not is_dotted_path(spec):
        raise LorafitError(f"{field}: {spec!r} is not a dotted path", fix="write package.module:Name")
    config_dir = Path(config_dir) if config_dir is not None else None
    check_origin(spec, field=field, config_dir=config_dir, allow_external_code=allow_external_code)
    module_name = spec.split(":")[0]
    with _searching_first(config_dir):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise LorafitError(f"{field}: module {module_name!r} not found ({exc})",
                               fix="check the module path in package.module:Name") from None


def load_function(spec: str, *, field: str, config_dir: Path | str | None = None,
                  allow_external_code: bool = False):
    """The function ``spec`` (``package.module:function``) names, by the same rules as a plugin class (GRPO's reward
    functions). Imports (runs) the module."""
    module = _module_of(spec, field=field, config_dir=config_dir, allow_external_code=allow_external_code)
    name = spec.split(":")[1]
    function = getattr(module, name, None)
    if not callable(function) or isinstance(function, type):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not isinstance(v, type)
                        and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        raise LorafitError(f"{field}: {spec.split(':')[0]} has no function {name!r}",
                           why=f"functions it defines: {', '.join(public) or 'none'}",
                           fix="check the function name after the ':'")
    return function


def load_plugin(spec: str, *, base: type, field: str, config_dir: Path | str | None = None,
                allow_external_code: bool = False) -> type:
    """The class ``spec`` names, checked to be a subclass of ``base``. Imports (runs) the module."""
    module = _module_of(spec, field=field, config_dir=config_dir, allow_external_code=allow_external_code)
    module_name, class_name = spec.split(":")
    cls = getattr(module, class_name, None)
    if cls is None:
        public = sorted(n for n, v in vars(module).items() if isinstance(v, type) and not n.startswith("_"))
        raise LorafitError(f"{field}: {module_name} has no class {class_name!r}",
                           why=f"classes it defines: {', '.join(public) or 'none'}",
                           fix="check the class name after the ':'")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise LorafitError(f"{field}: {spec} is not a {base.__module__}.{base.__name__} subclass",
                           fix=f"derive the class from {base.__name__}")
    return cls
