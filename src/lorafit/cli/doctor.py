"""`lorafit doctor [CONFIG]`: is this machine (and this config) ready to train? One table of checks, each ok, warn
or fail with its fix; exit 1 when anything would stop a run.

Without a config: Python and library versions against the tested ranges, CUDA, bf16, attention and kernel
options, bitsandbytes. With one: also the output folder (free disk, write permission), the model folder (config,
weights, tokenizer, chat template, pad token), the data files (data/precheck.py, as `lorafit train` reads them)
and the memory planner's verdict (lorafit plan).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from lorafit.cli.app import SetOption, quiet_libraries, app, starting
from lorafit.cli.plan import GpuMemoryOption
from lorafit.errors import LorafitError, install_hint

OK, WARN, FAIL = "ok", "warn", "fail"
MIN_FREE_DISK = 2 * 2**30  # checkpoints of a LoRA run (adapter + optimizer states) are small; 2 GiB is a floor


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def _requirements() -> tuple[str | None, list[str]]:
    """(requires-python, dependency specs) of the installed lorafit, else of the source tree's pyproject.toml."""
    try:
        meta = importlib.metadata.metadata("lorafit")
        return meta.get("Requires-Python"), [r for r in importlib.metadata.requires("lorafit") or [] if "extra ==" not in r]
    except importlib.metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[3] / "pyproject.toml"
        project = tomllib.loads(pyproject.read_text())["project"] if pyproject.is_file() else {}
        return project.get("requires-python"), list(project.get("dependencies", []))


def version_checks() -> list[Check]:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    python, deps = _requirements()
    here = platform.python_version()
    checks = [Check("python", OK if not python or here in SpecifierSet(python) else FAIL, f"{here} (tested {python})",
                    "" if not python or here in SpecifierSet(python) else f"use a Python {python}")]
    for spec in deps:
        req = Requirement(spec.split(";")[0])
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            checks.append(Check(req.name, FAIL, "not installed", f"pip install '{req}'"))
            continue
        inside = req.specifier.contains(installed, prereleases=True)
        checks.append(Check(req.name, OK if inside else WARN, f"{installed} (tested {req.specifier})",
                            "" if inside else f"pip install '{req}' (other versions are untested)"))
    return checks


def machine_checks(config=None) -> list[Check]:
    import torch

    from lorafit.model.attention import Machine, unavailable_reason
    from lorafit.model.kernels import liger_installed
    from lorafit.model.resolved import DTYPES, resolve_dtype

    machine = Machine.current()
    checks = []
    if machine.cuda:
        name = torch.cuda.get_device_name(0)
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        checks.append(Check("cuda", OK, f"{name}, {total:.1f} GiB, CUDA {torch.version.cuda}"))
        bf16 = torch.cuda.is_bf16_supported()
        checks.append(Check("bf16", OK if bf16 else WARN, "supported" if bf16 else "not supported by this GPU",
                            "" if bf16 else "set model.dtype: fp16 or fp32"))
    else:
        checks.append(Check("cuda", WARN, "no CUDA GPU: training runs on the CPU (slow; fine for the tiny model)",
                            "run on a machine with an NVIDIA GPU and a CUDA build of torch for real models"))
    dtype = DTYPES[resolve_dtype(config.model.dtype if config is not None else "auto", machine)]
    usable = [c for c in ("flash_attention_3", "flash_attention_2", "flex_attention", "sdpa", "eager")
              if unavailable_reason(c, dtype, machine) is None]
    checks.append(Check("attention", OK, "can train with: " + ", ".join(usable)))
    liger = machine.cuda and liger_installed()
    checks.append(Check("kernels", OK, "liger-kernel ready" if liger else
                        "none (liger-kernel needs CUDA and the liger extra)"))
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    needs_bnb = config is not None and (config.quant.bits is not None or config.train.optimizer == "paged_adamw_8bit")
    version = importlib.metadata.version("bitsandbytes") if bnb else None
    absent = "not installed" + (" but the config asks for it" if needs_bnb else " (only QLoRA and 8-bit optimizers need it)")
    checks.append(Check("bitsandbytes", FAIL if needs_bnb and not bnb else OK, version if bnb else absent,
                        install_hint("qlora", "bitsandbytes") if needs_bnb and not bnb else ""))
    if config is not None:
        checks += _config_machine_checks(config, machine, dtype)
    return checks


