"""``lorafit plan``: the peak GPU memory of a run predicted from its config, without loading any weight.

The model's sizes come from a meta-device model built from its config.json (shapes, no storage); the longest
micro-batch comes from the tokenised data (lorafit's data pipeline and its cache); the arithmetic is in
model/memory_terms.py. ``cheapest_fit`` re-runs the prediction for each change a user could make and returns
the one that fits at the least cost. docs/planner.md explains each term and its measured accuracy.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace

from lorafit.config import Config
from lorafit.errors import LorafitError
from lorafit.model.memory_rows import (HEAD_ON_LABELS, OBJECTIVE_LOSS, RowShape, evaluates, head_positions,
                                      micro_batch, rows_of, sdpa_gets_a_mask)
from lorafit.model.memory_terms import GIB, Linear, Plan, Setup, Shape, plan_bytes

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")


def meta_model(hf_config, *, trust_remote_code: bool = False):
    """The causal LM a transformers config describes, built on the meta device: every module and shape, no
    memory, no weights (the planner's shapes, and `config validate`'s check of lora.target_modules)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, AttributeError) as exc:
        raise LorafitError(f"cannot build a {type(hf_config).__name__} causal LM from its config.json",
                           why=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                           fix="lorafit needs a causal LM transformers knows (or model.trust_remote_code: true "
                               "for one that ships its code)") from None


