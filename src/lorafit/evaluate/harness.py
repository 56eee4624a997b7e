"""`lorafit eval --harness TASKS`: EleutherAI's lm-evaluation-harness on the adapter and on its base, offline
(optional extra ``lorafit[harness]``).

lm_eval's Python API (``simple_evaluate``) runs on an ``HFLM`` built around the model and tokenizer lorafit has
already loaded; the base is the same model with the adapter disabled (peft's ``disable_adapter``), so the base is
never loaded twice. Nothing is downloaded: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set before lm_eval (and the
``datasets`` library it reads data with) is imported. Tasks are named three ways, in one comma-separated list:
- a path to a task YAML file (``tests/data/harness/colors.yaml``): read with yaml.safe_load; a relative ``data_files``
  or ``dataset_path`` in it is resolved against the YAML's folder, so a task over a local JSONL travels with it;
- the name of a task in ``--harness-tasks-dir DIR`` (lm_eval's own task folder format: ``include``, ``!function``
  and groups work there);
- a built-in lm_eval task name, whose dataset must already be in the local Hugging Face datasets cache.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.evaluate.progress import stage

INSTALL_HINT = "pip install 'lorafit[harness]'  (installs lm-eval)"
_YAML_SUFFIXES = (".yaml", ".yml")
# Closed-form standard errors for mean metrics; bootstrapped ones (other aggregations) with this many resamples.
BOOTSTRAP_ITERS = 1000


@dataclass(frozen=True)
class HarnessTasks:
    """What to hand lm_eval: task names and task configs (dicts from YAML files), and folders to index."""

    tasks: list = field(default_factory=list)  # str names and dict configs, in the order given
    include_path: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [t if isinstance(t, str) else t["task"] for t in self.tasks]


def _go_offline() -> None:
    # Before lm_eval or datasets is imported: both read these once, at import.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def require_lm_eval():
    _go_offline()
    try:
        import lm_eval
    except ImportError:
        raise LorafitError("--harness needs lm-evaluation-harness (the lm_eval package), which is not installed",
                           fix=INSTALL_HINT) from None
    return lm_eval


def _resolve(value, folder: Path):
    """A data path from a task YAML, made absolute against the YAML's folder (lists and split dicts too)."""
    if isinstance(value, dict):
        return {k: _resolve(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, folder) for v in value]
    if isinstance(value, str) and not Path(value).is_absolute() and (folder / value).exists():
        return str((folder / value).resolve())
    return value


def read_task_yaml(path: Path) -> dict:
    """One task from a YAML file, with its local data paths made absolute."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise LorafitError(f"{where}: not a plain YAML task ({getattr(exc, 'problem', exc)})",
                           why="task files given as paths are read with yaml.safe_load (no !function tags)",
                           fix=f"put the task in a folder and pass --harness-tasks-dir {path.parent} with its task name") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise LorafitError(f"{path}: field \"task\" missing", why="an lm_eval task YAML names its task in a \"task\" field",
                           fix="add task: <name> (docs/eval.md has an example)")
    if "include" in config:
        raise LorafitError(f"{path}: field \"include\" is not followed for a task given as a file",
                           fix=f"pass --harness-tasks-dir {path.parent} and the task name {config['task']} instead")
    folder = path.parent.resolve()
    resolved = dict(config)
    if "dataset_kwargs" in config and isinstance(config["dataset_kwargs"], dict):
        resolved["dataset_kwargs"] = {**config["dataset_kwargs"],
                                      **({"data_files": _resolve(config["dataset_kwargs"]["data_files"], folder)}
                                         if "data_files" in config["dataset_kwargs"] else {})}
    if isinstance(config.get("dataset_path"), str):
        resolved["dataset_path"] = _resolve(config["dataset_path"], folder)
    return resolved


def resolve_tasks(spec: str, tasks_dir: Path | None = None) -> HarnessTasks:
    """``--harness a,b.yaml`` and ``--harness-tasks-dir``: task names, configs from files, folders to index."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise LorafitError("--harness: no task given", fix="--harness TASK[,TASK...]: task names or task YAML files")
    include = []
    if tasks_dir is not None:
        if not Path(tasks_dir).is_dir():
            raise LorafitError(f"--harness-tasks-dir {tasks_dir}: not a folder")
        include.append(str(Path(tasks_dir).resolve()))
    tasks: list = []
    for item in items:
        path = Path(item).expanduser()
        if path.suffix in _YAML_SUFFIXES:
            if not path.is_file():
                raise LorafitError(f"--harness {item}: task file not found")
            tasks.append(read_task_yaml(path))
        else:
            tasks.append(item)
    return HarnessTasks(tasks, include)