def _config_machine_checks(config, machine, dtype) -> list[Check]:
    """The config's own asks against this machine: the same checks a run makes when it starts."""
    from lorafit.model import kernels
    from lorafit.model.attention import unavailable_reason
    from lorafit.model.quantization import check_precision_supported

    checks = []
    try:
        check_precision_supported(config)
    except LorafitError as error:
        checks.append(Check("precision", FAIL, error.what, error.fix or ""))
    asked = config.model.attn_implementation
    reason = None if asked == "auto" else unavailable_reason(asked, dtype, machine)
    if reason:
        checks.append(Check("model.attn_implementation", FAIL, f"{asked}: {reason}", "use auto or sdpa"))
    if config.model.kernels == "liger" and not (machine.cuda and kernels.liger_installed()):
        checks.append(Check("model.kernels", FAIL, "liger asked, but it needs CUDA and liger-kernel installed",
                            "set model.kernels: auto (or, on a GPU machine: "
                            f"{install_hint('liger', 'liger-kernel')})"))
    return checks


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _can_write(folder: Path) -> bool:
    """A real write, not os.access: it also catches read-only mounts, and root passes any permission check."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def output_checks(config) -> list[Check]:
    out = Path(config.train.output_dir).resolve()
    parent = _nearest_existing(out)
    writable = parent.is_dir() and _can_write(parent)
    checks = [Check("output folder", OK if writable else FAIL,
                    f"{out} ({'writable' if writable else f'{parent} is not writable'})",
                    "" if writable else "set train.output_dir to a folder you can write, or fix its permissions")]
    free = shutil.disk_usage(parent).free
    checks.append(Check("free disk", OK if free >= MIN_FREE_DISK else WARN, f"{free / 2**30:.1f} GiB at {parent}",
                        "" if free >= MIN_FREE_DISK else "free some disk space, or lower train.keep_last"))
    return checks


def model_checks(config) -> list[Check]:
    from lorafit.model.folder import TOKENIZER_FIX, WEIGHTS_FIX, ModelFolder
    from lorafit.model.loading import resolve_model_path

    try:
        path = Path(resolve_model_path(config.model))
    except LorafitError as error:
        return [Check("model folder", FAIL, error.what, error.fix or "")]
    if not path.is_dir():
        return [Check("model folder", WARN, f"{path}: a hub name, looked up in the local cache at run time")]
    folder = ModelFolder.read(path)  # the reading `config validate` and the loaders refuse an incomplete folder by
    checks = [Check("model config", OK, f"{path}/config.json")]
    if folder.safetensors:
        checks.append(Check("model weights", OK, f"{len(folder.safetensors)} safetensors file(s)"))
    elif folder.pickles:
        checks.append(Check("model weights", FAIL, f"pickle files only ({', '.join(folder.pickles)})",
                            "convert them to safetensors (save_pretrained), or pass --allow-pickle to train"))
    else:
        checks.append(Check("model weights", FAIL, f"no weights (*.safetensors) in {path}", WEIGHTS_FIX))
    if not folder.tokenizer:
        return checks + [Check("tokenizer", FAIL, f"no tokenizer files in {path}", TOKENIZER_FIX)]
    template, pad = folder.chat_template, folder.pad_token
    checks.append(Check("auto resolves to", OK, resolved_here(config, folder.model_type).describe()))
    return checks + [
        Check("tokenizer", OK, ", ".join(folder.tokenizer)),
        Check("chat template", OK if template else WARN, "found" if template else "none in the model folder",
              "" if template else "chat data needs one: set data.chat_template_file (plain text data does not)"),
        Check("pad token", OK if pad else WARN, str(pad) if pad else "none: lorafit pads with the EOS token (masked)"),
    ]


def resolved_here(config, model_type: str):
    """What the run would load on this machine: the run's own resolver (model/resolved.py), not strict, so an
    explicit choice that cannot run here is shown as asked (machine_checks reports why it cannot)."""
    from lorafit.model.attention import Machine
    from lorafit.model.resolved import resolve_auto

    return resolve_auto(config.model, model_type, Machine.current(), strict=False)


def data_checks(config) -> list[Check]:
    from lorafit.data.precheck import check_config_sources

    try:
        check_config_sources(config)
    except LorafitError as error:
        return [Check("data", FAIL, error.what + ("; " + "; ".join(error.details[:3]) if error.details else ""),
                      error.fix or "")]
    sources = len(config.data.train) + len(config.data.eval)
    return [Check("data", OK, f"{sources} source(s) readable, every row parsed")]


def planner_check(config, gpu_memory: Optional[str]) -> Check:
    from lorafit.cli.plan import plan_report

    try:
        report = plan_report(config, gpu_memory=gpu_memory, nproc=None, strategy=None)
    except LorafitError as error:
        return Check("memory plan", FAIL, error.what, error.fix or "")
    detail = f"peak {report['peak_gib']:.2f} GiB allocated, {report['card_gib']:.2f} GiB on the card"
    if report["fits"] is None:
        return Check("memory plan", WARN, detail + "; no GPU here to compare with", "pass --gpu-memory for a verdict")
    if report["fits"]:
        return Check("memory plan", OK, detail + f"; fits in {report['budget_gib']:.1f} GiB")
    change = report["suggestion"]
    fix = ("use a smaller model or a larger GPU" if change is None
           else " ".join(f"--set {o}" for o in change["set"]) + f" (then {change['card_gib']:.2f} GiB)")
    return Check("memory plan", FAIL, detail + f"; does NOT fit in {report['budget_gib']:.1f} GiB", fix)


def run_checks(config_path: Optional[Path], overrides, gpu_memory: Optional[str]) -> list[Check]:
    config = None
    checks = version_checks()
    if config_path is not None:
        from lorafit.config import load_config

        try:
            config = load_config(config_path, overrides or [])
        except LorafitError as error:
            return checks + [Check("config", FAIL, error.what, error.fix or "fix the config (lorafit config validate)")]
        checks.append(Check("config", OK, f"{config_path} valid"))
    quiet_libraries()
    checks += machine_checks(config)
    if config is None:
        return checks
    checks += output_checks(config) + model_checks(config) + data_checks(config)
    if not any(c.status == FAIL for c in checks if c.name in ("model config", "model weights", "tokenizer", "data")):
        checks.append(planner_check(config, gpu_memory))
    return checks


def render_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    marks = {OK: "ok  ", WARN: "warn", FAIL: "FAIL"}
    lines = []
    for c in checks:
        lines.append(f"{marks[c.status]}  {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"      {'':<{width}}  fix: {c.fix}")
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    lines.append(f"\n{len(checks)} checks: {failed} failed, {warned} warning{'' if warned == 1 else 's'}"
                 + ("" if failed else " - ready to train"))
    return "\n".join(lines)


@app.command("doctor")
def doctor_command(
    config: Optional[Path] = typer.Argument(None, help="Config file (optional): also check its model, data, output "
                                            "folder and memory plan."),
    overrides: Optional[List[str]] = SetOption,
    gpu_memory: Optional[str] = GpuMemoryOption,
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Check this machine (and CONFIG) before a run: versions, CUDA, bf16, attention and kernels, bitsandbytes,
    output folder, model folder, data, memory plan. Exit 1 if anything would stop a run."""
    starting("checking this machine" + (f" and {config}" if config is not None else ""))
    checks = run_checks(config, overrides, gpu_memory)
    if as_json:
        typer.echo(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        typer.echo(render_checks(checks))
    if any(c.status == FAIL for c in checks):
        raise typer.Exit(1)
