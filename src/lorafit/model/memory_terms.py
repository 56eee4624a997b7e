"""The memory planner's arithmetic: bytes of each term of a training step's peak GPU memory, from shapes alone.

Pure arithmetic on a ``Shape`` (what the model config says) and a ``Setup`` (what the run config asks for), so
every term can be checked by hand and by a test against a real tiny model. docs/planner.md gives each formula
and why; the activation terms were derived by listing the tensors autograd saves in one decoder layer
(torch.autograd.graph.saved_tensors_hooks), the loss's peak by the CPU allocator's live bytes (torch.profiler);
tests/test_plan.py and tests/test_plan_objectives.py check them on CPU. No constant here is fitted to a GPU run:
what was measured on a GPU, and how well, is model/memory_accuracy.py.
No torch import here: ``lorafit plan`` answers before any model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

GIB = 2**30
# Outside torch.cuda.max_memory_allocated but on the card: the CUDA context and cuBLAS/cuDNN handles (~0.5 GiB
# on recent drivers), and blocks the caching allocator holds but cannot reuse (fragmentation). Both are
# estimates, not derived and not measured on held-out runs: they move "needs on the card", never the peak.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
FRAGMENTATION = 0.05
# bitsandbytes quantizes in blocks of 64 weights: one fp32 absmax per block, or with double quantization one
# 8-bit absmax per block plus one fp32 scale per 256 absmax values.
NF4_BLOCK = 64
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Linear:
    name: str  # full module name, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class Shape:
    """A causal LM's sizes, read from its config (a meta-device model: no weights)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    total_params: int  # every parameter, the output head included (once if tied)
    linears: tuple[Linear, ...]  # every nn.Linear but the output head
    head_params: int  # the output head (0 when tied to the input embeddings)
    gated_mlp: bool = True  # SwiGLU-style gate * up (Llama, Mistral, Qwen); False: one activation input
    model_type: str = ""  # transformers' model_type: whether liger has kernels for it (model/kernels.py)

    @property
    def linear_params(self) -> int:
        return sum(linear.params for linear in self.linears)


@dataclass(frozen=True)
class Setup:
    """What the run config decides about memory; every field maps to a config key (memory_plan.setup_of)."""

    dtype: str = "bf16"  # model.dtype, resolved
    quant_bits: int | None = None
    double_quant: bool = True
    adapted: tuple[Linear, ...] = ()  # the linears LoRA wraps
    rank: int = 16
    dropout: float = 0.0
    dora: bool = False
    saved_params: int = 0  # modules_to_save: parameters of the trained copies
    optimizer: str = "adamw"
    checkpointing: bool = False
    attention: str = "sdpa"  # resolved: sdpa, flash_attention_2/3, flex_attention, eager
    masked: bool = True  # sdpa gets a 4-D mask (padded rows, packed rows): GQA keys/values expanded, a bias per layer
    packed: bool = False  # packed rows (the mask is block-diagonal; same bytes as a padding mask)
    liger: bool = False
    rows: int = 1  # rows per micro-batch, every row of it (2 per preference pair, 3 per contrastive triplet)
    row_tokens: int = 512  # tokens per row (the longest micro-batch's)
    head_tokens: int | None = None  # SFT, DPO/ORPO/SimPO, KTO: positions the head runs on (the labelled ones)
    objective: str = "sft"  # sft, preference (dpo/orpo/simpo), kto, contrastive: what the loss keeps (loss_bytes)
    reference: bool = False  # a no-grad reference forward of the micro-batch before the policy's (dpo, kto)
    fp32_outputs: bool = False  # accelerate's autocast converts the model's outputs to fp32 (the run, bf16/fp16)
    eval_rows: int = 0  # the evaluation batch, a no-grad forward between steps (0: the run does not evaluate)
    eval_row_tokens: int = 0
    nproc: int = 1
    strategy: str = "ddp"  # ddp, zero1, zero2, zero3, fsdp
    device: str = "cuda"  # where it runs: dropout keeps a 1-byte mask on CUDA, a mask in the input's dtype on a CPU


