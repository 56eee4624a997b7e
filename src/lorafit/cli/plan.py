"""`lorafit plan`: the predicted peak GPU memory of a run, term by term, whether it fits, and the cheapest change
that makes it fit (model/memory_plan.py; docs/planner.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from lorafit.cli.app import SetOption, load_command_config, quiet_libraries, app, starting

GpuMemoryOption = typer.Option(None, "--gpu-memory", help="Memory of the GPU to plan for, e.g. 6GB, 24GiB (GB read as "
                               "GiB). Default: the total memory of this machine's GPU 0, if any.")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def describe_terms(inp, plan) -> dict[str, str]:
    """A one-line 'how' for each term of the plan (the formulas are in docs/planner.md)."""
    s, shape = inp.setup, inp.shape
    tokens = f"{s.rows} x {s.row_tokens} tokens"
    weights = (f"{_count(shape.total_params)} params, {s.quant_bits}-bit linears + fp32 rest" if s.quant_bits
               else f"{_count(shape.total_params)} params x {2 if s.dtype != 'fp32' else 4} bytes ({s.dtype})")
    optim = {"adamw": "AdamW: 2 states per trainable value", "sgd": "SGD: none",
             "paged_adamw_8bit": "8-bit AdamW: 2 bytes per trainable value (paged)"}[s.optimizer]
    how = {
        "base weights": weights,
        "adapters": f"LoRA r{s.rank} on {len(s.adapted)} linear layers, fp32"
                    + (f", + {s.saved_params:,} modules_to_save values" if s.saved_params else ""),
        "gradients": "one per trainable value" + (" (+ DDP bucket copy)" if s.nproc > 1 and s.strategy == "ddp" else ""),
        "optimizer states": optim,
        "activations": (f"layer inputs kept (checkpointing) + 1 layer recomputed, {tokens}" if s.checkpointing
                        else f"{shape.layers} layers' saved tensors, {tokens}, attention {s.attention}"),
        "logits": ("liger fused cross-entropy: no logits" if s.liger
                   else f"logits ({'fp32: accelerate converts the outputs' if s.fp32_outputs else s.dtype}) x "
                        f"{shape.vocab:,} vocab, their gradient, one fp32 chunk (chunked log-probabilities)"),
        "buffers": "RoPE tables" + (", DoRA weight norm" if s.dora else ""),
    }
    return {term: how.get(term, "") for term in plan.terms}


def budget_bytes(gpu_memory: Optional[str]) -> Optional[int]:
    """--gpu-memory, else the total memory of the GPU here (None without one)."""
    from lorafit.model.memory_plan import parse_memory

    if gpu_memory:
        return parse_memory(gpu_memory)
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def plan_report(config, *, gpu_memory: Optional[str], nproc: Optional[int], strategy: Optional[str],
                use_cache: bool = True) -> dict:
    """Everything `lorafit plan` prints, as one dictionary (the doctor's planner check reuses it)."""
    from lorafit.model.memory_accuracy import accuracy
    from lorafit.model.memory_plan import cheapest_fit, plan_config
    from lorafit.model.memory_terms import GIB

    inp, plan = plan_config(config, nproc=nproc, strategy=strategy, use_cache=use_cache)
    budget = budget_bytes(gpu_memory)
    how = describe_terms(inp, plan)
    report = {
        **plan.as_dict(),
        "rows": [{"term": term, "gib": round(value / GIB, 3), "how": how[term]} for term, value in plan.terms.items()],
        "model": {"params": inp.shape.total_params, "layers": inp.shape.layers, "hidden": inp.shape.hidden,
                  "vocab": inp.shape.vocab},
        "micro_batch": {"rows": inp.setup.rows, "tokens_per_row": inp.setup.row_tokens, "packing": inp.packing},
        "setup": {"dtype": inp.setup.dtype, "quant_bits": inp.setup.quant_bits, "attention": inp.setup.attention,
                  "liger": inp.setup.liger, "checkpointing": inp.setup.checkpointing,
                  "optimizer": inp.setup.optimizer, "nproc": inp.setup.nproc, "strategy": inp.setup.strategy},
        "budget_gib": round(budget / GIB, 3) if budget else None,
        "fits": None if budget is None else plan.card <= budget,
        "suggestion": None,
        "accuracy": accuracy(inp.setup),
    }
    if budget is not None and plan.card > budget:
        change = cheapest_fit(inp, budget)
        report["suggestion"] = None if change is None else {
            "set": list(change.overrides), "costs": list(change.costs), "peak_gib": round(change.plan.peak / GIB, 3),
            "card_gib": round(change.plan.card / GIB, 3)}
    return report


def render_plan(report: dict, config_name: str) -> str:
    m, b, s = report["model"], report["micro_batch"], report["setup"]
    lines = [
        f"memory plan for {config_name} (per device; {s['nproc']} process{'es' if s['nproc'] > 1 else ''}, {s['strategy']})",
        f"model: {_count(m['params'])} parameters, {m['layers']} layers, hidden {m['hidden']}, vocab {m['vocab']:,}; "
        f"{s['dtype']}{', ' + str(s['quant_bits']) + '-bit base' if s['quant_bits'] else ''}",
        f"largest micro-batch: {b['rows']} x {b['tokens_per_row']} tokens (packing {b['packing']}); "
        f"checkpointing {'on' if s['checkpointing'] else 'off'}; attention {s['attention']}; "
        f"kernels {'liger' if s['liger'] else 'none'}; optimizer {s['optimizer']}",
        "",
        f"| {'term':<18} | {'GiB':>7} | how |",
        f"| {'-' * 18} | {'-' * 7} | --- |",
    ]
    lines += [f"| {r['term']:<18} | {r['gib']:>7.2f} | {r['how']} |" for r in report["rows"]]
    lines += [f"| {'at ' + name:<18} | {gib:>7.2f} | its own peak: a no-grad forward over the weights and states |"
              for name, gib in report["phases_gib"].items()]
    lines += [f"| {'peak (allocated)':<18} | {report['peak_gib']:>7.2f} | what torch.cuda.max_memory_allocated will show |",
              f"| {'needs on the card':<18} | {report['card_gib']:>7.2f} | + 5% fragmentation + 0.5 GiB CUDA context |", ""]
    from lorafit.model.memory_accuracy import accuracy_lines

    lines += [f"note: {n}" for n in report["notes"]] + accuracy_lines(report["accuracy"])
    if report["fits"] is None:
        lines.append("verdict: no GPU here; pass --gpu-memory (e.g. --gpu-memory 24GB) for a verdict")
    elif report["fits"]:
        lines.append(f"verdict: fits in {report['budget_gib']:.1f} GiB")
    else:
        lines.append(f"verdict: does NOT fit in {report['budget_gib']:.1f} GiB")
        change = report["suggestion"]
        if change is None:
            lines.append("no combination of the changes lorafit knows fits: use a smaller model or a larger GPU")
        else:
            lines.append(f"cheapest change that fits ({change['card_gib']:.2f} GiB on the card): "
                         + " ".join(f"--set {o}" for o in change["set"]))
            lines.append("  costs: " + "; ".join(change["costs"]))
    return "\n".join(lines)


@app.command("plan")
def plan_command(
    config: Path = typer.Argument(..., help="Config file."),
    overrides: Optional[List[str]] = SetOption,
    gpu_memory: Optional[str] = GpuMemoryOption,
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Processes (GPUs); default the config's "
                                        "distributed section, else 1."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="ddp (replicated), zero1, zero2, zero3 "
                                           "(or deepspeed_zero2/3) or fsdp (sharded); default the config's "
                                           "distributed section, else ddp."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of the table."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Re-tokenise the data instead of using the cache."),
) -> None:
    """Predict the peak GPU memory of a run without loading weights: the breakdown, whether it fits, and the
    cheapest change that makes it fit (docs/planner.md)."""
    starting(f"planning the memory of {config}")
    cfg = load_command_config(config, overrides)
    quiet_libraries()
    report = plan_report(cfg, gpu_memory=gpu_memory, nproc=nproc, strategy=strategy, use_cache=not no_cache)
    typer.echo(json.dumps(report, indent=2) if as_json else render_plan(report, str(config)))
