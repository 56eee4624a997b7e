"""`lorafit verify`: is this folder exactly the adapter that was trained, and does it fit its base?

Checks, each reported by name so a user knows what to fix:
- checksums: every file listed is present with the same sha256; no file is missing or extra (an adapter with no
  checksums.json gets the other checks and the distinct outcome "unproven": nothing proves its files are the ones
  written);
- safetensors: the header parses, offsets tile the data exactly, dtypes and sizes agree; values are finite;
- initialisation: an adapter saved for a base its init rewrote (PiSSA/OLoRA/LoftQ, unconverted) is refused: it
  does not fit the base files; a converted one must have the rank metadata.json records;
- adapter: tensor names and shapes agree with adapter_config.json (rank, targeted modules in any form peft
  writes: short names, full module paths, or one regular expression);
- with ``--base``: the base's weight files are the ones trained on (sha256) and each adapted module's shape fits
  (``[out, in]``, or ``[in, out]`` for GPT-2-style Conv1D layers, ``fan_in_fan_out``);
- no pickle files (refused unless ``--allow-pickle``).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorafit.artifact.publish import CHECKSUMS, checksums_for
from lorafit.artifact.provenance import weight_files
from lorafit.errors import LorafitError
from lorafit.model import PICKLE_SUFFIXES
from lorafit.model.adapters import ADAPTER_CONFIG, check_causal_lm, find_adapter_dir
from lorafit.model.lora_init import mutating_init_problem

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector|lora_embedding_A|lora_embedding_B)(\.weight)?$")


@dataclass
class VerifyReport:
    artifact: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: dict = field(default_factory=dict)
    unproven: list[str] = field(default_factory=list)  # why the files cannot be proven to be the ones written

    @property
    def status(self) -> str:
        """"failed" (a problem found), "unproven" (no problem, but no checksums to prove integrity) or "ok"."""
        return "failed" if self.problems else "unproven" if self.unproven else "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        return {"ok": self.ok, "status": self.status, **asdict(self)}


def read_safetensors_header(path: Path) -> tuple[dict, list[str]]:
    """The header of a safetensors file and the problems found in it (without loading any tensor)."""
    problems: list[str] = []
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return {}, [f"{path.name}: too short to be a safetensors file ({size} bytes)"]
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8 or length > 100_000_000:
            return {}, [f"{path.name}: header length {length} does not fit the file ({size} bytes)"]
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return {}, [f"{path.name}: header is not valid JSON ({exc})"]
    if not isinstance(header, dict):
        return {}, [f"{path.name}: header is not a JSON object"]
    data_size = size - 8 - length
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path.name}: tensor {name}: malformed header entry")
            continue
        numel = 1
        for dim in shape:
            numel *= dim
        if dtype not in _DTYPE_BYTES:
            problems.append(f"{path.name}: tensor {name}: unknown dtype {dtype}")
        elif end - begin != numel * _DTYPE_BYTES[dtype]:
            problems.append(f"{path.name}: tensor {name}: {end - begin} bytes for shape {shape} of {dtype}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problems.append(f"{path.name}: tensor {name}: data starts at {begin}, expected {position} (gap or overlap)")
        position = max(position, end)
    if position != data_size:
        problems.append(f"{path.name}: tensors cover {position} bytes of a {data_size}-byte data section")
    return header, problems


def _check_checksums(folder: Path, report: VerifyReport) -> None:
    listing = folder / CHECKSUMS
    if not listing.is_file():
        report.unproven.append(f"no {CHECKSUMS}: nothing proves these files are the ones written (a PEFT adapter "
                               "saved by other tools has none; lorafit's artifacts always do)")
        return
    try:
        expected = json.loads(listing.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        report.problems.append(f"{CHECKSUMS}: not a valid checksum list")
        return
    actual = checksums_for(folder)
    for name in sorted(expected):
        if name not in actual:
            report.problems.append(f"missing file: {name}")
        elif actual[name] != expected[name]:
            report.problems.append(f"changed file: {name} (sha256 {actual[name][:12]}…, expected {expected[name][:12]}…)")
    for name in sorted(set(actual) - set(expected)):
        report.problems.append(f"extra file: {name} (not in {CHECKSUMS})")
    report.checked["files"] = len(expected)


def _check_tensors(folder: Path, report: VerifyReport, allow_pickle: bool) -> dict[str, list[int]]:
    pickles = sorted(p.name for p in folder.rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    for name in pickles:
        if allow_pickle:
            report.warnings.append(f"{name}: pickle file accepted because of --allow-pickle (it can run code when loaded)")
        else:
            report.problems.append(f"{name}: pickle file refused (loading it can run arbitrary code); "
                                   "use safetensors, or pass --allow-pickle if you trust its source")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        report.problems.append("adapter_model.safetensors: missing")
        return {}
    header, problems = read_safetensors_header(weights)
    report.problems += problems
    if problems:
        return {}
    from safetensors import safe_open

    import torch

    shapes = {}
    with safe_open(str(weights), framework="pt") as handle:
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            shapes[name] = list(tensor.shape)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                report.problems.append(f"adapter_model.safetensors: tensor {name} has {bad} non-finite values")
    report.checked["tensors"] = len(shapes)
    return shapes


def _check_adapter_config(folder: Path, shapes: dict[str, list[int]], report: VerifyReport) -> dict:
    path = folder / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        report.problems.append(f"adapter_config.json: unreadable ({exc})")
        return {}
    try:  # an adapter for another task (SEQ_CLS...): named as eval, merge and generate name it, not by its head
        check_causal_lm(folder, config)
    except LorafitError as error:
        report.problems.append(f"{error.what}: {error.why}")
        return config
    _check_init(folder, config, report)
    rank, rank_pattern = config.get("r"), config.get("rank_pattern") or {}
    targets = config.get("target_modules")
    for name, shape in shapes.items():
        match = _ADAPTER_KEY.match(name)
        if not match:
            if ".modules_to_save." not in name:
                report.problems.append(f"adapter tensor {name}: not a LoRA or modules_to_save tensor")
            continue
        module, kind = match["module"], match["kind"]
        if not is_targeted(module, targets):
            report.problems.append(f"adapter tensor {name}: module {module!r} is not in target_modules {targets!r}")
        r = next((v for k, v in rank_pattern.items() if re.search(k, module)), rank)
        if kind == "lora_A" and (len(shape) != 2 or shape[0] != r):
            report.problems.append(f"adapter tensor {name}: shape {shape}, expected [r={r}, in_features]")
        if kind == "lora_B" and (len(shape) != 2 or shape[1] != r):
            report.problems.append(f"adapter tensor {name}: shape {shape}, expected [out_features, r={r}]")
    return config


def _check_init(folder: Path, config: dict, report: VerifyReport) -> None:
    """An adapter saved for a base its initialisation rewrote (PiSSA, OLoRA, LoftQ) does not fit the base files;
    a lorafit artifact records its conversion to the original base, and the rank must be the converted one."""
    problem = mutating_init_problem(config)
    if problem:
        report.problems.append(problem)
    metadata_path = folder / "metadata.json"
    if not metadata_path.is_file():
        return
    try:
        init = json.loads(metadata_path.read_text(encoding="utf-8")).get("adapter_init") or {}
    except json.JSONDecodeError:
        report.problems.append("metadata.json: not valid JSON")
        return
    if init.get("base_mutated_by_init") and (not init.get("converted_to_original_base")
                                             or init.get("published_rank") != config.get("r")):
        report.problems.append(f"adapter_config.json: r={config.get('r')}, but metadata.json records a {init.get('init')} "
                               f"adapter converted to rank {init.get('published_rank')} for the original base")
    report.checked["init"] = init.get("init", "unrecorded")


def is_targeted(module: str, targets) -> bool:
    """Whether peft would have adapted ``module`` (its full path) for adapter_config.json's target_modules.

    peft writes them as short names (``q_proj``), as full module paths (``model.layers.0.self_attn.q_proj``: it
    does for "all-linear" when fewer than 20 modules match), or as one regular expression matched against the
    whole path (a string). A list entry matches the path itself or its last dotted parts.
    """
    if targets is None or targets == "all-linear":
        return True  # nothing to check against without the base model's layer types
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _check_base(folder: Path, base: Path, shapes: dict[str, list[int]], config: dict, report: VerifyReport) -> None:
    if not (base / "config.json").is_file():
        report.problems.append(f"--base {base}: not a model folder (no config.json)")
        return
    metadata_path = folder / "metadata.json"
    if metadata_path.is_file():
        recorded = json.loads(metadata_path.read_text(encoding="utf-8"))["base_model"].get("weight_files_sha256", {})
        actual = weight_files(base)
        if recorded and actual != recorded:
            changed = sorted(n for n in set(recorded) | set(actual) if recorded.get(n) != actual.get(n))
            report.problems.append(f"--base {base}: weight files differ from the base trained on: {', '.join(changed)}")
        report.checked["base_weight_files"] = len(actual)
    base_shapes: dict[str, list[int]] = {}
    for file in sorted(base.glob("*.safetensors")):
        header, problems = read_safetensors_header(file)
        report.problems += [f"--base {p}" for p in problems]
        base_shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    lora = {}
    for name, shape in shapes.items():
        match = _ADAPTER_KEY.match(name)
        if match and match["kind"] in ("lora_A", "lora_B"):
            lora.setdefault(match["module"], {})[match["kind"]] = shape
    # GPT-2-style Conv1D layers store their weight as [in, out]; peft records it as fan_in_fan_out.
    transposed = bool(config.get("fan_in_fan_out"))
    for module, parts in sorted(lora.items()):
        weight = base_shapes.get(f"{module}.weight")
        if weight is None:
            report.problems.append(f"--base {base}: has no weight for adapted module {module}")
        elif "lora_A" in parts and "lora_B" in parts:
            out_features, in_features = parts["lora_B"][0], parts["lora_A"][1]
            expected = [in_features, out_features] if transposed else [out_features, in_features]
            if weight != expected:
                layout = "[in, out] (fan_in_fan_out)" if transposed else "[out, in]"
                report.problems.append(f"--base {base}: {module}.weight is {weight}, the adapter expects {expected} "
                                       f"as {layout}")
    report.checked["base_modules"] = len(lora)


def verify_artifact(folder: Path, base: Path | None = None, *, allow_pickle: bool = False) -> VerifyReport:
    """Check an artifact or adapter folder (a run folder stands for its newest final artifact)."""
    folder = Path(folder)
    if folder.is_dir() and not (folder / ADAPTER_CONFIG).is_file():
        try:
            folder = find_adapter_dir(folder)
        except LorafitError:
            pass  # not a run folder either: the checks below name what is missing
    report = VerifyReport(artifact=str(folder))
    if not folder.is_dir():
        report.problems.append(f"{folder}: not a folder")
        return report
    _check_checksums(folder, report)
    shapes = _check_tensors(folder, report, allow_pickle)
    if shapes:
        config = _check_adapter_config(folder, shapes, report)
        if base is not None:
            _check_base(folder, Path(base), shapes, config, report)
    return report