def _task_manager(tasks: HarnessTasks):
    """lm_eval's index of the task folders, with its built-in tasks only when a name is not found in them."""
    from lm_eval.tasks import TaskManager

    names = [t for t in tasks.tasks if isinstance(t, str)]
    local = TaskManager(include_path=tasks.include_path or None, include_defaults=False)
    known = set(local.all_tasks)
    if all(n in known for n in names):
        return local, _with_local_paths(tasks, local)
    manager = TaskManager(include_path=tasks.include_path or None)
    missing = [n for n in names if n not in set(manager.all_tasks)]
    if missing:
        raise LorafitError(f"--harness: unknown task {', '.join(missing)}",
                           why="not a task of --harness-tasks-dir" + (f" ({', '.join(sorted(known)) or 'none'})"
                                                                      if tasks.include_path else "")
                           + ", not a built-in lm_eval task, not a .yaml file",
                           fix="check the spelling (lm-eval --tasks list shows the built-in ones), or pass the task YAML's path")
    return manager, _with_local_paths(tasks, manager)


def _with_local_paths(tasks: HarnessTasks, manager) -> HarnessTasks:
    """A task of --harness-tasks-dir written as plain YAML is handed over as its config with data paths made
    absolute (lm_eval would resolve a relative data_files against the working directory, not the task's folder);
    one using ``include`` or ``!function`` is left to lm_eval's own loader."""
    folders = [Path(p) for p in tasks.include_path]
    resolved = []
    for task in tasks.tasks:
        entry = manager.task_index.get(task) if isinstance(task, str) else None
        path = getattr(entry, "yaml_path", None)
        if path is not None and any(Path(path).resolve().is_relative_to(f) for f in folders):
            try:
                config = read_task_yaml(Path(path))
            except LorafitError:
                config = {}
            if config.get("task") == task:  # a group or tag name stays a name: lm_eval expands it
                task = config
        resolved.append(task)
    return HarnessTasks(resolved, tasks.include_path)


def _metrics(task_result: dict) -> dict[str, dict]:
    """lm_eval's "acc,none" / "acc_stderr,none" keys as {"acc": {"value": .., "stderr": ..}} (a filter other than
    "none" stays in the name: "exact_match,strict-match")."""
    values: dict[str, dict] = {}
    for key, value in task_result.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        stderr = metric.endswith("_stderr")
        name = metric.removesuffix("_stderr") + ("" if filter_name == "none" else f",{filter_name}")
        entry = values.setdefault(name, {"value": None, "stderr": None})
        entry["stderr" if stderr else "value"] = None if math.isnan(value) else float(value)
    return values


def _evaluate(lm_eval, lm, tasks: HarnessTasks, manager, settings: dict) -> dict:
    try:
        output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.tasks), task_manager=manager, log_samples=False,
                                         bootstrap_iters=BOOTSTRAP_ITERS, **settings)
    except (ConnectionError, FileNotFoundError) as exc:
        raise LorafitError(f"--harness {', '.join(tasks.names)}: a task's data is not available offline ({exc})",
                           why="lorafit runs the harness offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE): nothing is downloaded",
                           fix="define the task over a local file (docs/eval.md), or download the "
                           "dataset into the Hugging Face datasets cache beforehand") from None
    samples = output.get("n-samples") or {}
    return {task: {"metrics": _metrics(result), "n": (samples.get(task) or {}).get("effective")}
            for task, result in output["results"].items()}