@dataclass
class Plan:
    """Each term in bytes (per device), the peak, and what the card must hold."""

    terms: dict[str, int] = field(default_factory=dict)  # the training step's peak, term by term
    phases: dict[str, int] = field(default_factory=dict)  # other moments' whole peaks (reference forward, eval batch)
    notes: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return sum(self.terms.values())

    @property
    def peak(self) -> int:
        """Predicted torch.cuda.max_memory_allocated: the training step's, or a no-grad phase's when larger."""
        return max(self.step, *self.phases.values()) if self.phases else self.step

    @property
    def card(self) -> int:
        """What the card must have free: the peak plus allocator fragmentation plus the CUDA context."""
        return int(self.peak * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES

    def as_dict(self) -> dict:
        return {"terms_gib": {k: round(v / GIB, 3) for k, v in self.terms.items()},
                "phases_gib": {k: round(v / GIB, 3) for k, v in self.phases.items()},
                "step_gib": round(self.step / GIB, 3), "peak_gib": round(self.peak / GIB, 3),
                "card_gib": round(self.card / GIB, 3), "notes": list(self.notes)}


def compute_bytes(setup: Setup) -> int:
    """Bytes of an element the matmuls produce: autocast runs bf16/fp16 (the quantized layers' compute dtype)."""
    return 2 if setup.quant_bits or setup.dtype in ("bf16", "fp16") else 4


def stream_bytes(setup: Setup) -> int:
    """Bytes of an element of the residual stream. peft's k-bit preparation casts the embeddings to fp32 and
    bitsandbytes layers return their input's dtype, so a quantized base carries fp32 hidden states."""
    return 4 if setup.quant_bits or setup.dtype == "fp32" else 2


def base_weight_bytes(shape: Shape, setup: Setup) -> int:
    other = shape.total_params - shape.linear_params  # embeddings, norms, the output head
    if setup.quant_bits is None:
        return shape.total_params * DTYPE_BYTES[setup.dtype]
    if setup.quant_bits == 8:  # int8 weights and one fp32 scale per output row
        quantized = sum(l.params + 4 * l.out_features for l in shape.linears)
    else:
        per_block = 1 + 4 / 256 if setup.double_quant else 4
        quantized = sum(l.params // 2 + int(l.params / NF4_BLOCK * per_block) for l in shape.linears)
    return quantized + 4 * other  # prepare_model_for_kbit_training upcasts what is not quantized to fp32


def adapter_params(setup: Setup) -> int:
    lora = sum(setup.rank * (l.in_features + l.out_features) for l in setup.adapted)
    magnitude = sum(l.out_features for l in setup.adapted) if setup.dora else 0
    return lora + magnitude


def adapter_tensors(setup: Setup) -> int:
    return len(setup.adapted) * (3 if setup.dora else 2)  # lora_A, lora_B (and DoRA's magnitude) per module


def trainable_bytes(setup: Setup) -> tuple[int, int]:
    """(adapter bytes, modules_to_save bytes). peft keeps adapters in fp32 (autocast_adapter_dtype) whatever
    the base dtype; a trained copy keeps its module's dtype (fp32 after k-bit preparation)."""
    saved_bytes = 4 if setup.quant_bits else DTYPE_BYTES[setup.dtype]
    return 4 * adapter_params(setup), saved_bytes * setup.saved_params


def optimizer_bytes(setup: Setup) -> int:
    """AdamW: two states per trainable value, in the parameter's dtype. 8-bit AdamW: one byte per state plus
    an fp32 absmax per 2048-value block (bitsandbytes), tensors under 4096 values stay fp32. SGD (no momentum): 0."""
    adapters, saved = trainable_bytes(setup)
    if setup.optimizer == "sgd":
        return 0
    if setup.optimizer == "paged_adamw_8bit":
        values = adapter_params(setup) + setup.saved_params
        return 2 * values + 2 * 4 * (values // 2048 + 1)
    return 2 * (adapters + saved) + 4 * adapter_tensors(setup)  # torch's AdamW: an fp32 step count per tensor


# Linears that read the same tensor: with no cast and no dropout between, their adapters save it once.
SHARED_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"w1", "w3"})
# The output projection reads the attention kernel's output, which the kernel keeps anyway (same storage).
READS_ATTENTION_OUTPUT = ("o_proj",)


_FIRST_GROUP = ("k_proj,q_proj,v_proj", "query_key_value", "c_attn")


def _input_key(name: str) -> tuple[str, str]:
    parent, _, leaf = name.rpartition(".")
    group = next((",".join(sorted(g)) for g in SHARED_INPUT if leaf in g), leaf)
    return parent, group


def lora_bytes_per_token(setup: Setup) -> int:
    """Per token, what each adapted linear saves: its own cast copy of the input (autocast casts peft's fp32
    copy back to the compute dtype), the rank-r output of lora_A, a 1-byte dropout mask, DoRA's two outputs.
    In fp32 without dropout nothing is copied: q/k/v (and gate/up) adapters keep the one input they share."""
    c = compute_bytes(setup)
    shared = c == 4 and setup.dropout == 0 and not setup.quant_bits
    mask = 1 if setup.device == "cuda" else 4  # torch fuses dropout (bool mask) on CUDA only; peft's copy is fp32
    seen: set[tuple[str, str]] = set()
    total = 0
    for l in setup.adapted:
        key = _input_key(l.name)
        if not (shared and (key in seen or key[1] in READS_ATTENTION_OUTPUT)):
            total += c * l.in_features
        seen.add(key)
        total += c * setup.rank
        # The first layer's q/k/v read the embeddings' norm: no gradient flows there in a full-precision base
        # (a k-bit base has input gradients on), so dropout keeps no mask for them.
        no_grad_input = not setup.quant_bits and re.search(r"\.0\.", l.name) and key[1] in _FIRST_GROUP
        if setup.dropout > 0 and not no_grad_input:
            total += mask * l.in_features
        if setup.dora:
            total += 2 * c * l.out_features
    return total


def attention_bytes_per_token(shape: Shape, setup: Setup) -> int:
    """What one attention call saves per token: q, k, v, the output and the fp32 log-sum-exp per head.
    sdpa with a mask (padded rows, packed rows: memory_rows.sdpa_gets_a_mask cites where transformers decides)
    expands GQA keys/values to every head (transformers/integrations/sdpa_attention.py:repeat_kv) and keeps the
    mask as an additive bias in the compute dtype, row_tokens per token, per layer (torch converts the boolean mask
    in each call); eager keeps the fp32 and cast probabilities. Exact on CPU: tests/test_plan_objectives.py."""
    c = compute_bytes(setup)
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    lse = 4 * shape.heads
    if setup.attention == "eager":
        return c * 3 * q + (4 + c) * shape.heads * setup.row_tokens
    if setup.attention == "sdpa" and setup.masked:
        return c * 4 * q + lse + c * setup.row_tokens
    return c * (2 * q + 2 * kv) + lse


def layer_bytes_per_token(shape: Shape, setup: Setup, *, first: bool = False) -> int:
    """One decoder layer's saved tensors per token, LoRA copies excluded (lora_bytes_per_token).

    RMSNorm keeps its fp32 input and the fp32 reciprocal RMS (liger's keeps the input and the RMS only); the
    first layer's input norm keeps nothing for a full-precision base (no gradient flows into the embeddings;
    a k-bit base has input gradients on). The gated MLP keeps the gate, SiLU(gate) and up (liger's SwiGLU
    recomputes SiLU)."""
    s = stream_bytes(setup)
    norm = (s * shape.hidden + 4) if setup.liger else (4 * shape.hidden + 4)
    norms = norm * (1 if first and not setup.quant_bits else 2)
    mlp_saved = (2 if setup.liger else 3) if shape.gated_mlp else 1
    return norms + attention_bytes_per_token(shape, setup) + mlp_saved * s * shape.intermediate


def dora_norm_bytes(setup: Setup) -> int:
    """DoRA (peft's DoraLinearLayer.forward) builds each adapted layer's weight norm ||W + s BA|| from a dense
    B @ A (fp32), its cast, and the sum: a transient of the largest adapted weight, (4 + 2c) bytes per value. The
    norm itself is kept per layer (dora_saved_bytes)."""
    c = compute_bytes(setup)
    return (4 + 2 * c) * max((l.params for l in setup.adapted), default=0)


def adapter_forward_bytes(setup: Setup) -> int:
    """What the forward of an adapted linear holds for a moment beyond what it returns and autograd keeps, for the
    largest over the adapted linears (tokens of the longest micro-batch). The peak of a step is this or the loss,
    whichever is larger (plan_bytes): a step whose head runs on few supervised positions (model/supervised_head.py)
    can peak here. c: the compute dtype's bytes.

    LoRA, from peft's Linear.forward, ``result = result + lora_B(lora_A(x)) * scaling``: the base output and the
    scaled adapter output are alive while their sum is made (2c per output feature), and ``_cast_input_dtype``
    copies a bf16/fp16 input to the adapters' fp32 (peft's autocast_adapter_dtype) until the layer returns (4 per
    input feature).

    DoRA, from peft's DoraLinearLayer.forward, (m/||W|| - 1) * base + m/||W|| * lora * scaling with the fp32
    magnitude m: its products are fp32, two alive at once (8 per output feature), and under bf16/fp16 their sum is
    cast back (c more) beside the same input copy. Weight-sized, once per layer: the identity it builds to get
    B @ A and the adapter weight (c x in^2 + c x in x out in fp32), or, under bf16/fp16, the weight norm's transient
    (dora_norm_bytes) beside the identity's cast. Both measured on a CPU for peft 0.21, exact to 1%
    (tests/test_plan_objectives.py)."""
    if not setup.adapted:
        return 0
    c = compute_bytes(setup)
    low = c < 4
    cast = 4 if stream_bytes(setup) < 4 else 0
    tokens = setup.rows * setup.row_tokens

    def one(layer: Linear) -> int:
        if not setup.dora:
            return (2 * c * layer.out_features + cast * layer.in_features) * tokens
        per_token = (8 + (c if low else 0)) * layer.out_features + cast * layer.in_features
        weights = c * layer.in_features ** 2 + ((4 + 2 * c) if low else c) * layer.params
        return per_token * tokens + weights

    return max(one(layer) for layer in setup.adapted)


def dora_saved_bytes(setup: Setup) -> int:
    """What DoRA saves per adapted layer and forward, whatever the tokens: the detached weight norm (kept by the
    division magnitude / norm), the scale and the scale - 1 (kept by the output's two products); out_features fp32
    values each (the magnitude is an fp32 adapter weight)."""
    return 3 * 4 * sum(l.out_features for l in setup.adapted) if setup.dora else 0


def saved_activation_bytes(shape: Shape, setup: Setup) -> int:
    """Every tensor autograd keeps for the backward of the longest micro-batch, without checkpointing: the
    decoder layers, the LoRA copies, the final norm, and the adapter weights autocast cast to the compute dtype
    (one copy per module per forward). The loss's own tensors are the logits term."""
    tokens = setup.rows * setup.row_tokens
    layers = sum(layer_bytes_per_token(shape, setup, first=i == 0) for i in range(shape.layers))
    final_norm = 4 * shape.hidden + 4
    cast_weights = compute_bytes(setup) * adapter_params(setup) if compute_bytes(setup) < 4 else 0
    return ((layers + lora_bytes_per_token(setup) + final_norm) * tokens + cast_weights + head_cast_bytes(shape, setup)
            + dora_saved_bytes(setup))


def head_cast_bytes(shape: Shape, setup: Setup) -> int:
    """A k-bit base keeps the output head in fp32 (peft's k-bit preparation): autocast casts it for the matmul, and
    the matmul keeps that copy for the gradient of its input (liger's fused loss takes the head itself)."""
    c = compute_bytes(setup)
    return c * shape.vocab * shape.hidden if setup.quant_bits and c < 4 and not setup.liger else 0


def activation_terms(shape: Shape, setup: Setup) -> dict[str, int]:
    """Activations and logits at the step's peak, for the longest micro-batch."""
    from lorafit.model.memory_loss import loss_bytes

    tokens = setup.rows * setup.row_tokens
    logits = loss_bytes(shape, setup)
    if setup.checkpointing:
        # Non-reentrant checkpointing keeps each layer's input; the loss backward runs first, then one layer at a
        # time is recomputed (its activations and their gradients), so the larger of the two sets the peak. The
        # recomputed layer's gradients are bounded by its activations (2 x): an upper bound, +35% to +55% over the
        # CPU allocator's peak where the layer outweighs the loss (the tiny model); large vocabularies make the
        # loss the peak and this term 0 (tests/test_plan_objectives.py).
        kept = shape.layers * stream_bytes(setup) * shape.hidden * tokens
        one_layer = 2 * (layer_bytes_per_token(shape, setup) + lora_bytes_per_token(setup) // max(shape.layers, 1)) * tokens
        activations = kept + (4 * shape.hidden + 4) * tokens + head_cast_bytes(shape, setup) + max(one_layer - logits, 0)
    else:
        activations = saved_activation_bytes(shape, setup)
    return {"activations": int(activations), "logits": logits}


def plan_bytes(shape: Shape, setup: Setup) -> Plan:
    """Every term of the peak, per device, with DDP replication or ZeRO/FSDP sharding over ``nproc``."""
    plan = Plan()
    adapters, saved = trainable_bytes(setup)
    shard = setup.nproc if setup.nproc > 1 else 1
    weights = base_weight_bytes(shape, setup)
    grads = adapters + saved
    states = optimizer_bytes(setup)
    if setup.strategy in ("zero3", "fsdp") and shard > 1:
        # Fully sharded: each device keeps 1/N of everything and gathers one layer's weights at a time.
        weights = weights // shard + weights // max(shape.layers, 1)
        adapters, saved = adapters // shard, saved // shard
    if setup.strategy in ("zero2", "zero3", "fsdp") and shard > 1:
        grads //= shard
    if setup.strategy != "ddp" and shard > 1:
        states //= shard
    plan.terms["base weights"] = weights
    plan.terms["adapters"] = adapters + saved
    plan.terms["gradients"] = grads
    if setup.strategy == "ddp" and shard > 1:
        plan.terms["gradients"] += adapters + saved  # DDP's bucket copy of every gradient for the all-reduce
        plan.notes.append(f"DDP over {shard} devices: weights, adapters and optimizer states replicated on each")
    plan.terms["optimizer states"] = states
    plan.terms.update(activation_terms(shape, setup))
    # RoPE cos/sin: one table per row for packed rows (their position_ids), one shared by padded rows
    # in the residual stream's dtype (fp32 for a k-bit base: RoPE casts its tables to the hidden states' dtype)
    rope_rows = setup.rows if setup.packed else 1
    plan.terms["buffers"] = 2 * stream_bytes(setup) * shape.head_dim * setup.row_tokens * rope_rows
    # an adapted linear's forward transient comes before the loss allocates anything: the larger one is the peak
    plan.terms["buffers"] += max(adapter_forward_bytes(setup) - plan.terms["logits"], 0)
    static = sum(v for k, v in plan.terms.items() if k not in ("activations", "logits", "buffers"))
    from lorafit.model.memory_loss import no_grad_forward_bytes

    if setup.reference:  # before the policy's forward (training/preference.py): no activation is held yet
        plan.phases["reference pass"] = static + no_grad_forward_bytes(shape, setup, setup.rows, setup.row_tokens,
                                                                       adapters=False, head_tokens=setup.head_tokens)
    if setup.eval_rows:
        plan.phases["eval batch"] = static + no_grad_forward_bytes(shape, setup, setup.eval_rows,
                                                                   setup.eval_row_tokens, adapters=True)
    if setup.optimizer == "paged_adamw_8bit":
        plan.notes.append("paged 8-bit AdamW: its states live in unified memory and move to the CPU under pressure")
    return plan