def shape_from_config(hf_config, *, trust_remote_code: bool = False) -> Shape:
    """A ``Shape`` from a transformers config: the model is built on the meta device (no memory, no weights)."""
    import torch

    model = meta_model(hf_config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    linears = tuple(Linear(name, module.in_features, module.out_features) for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and module is not head)
    text = hf_config.get_text_config()
    heads = text.num_attention_heads
    return Shape(
        layers=text.num_hidden_layers, hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
        total_params=sum(p.numel() for p in model.parameters()), linears=linears,
        head_params=0 if head is None or tied else head.weight.numel(),
        gated_mlp=any(re.search(r"gate", l.name) for l in linears),
        model_type=getattr(hf_config, "model_type", "") or "",
    )


def read_hf_config(model_path: str, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LorafitError(f"{model_path}: cannot read the model's config.json", why=str(exc).splitlines()[0],
                           fix="point model.path at a folder with config.json") from None


def read_shape(model_path: str, *, trust_remote_code: bool = False) -> Shape:
    return shape_from_config(read_hf_config(model_path, trust_remote_code=trust_remote_code),
                             trust_remote_code=trust_remote_code)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a module name in target_modules


def adapted_linears(shape: Shape, target_modules) -> tuple[Linear, ...]:
    if target_modules == "all-linear":  # peft: every linear layer but the output head
        return shape.linears
    return tuple(l for l in shape.linears if any(_matches(l.name, t) for t in target_modules))


def _saved_params(shape: Shape, modules: list[str]) -> int:
    """Parameters of the modules_to_save copies; the output head and embeddings are not in ``linears``."""
    total = sum(l.params for l in shape.linears if any(_matches(l.name, m) for m in modules))
    if any(m in ("lm_head", "embed_out", "output") for m in modules):
        total += shape.head_params or shape.vocab * shape.hidden
    if any("embed" in m and m != "embed_out" for m in modules):
        total += shape.vocab * shape.hidden
    return total


@dataclass(frozen=True)
class PlanInput:
    """Everything the prediction depends on, so a change can be re-planned without re-reading anything."""

    shape: Shape
    setup: Setup
    lengths: tuple[int, ...]
    packing: str
    batch_size: int
    grad_accum: int
    max_seq_length: int
    target_modules: object = "all-linear"
    liger_possible: bool = False  # liger-kernel installed: worth proposing when the config does not use it
    rows_per_example: int = 1
    eval_lengths: tuple[int, ...] = ()  # the evaluation set's lengths (empty: no evaluation)
    eval_batch_size: int = 0  # eval.batch_size; 0: the training batch size (halved with it by cheapest_fit)
    supervised: tuple[int, ...] = ()  # RowShape.supervised

    def with_batch(self, batch_size: int, grad_accum: int, max_seq_length: int) -> "PlanInput":
        lengths = list(self.lengths)
        rows, tokens = micro_batch(lengths, packing=self.packing, batch_size=batch_size,
                                   max_seq_length=max_seq_length, rows_per_example=self.rows_per_example)
        masked = sdpa_gets_a_mask(self.packing, [min(n, max_seq_length) for n in lengths], rows, self.rows_per_example)
        eval_rows = eval_tokens = 0
        if self.eval_lengths:  # padded rows, as the evaluation collates them
            eval_rows, eval_tokens = micro_batch(list(self.eval_lengths), packing="none",
                                                 batch_size=self.eval_batch_size or batch_size,
                                                 max_seq_length=max_seq_length, rows_per_example=self.rows_per_example)
        head = head_positions(self.lengths, self.supervised, packing=self.packing, rows=rows, row_tokens=tokens,
                              max_seq_length=max_seq_length, rows_per_example=self.rows_per_example) \
            if self.setup.objective in HEAD_ON_LABELS else None
        setup = replace(self.setup, rows=rows, row_tokens=tokens, masked=masked, eval_rows=eval_rows,
                        packed=self.packing != "none", head_tokens=head,
                        eval_row_tokens=eval_tokens)
        return replace(self, setup=setup, batch_size=batch_size, grad_accum=grad_accum, max_seq_length=max_seq_length)


def planning_machine():
    """The machine a plan is for: this one when it has a GPU, else the GPU the run will use (model/resolved.py)."""
    from lorafit.model.attention import Machine

    here = Machine.current()
    return here if here.cuda else Machine.planned_gpu()


def resolved_for_plan(config: Config, model_type: str, machine=None):
    """``auto`` made concrete by the run's own resolver (model/resolved.py); an explicit choice is planned as
    asked (the run refuses it where it cannot run, with the reason)."""
    from lorafit.model.resolved import resolve_auto

    return resolve_auto(config.model, model_type, machine or planning_machine(), strict=False)


def distributed_of(config: Config, nproc: int | None, strategy: str | None) -> tuple[int, str]:
    """--nproc/--strategy, else the config's ``distributed:`` section when this lorafit has one."""
    section = getattr(config, "distributed", None)
    nproc = nproc or getattr(section, "nproc", None) or getattr(section, "num_processes", None) or 1
    strategy = strategy or getattr(section, "strategy", None) or "ddp"
    strategy = {"fsdp_full_shard": "fsdp", "deepspeed_zero3": "zero3", "deepspeed_zero2": "zero2",
                "deepspeed_zero1": "zero1", "none": "ddp"}.get(str(strategy), str(strategy))
    if strategy not in STRATEGIES:
        raise LorafitError(f"--strategy {strategy}: unknown", fix=f"use one of {', '.join(STRATEGIES)}")
    return int(nproc), strategy


def plan_input(config: Config, shape: Shape, lengths, *, nproc: int = 1, strategy: str = "ddp",
               device: str = "cuda", machine=None) -> PlanInput:
    """The prediction's input; ``lengths``: a ``RowShape`` (an objective's rows), or the examples' token counts
    (the rows of the config's objective, each example as long as its longest row). ``machine``: what ``auto``
    resolves for (default: this machine's GPU, else the GPU the run will use)."""
    d, t = config.data, config.train
    from lorafit.data.prepare import ROW_KINDS, row_kind

    kind, reference = OBJECTIVE_LOSS.get(config.objective.type, ("sft", False))
    per_example = ROW_KINDS[row_kind(config)].rows_per_example
    rows = lengths if isinstance(lengths, RowShape) else RowShape(per_example, tuple(lengths))
    evaluating = rows.evaluates or bool(rows.eval_lengths) or evaluates(config)
    from lorafit.model.quantization import mixed_precision

    resolved = resolved_for_plan(config, shape.model_type, machine)
    adapted = adapted_linears(shape, config.lora.target_modules)
    setup = Setup(dtype=resolved.dtype, quant_bits=config.quant.bits, double_quant=config.quant.double_quant,
                  adapted=adapted, rank=config.lora.r, dora=config.lora.use_dora,
                  dropout=0.0 if config.objective.dropout_off else config.lora.dropout,
                  saved_params=_saved_params(shape, config.lora.modules_to_save), optimizer=t.optimizer,
                  checkpointing=t.gradient_checkpointing, attention=resolved.attention,
                  liger=resolved.kernels == "liger", nproc=nproc, strategy=strategy, device=device,
                  objective=kind, reference=reference,
                  # the run's accelerate autocast converts the model's outputs to fp32
                  fp32_outputs=mixed_precision(config, resolved.dtype) is not None)
    from lorafit.model.kernels import liger_installed

    packing = d.packing if kind == "sft" else "none"  # pairs, answers and triplets are padded rows
    base = PlanInput(shape, setup, tuple(rows.lengths), packing, t.batch_size, t.grad_accum, d.max_seq_length,
                     config.lora.target_modules, liger_possible=liger_installed(),
                     rows_per_example=rows.rows_per_example,
                     eval_lengths=(rows.eval_lengths or rows.lengths) if evaluating else (),
                     eval_batch_size=config.eval.batch_size or 0, supervised=tuple(rows.supervised))
    return base.with_batch(t.batch_size, t.grad_accum, d.max_seq_length)


def row_shape(config: Config, *, use_cache: bool = True) -> RowShape:
    """The objective's rows, through the data entry (data/prepare.py) and cache a run uses: each training (and
    evaluation) example's longest row, and how many rows one example forwards (2 for a pair, 3 for a triplet)."""
    from lorafit.data import prepare, use_configured_template
    from lorafit.model.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(config.model, resolve_model_path(config.model))
    use_configured_template(tokenizer, config.data)
    kind = prepare.row_kind(config)
    prepared = prepare.prepare(config, tokenizer, kind=kind, use_cache=use_cache, enforce_audit=False)
    return rows_of(config, prepared, kind)


def plan_config(config: Config, *, nproc: int | None = None, strategy: str | None = None,
                lengths: list[int] | RowShape | None = None, use_cache: bool = True,
                device: str = "cuda", machine=None) -> tuple[PlanInput, Plan]:
    """The prediction for ``config`` (per device); ``lengths`` are the objective's rows (a ``RowShape``) or the
    training examples' token counts (read through the data entry when not given); ``machine``: what ``auto``
    resolves for (plan_input)."""
    from lorafit.model.loading import resolve_model_path

    shape = read_shape(resolve_model_path(config.model), trust_remote_code=config.model.trust_remote_code)
    nproc, strategy = distributed_of(config, nproc, strategy)
    lengths = lengths if lengths is not None else row_shape(config, use_cache=use_cache)
    inp = plan_input(config, shape, lengths, nproc=nproc, strategy=strategy, device=device, machine=machine)
    return inp, plan_bytes(inp.shape, inp.setup)


def parse_memory(text: str) -> int:
    """'6GB', '6 GiB', '24G', '8000MB', '6' (GiB) -> bytes. GB is read as GiB: cards are sold in binary units."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not match:
        raise LorafitError(f"--gpu-memory {text!r}: not a size", fix="write it like 6GB, 24GiB or 8000MB")
    value, unit = float(match.group(1)), match.group(2) or "gb"
    return int(value * (GIB if unit.startswith("g") else 2**20))


@dataclass(frozen=True)
class Change:
    """A config change the planner tried: its --set overrides, what it costs the run, and the new plan."""

    overrides: tuple[str, ...]
    cost: float
    costs: tuple[str, ...]
    plan: Plan


def _variants(inp: PlanInput):
    """Every combination of the changes a user can make, each with (overrides, cost, cost notes, input)."""
    s = inp.setup
    halvings = [h for h in range(8) if inp.batch_size >> h >= 1]
    cuts = sorted({inp.max_seq_length, *(_quantile(inp.lengths, q) for q in (0.99, 0.95, 0.9, 0.75))}, reverse=True)
    toggles = [
        ("train.gradient_checkpointing=true", 3.0, "~30% slower steps", not s.checkpointing,
         lambda st: replace(st, checkpointing=True)),
        ("train.optimizer=paged_adamw_8bit", 1.0, "8-bit optimizer states", s.optimizer == "adamw",
         lambda st: replace(st, optimizer="paged_adamw_8bit")),
        ("quant.bits=4", 5.0, "4-bit base: slower, small quality loss", s.quant_bits is None,
         lambda st: replace(st, quant_bits=4)),
        ("model.kernels=liger", 0.5, "liger's fused kernels (CUDA only)", inp.liger_possible and not s.liger,
         lambda st: replace(st, liger=True)),
    ]
    usable = [t for t in toggles if t[3]]
    for chosen in itertools.product([False, True], repeat=len(usable)):
        for h in halvings:
            for cut in cuts:
                batch, accum = inp.batch_size >> h, inp.grad_accum << h
                changed = inp.with_batch(batch, accum, cut)
                setup, overrides, cost, notes = changed.setup, [], 0.0, []
                for on, (override, price, note, _, apply) in zip(chosen, usable):
                    if on:
                        setup, cost = apply(setup), cost + price
                        overrides.append(override)
                        notes.append(note)
                if h:
                    overrides += [f"train.batch_size={batch}", f"train.grad_accum={accum}"]
                    cost += 1.5 * h
                    notes.append(f"same effective batch, {batch} per step")
                if cut < inp.max_seq_length:
                    lost = sum(n > cut for n in inp.lengths)
                    overrides.append(f"data.max_seq_length={cut}")
                    cost += 8.0 + 20.0 * lost / max(len(inp.lengths), 1)
                    notes.append(f"{lost} of {len(inp.lengths)} examples longer than {cut} tokens")
                yield tuple(overrides), cost, tuple(notes), replace(changed, setup=setup)


def _quantile(lengths, q: float) -> int:
    ordered = sorted(lengths)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))] if ordered else 1


def cheapest_fit(inp: PlanInput, budget: int) -> Change | None:
    """The change (or combination) that fits ``budget`` bytes on the card at the least cost; None if the config
    fits as it is, or if nothing lorafit can change makes it fit."""
    if plan_bytes(inp.shape, inp.setup).card <= budget:
        return None
    best = None
    for overrides, cost, notes, changed in _variants(inp):
        if not overrides or (best is not None and cost >= best.cost):
            continue
        plan = plan_bytes(changed.shape, changed.setup)
        if plan.card <= budget:
            best = Change(overrides, cost, notes, plan)
    return best