def run_harness(model, tokenizer, tasks: HarnessTasks, *, with_base: bool, batch_size: int = 16,
                limit: int | None = None, num_fewshot: int | None = None, chat_template: bool = False) -> dict:
    """lm_eval on ``model`` and, with ``with_base``, on the same model with its adapter disabled.

    Returns {"tasks": {task: {"n": examples, "metrics": {metric: {"model": v, "model_stderr": s, "base": ..,
    "delta": model - base}}}}, "settings": ..., "lm_eval_version": ..}."""
    lm_eval = require_lm_eval()
    import logging

    from lm_eval.models.huggingface import HFLM

    # HFLM warns that a model object (not a name) was passed and "many arguments may be ignored": that is the
    # intended use here (lorafit passes none of them), so the warning would only mislead.
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    manager, tasks = _task_manager(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    settings = {"limit": limit, "num_fewshot": num_fewshot, "apply_chat_template": chat_template}
    subject = "adapter" if with_base else "model"
    stage(f"{subject}: lm-evaluation-harness {', '.join(tasks.names)}", subject=subject)
    adapted = _evaluate(lm_eval, lm, tasks, manager, settings)
    base = None
    if with_base:
        stage(f"base (adapter disabled): lm-evaluation-harness {', '.join(tasks.names)}", subject="base")
        with model.disable_adapter():
            base = _evaluate(lm_eval, lm, tasks, manager, settings)
    table = {}
    for task, result in adapted.items():
        rows = {}
        for name, value in result["metrics"].items():
            row = {"model": value["value"], "model_stderr": value["stderr"]}
            if base is not None:
                other = base[task]["metrics"].get(name, {})
                row.update(base=other.get("value"), base_stderr=other.get("stderr"))
                row["delta"] = None if None in (row["model"], row["base"]) else row["model"] - row["base"]
            rows[name] = row
        table[task] = {"n": result["n"], "metrics": rows}
    return {"tasks": table, "settings": {**settings, "tasks": tasks.names, "include_path": tasks.include_path},
            "lm_eval_version": getattr(lm_eval, "__version__", None)}


def harness_eval(*, adapter: Path | None, model: Path | None, tasks: HarnessTasks, batch_size: int = 16,
                 limit: int | None = None, num_fewshot: int | None = None, chat_template: bool = False) -> dict:
    """`lorafit eval --harness`: load the adapter on its base (or a plain model), run the harness on both, and
    when the adapter is a run's, save harness_results.json in the run folder and rebuild its report.html."""
    from lorafit.evaluate.command import load_models
    from lorafit.run_folder import RunFolder

    require_lm_eval()  # a missing extra is reported before minutes of model loading
    if adapter is None and model is None:
        raise LorafitError("nothing to evaluate", fix="pass --adapter DIR (a trained adapter) or --model DIR (a plain model)")
    stage("loading the adapter on its base" if adapter is not None else "loading the model")
    loaded, tokenizer, described, _ = load_models(adapter, model)
    import torch

    if torch.cuda.is_available():
        loaded = loaded.to("cuda")  # HFLM runs on the model's own device
    result = {**described, **run_harness(loaded, tokenizer, tasks, with_base=adapter is not None, batch_size=batch_size,
                                         limit=limit, num_fewshot=num_fewshot, chat_template=chat_template)}
    run_dir = run_folder_of(adapter, Path(described["adapter"]) if adapter is not None else None)
    if run_dir is not None:
        from lorafit.evaluate.report import write_report

        result["saved"] = str(RunFolder(run_dir).write_json(RunFolder.HARNESS, result))
        if (run_dir / RunFolder.REPORT).is_file():
            write_report(run_dir)
    return result


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_harness(result: dict, *, adapter: bool) -> str:
    """The harness table `lorafit eval` prints: task, metric, adapter (or model), base and delta."""
    first = "adapter" if adapter else "model"
    with_base = any("base" in row for task in result["tasks"].values() for row in task["metrics"].values())
    header = f"{'task':<28}{'metric':<16}{first:>10}" + (f"{'base':>10}{'delta':>10}" if with_base else "") + f"{'n':>7}"
    lines = ["lm-evaluation-harness" + (f" {result['lm_eval_version']}" if result.get("lm_eval_version") else ""),
             header, "-" * len(header)]
    for task, values in sorted(result["tasks"].items()):
        for name, row in values["metrics"].items():
            line = f"{task[:27]:<28}{name[:15]:<16}{_cell(row['model']):>10}"
            if with_base:
                delta = row.get("delta")
                line += f"{_cell(row.get('base')):>10}{(f'{delta:+.4f}' if delta is not None else ''):>10}"
            lines.append(line + f"{values['n'] if values['n'] is not None else '':>7}")
    return "\n".join(lines)


def run_folder_of(adapter: str | Path | None, adapter_dir: Path | None) -> Path | None:
    """The run folder an evaluated adapter belongs to (the folder given, or the one above its artifact), if any."""
    from lorafit.run_folder import RunFolder

    if adapter is None or adapter_dir is None:
        return None
    for folder in (Path(adapter).expanduser().resolve(), *list(adapter_dir.parents)[:2]):
        if (folder / RunFolder.RESULTS).is_file():
            return folder
    return None


def harness_section(harness: dict | None) -> str:
    """report.html's table of lm-evaluation-harness results: base vs adapter per task and metric."""
    import html

    if not harness or not harness.get("tasks"):
        return ""
    esc = html.escape
    rows = []
    for task, values in sorted(harness["tasks"].items()):
        for name, row in values["metrics"].items():
            delta = row.get("delta")
            css = "" if not delta else ("good" if delta > 0 else "bad")
            rows.append(f"<tr><td>{esc(task)}</td><td>{esc(name)}</td><td class='num'>{_cell(row.get('base'))}</td>"
                        f"<td class='num'>{_cell(row['model'])}</td><td class='num'><span class='{css}'>"
                        f"{'' if delta is None else f'{delta:+.4f}'}</span></td><td class='num'>{values.get('n') or ''}</td></tr>")
    settings = harness.get("settings") or {}
    return (f"<h2>lm-evaluation-harness</h2><p class='muted'>lm_eval {esc(str(harness.get('lm_eval_version') or ''))}, "
            f"{esc(str(settings.get('num_fewshot') if settings.get('num_fewshot') is not None else 'task default'))} "
            f"few-shot, chat template {'on' if settings.get('apply_chat_template') else 'off'}; base = the adapter "
            f"disabled. Higher is better for the usual metrics (acc, exact_match); check the task for others.</p>"
            f"<table><tr><th>task</th><th>metric</th><th>base</th><th>adapter</th><th>change</th><th>n</th></tr>"
            f"{''.join(rows)}</table>")
