"""What can be checked about a run before any weight is loaded, and a plain list of what could not.

`lorafit config validate` and the first second of `lorafit train` (cli/app.py) run it after the config and the
data rows are checked (data/precheck.py), so these mistakes answer in seconds, not after the 1-3 minutes of
imports, tokenising and loading that come before the run would find them:

* the model folder: it exists (or is in the local Hugging Face cache), with config.json, weights and tokenizer
  files (model/folder.py: the reading `lorafit doctor` shows);
* plugin modules (objective.type, plugins.callbacks): found where the run would import them from, without
  importing them (importing runs their code);
* row lengths: the training and eval rows over data.max_seq_length, counted with the tokenizer (tokenizer.json,
  no torch) on the rows' text without the chat template, a lower bound: a source the supervision audit would
  refuse (more than half its rows too long) is refused now;
* lora.target_modules and modules_to_save against the architecture's module names: a model built from
  config.json on the meta device (no memory, no weights). The one check that imports torch and transformers, so
  it runs last and only when the config names modules.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.config import BUILTIN_TINY_MODELS, Config, DataSource
from lorafit.errors import LorafitError
from lorafit.model.folder import ModelFolder, cached_hub_folder, locate_model

# A quick count: above this much text a source's lengths are left to the run (it tokenises them anyway).
MAX_COUNTED_CHARS = 50_000_000
TOO_LONG_SHARE = 0.5  # data/audit.py: more than half of a source over the limit stops the run


@dataclass
class Preflight:
    """What was checked (each line says how) and what could not be, in words a user reads."""

    checked: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"  checked      {line}" for line in self.checked]
        lines += [f"  warning      {line}" for line in self.warnings]
        lines += [f"  not checked  {line}" for line in self.not_checked]
        return "\n".join(lines)


def preflight(config: Config, *, allow_pickle: bool = False, targets: bool = True) -> Preflight:
    """Every check above, cheapest first; raises the first problem as a LorafitError. ``targets=False`` leaves out
    the one check that imports torch."""
    report = Preflight(checked=["the config and every data row (format, fields, roles)"])
    folder = check_model_folder(config, report, allow_pickle=allow_pickle)
    check_plugins(config, report)
    check_row_lengths(config, folder, report)
    if targets:
        check_target_modules(config, folder, report)
    report.not_checked += [
        "the chat template on every row, the labels and the supervision audit (`lorafit data inspect`)",
        "memory (`lorafit plan`, `lorafit doctor`) and this machine (`lorafit doctor`)",
        "the weights' values, and that they load (`lorafit train --dry-run`)",
    ]
    return report


# ---------------------------------------------------------------------------------------------- model folder


def check_model_folder(config: Config, report: Preflight, *, allow_pickle: bool = False) -> Path | None:
    """The model folder's files; returns the folder (None: the embedded tiny model, which lorafit builds; finding
    its cache folder would import the data package, and with it torch)."""
    model = config.model
    if model.path in BUILTIN_TINY_MODELS:
        report.checked.append("model: the embedded tiny model (lorafit builds it)")
        return None
    located = locate_model(model.path)
    folder = Path(located) if Path(located).is_dir() else cached_hub_folder(located)
    # trust_remote_code: the shipped code may build its tokenizer from other files.
    ModelFolder.read(folder).require(tokenizer=not model.trust_remote_code, allow_pickle=allow_pickle)
    where = "" if Path(located).is_dir() else " (in the local Hugging Face cache)"
    report.checked.append(f"model folder {folder}{where}: config.json, weights, tokenizer files")
    return folder


# ---------------------------------------------------------------------------------------------- plugins


def plugin_specs(config: Config) -> list[tuple[str, str, str | None]]:
    """(config field, package.module:Class, folder searched first) of every plugin the run would import."""
    from lorafit.config.objective import is_dotted_path

    specs = []
    if is_dotted_path(config.objective.type):
        specs.append(("objective.type", config.objective.type, config.objective.config_dir))
    specs += [(f"plugins.callbacks[{i}]", spec, config.plugins.config_dir)
              for i, spec in enumerate(config.plugins.callbacks)]
    return specs


def find_module(module: str, first: str | None) -> bool:
    """Whether ``module`` (dotted) exists where the run would import it from (``first``, then sys.path), found
    part by part without importing anything: importlib.util.find_spec would import the parent packages."""
    head, *rest = module.split(".")
    if head in sys.modules:
        found = sys.modules[head].__spec__
    else:
        found = importlib.machinery.PathFinder.find_spec(head, [*([first] if first else []), *sys.path])
    for part in rest:
        if found is None or not found.submodule_search_locations:
            return False
        found = importlib.machinery.PathFinder.find_spec(part, list(found.submodule_search_locations))
    return found is not None


def check_plugins(config: Config, report: Preflight) -> None:
    specs = plugin_specs(config)
    for name, spec, folder in specs:
        module = spec.split(":")[0]
        if not find_module(module, folder):
            where = f"the config's folder ({folder}) or " if folder else ""
            raise LorafitError(f"{name}: module {module!r} not found (from {spec!r})",
                               why=f"a plugin is imported from {where}the installed packages",
                               fix="check the spelling, put the module next to the config file, or install its package")
    if specs:
        report.checked.append(f"{len(specs)} plugin module(s) found (not imported: importing runs their code)")
        report.not_checked.append("the plugin classes inside the modules (the run imports them first thing)")


# ---------------------------------------------------------------------------------------------- row lengths


def _row_texts(source: DataSource, config: Config) -> list[str] | None:
    """The text of each row of an SFT source, template left out; None for triplet and preference rows."""
    if config.objective.needs_triplets or config.objective.needs_preference or source.format in ("triplets",
                                                                                                 "preference"):
        return None
    from lorafit.data.sources import read_records

    records, _, _ = read_records(source, rank_field=config.data.curriculum_field)
    return [r.text if r.text is not None else "\n".join(str(m.get("content") or "") for m in r.messages)
            for r in records]


def check_row_lengths(config: Config, folder: Path | None, report: Preflight) -> None:
    data = config.data
    tokenizer_file = folder / "tokenizer.json" if folder is not None else None
    if tokenizer_file is None or not tokenizer_file.is_file():
        report.not_checked.append("row lengths: " + ("the embedded tiny model's tokenizer is loaded when the run "
                                                     "starts" if folder is None else "no tokenizer.json to count with"))
        return
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    counted = 0
    for split, sources in (("train", data.train), ("eval", data.eval)):
        for source in sources:
            texts = _row_texts(source, config)
            if texts is None:
                report.not_checked.append(f"row lengths of {Path(source.path).name}: triplet and preference rows "
                                          "are measured when the run tokenises them")
                continue
            if sum(map(len, texts)) > MAX_COUNTED_CHARS:
                report.not_checked.append(f"row lengths of {Path(source.path).name}: too much text for a quick "
                                          "count (the run counts them)")
                continue
            lengths = [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
            over = sum(n > data.max_seq_length for n in lengths)
            counted += len(lengths)
            if over / len(lengths) > TOO_LONG_SHARE:
                message = (f"{source.path}: at least {over} of {len(lengths)} {split} rows "
                           f"({100 * over / len(lengths):.0f}%) are longer than data.max_seq_length="
                           f"{data.max_seq_length} tokens, before the chat template adds its own; they would be "
                           f"{'truncated' if data.truncation == 'truncate' else 'dropped'}")
                fix = (f"raise data.max_seq_length (the longest row has at least {max(lengths)} tokens); "
                       "`lorafit data inspect` shows the length histogram")
                if data.audit:
                    raise LorafitError(message, why="the supervision audit stops such a run before training "
                                       "(data.audit)", fix=fix)
                report.warnings.append(f"{message} (data.audit is off: the run goes ahead)")
    if counted:
        report.checked.append(f"row lengths: {counted} rows counted with {tokenizer_file.name} against "
                              f"data.max_seq_length={data.max_seq_length} (text only: a lower bound)")


# ---------------------------------------------------------------------------------------------- target modules


def check_target_modules(config: Config, folder: Path | None, report: Preflight) -> None:
    lora = config.lora
    if not isinstance(lora.target_modules, list) and not lora.modules_to_save:
        report.checked.append("lora.target_modules: all-linear (every linear layer but the output head)")
        return
    from lorafit.model.quiet import quiet_libraries

    quiet_libraries()  # the first torch/transformers import of `lorafit config validate`
    from lorafit.model.loading import check_targets
    from lorafit.model.memory_plan import meta_model, read_hf_config

    if folder is None:  # the embedded tiny model: its config is known without building it
        from transformers import AutoConfig

        from lorafit.model.tiny import TINY_ARCH

        hf_config = AutoConfig.for_model("llama", **TINY_ARCH)
    else:
        hf_config = read_hf_config(str(folder), trust_remote_code=config.model.trust_remote_code)
    check_targets(meta_model(hf_config, trust_remote_code=config.model.trust_remote_code), lora)
    report.checked.append(f"lora.target_modules{' and modules_to_save' if lora.modules_to_save else ''} against "
                          f"the {type(hf_config).__name__.removesuffix('Config')} architecture's module names "
                          "(config.json on the meta device)")
