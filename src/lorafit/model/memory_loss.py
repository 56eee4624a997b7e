"""The memory planner's loss terms: the logits and the log-probabilities' float32 chunk, in a training step and in
the no-grad forwards (a reference pass, an evaluation batch). Pure arithmetic like model/memory_terms.py, which
adds them into a plan; docs/planner.md gives each formula and why.
"""

from __future__ import annotations

from lorafit.model.memory_terms import Setup, Shape, compute_bytes, stream_bytes


def _chunk_bytes(vocab: int, positions: int) -> int:
    """The one float32 chunk model/token_logprobs.py copies at a time (at most CHUNK_BYTES)."""
    from lorafit.model.token_logprobs import chunk_positions

    return 4 * vocab * min(positions, chunk_positions(vocab))


def _logit_bytes(setup: Setup) -> tuple[int, int]:
    """(bytes per logit the loss receives, extra bytes per logit while the model's forward converts them). In the
    run, bf16/fp16 autocast comes from accelerate, which converts the model's outputs to float32
    (``ConvertOutputsToFp32``): the loss gets float32 logits, and the compute-dtype logits are alive beside their
    copy until the forward returns (docs/design.md)."""
    c = compute_bytes(setup)
    if setup.fp32_outputs and c < 4:
        return 4, c
    return c, 0


def loss_bytes(shape: Shape, setup: Setup) -> int:
    """The loss's peak over the saved activations. Every objective's log-probabilities come from
    model/token_logprobs.py: its forward holds the logits and one float32 chunk; its backward holds the saved
    logits, their gradient (in the logits' dtype) and one float32 chunk (derived from the function's code; the CPU
    allocator's live bytes show it, tests/test_plan_objectives.py). Contrastive: the head runs on the 3n rows but
    the task loss on the n benign rows, and its forward holds every layer's hidden state (output_hidden_states)
    until the pooled vectors are taken. liger's fused linear cross-entropy (SFT only: the model computes the loss)
    never builds the logits: the hidden state's gradient. SFT's, DPO/ORPO/SimPO's and KTO's head runs on the
    labelled positions only (``head_tokens``, model/supervised_head.py), so their logits are that many rows."""
    tokens = setup.rows * setup.row_tokens
    c = compute_bytes(setup)
    if setup.liger and setup.objective == "sft":
        return 2 * c * shape.hidden * tokens
    logit, converting = _logit_bytes(setup)
    if setup.head_tokens is not None and setup.objective in ("sft", "preference", "kto"):
        tokens = setup.head_tokens  # the head runs on the labelled positions only (model/supervised_head.py)
    scored = tokens // 3 if setup.objective == "contrastive" else tokens
    chunk = _chunk_bytes(shape.vocab, scored)
    forward = shape.vocab * tokens * (logit + converting)
    forward = max(forward, shape.vocab * tokens * logit + chunk)
    if setup.objective == "contrastive":
        s = stream_bytes(setup)  # in fp32 the layers' outputs are the inputs the next norms saved: only the last is new
        forward += (shape.layers + 1 if s < 4 else 1) * s * shape.hidden * tokens
    backward = shape.vocab * (logit * tokens + logit * scored) + chunk  # saved logits + their gradient + a chunk
    if converting:  # the gradient converted back to the compute dtype, beside its float32 original
        backward = max(backward, shape.vocab * tokens * (logit + converting))
    return max(forward, backward)


def no_grad_forward_bytes(shape: Shape, setup: Setup, rows: int, row_tokens: int, *, adapters: bool,
                          head_tokens: int | None = None) -> int:
    """A forward under no_grad (DPO/KTO's reference pass, adapters off; an evaluation batch, adapters on): nothing
    is saved. Its peak is the logits and the log-probabilities' float32 chunk (model/token_logprobs.py), or one
    layer's working set: the MLP's gate, up and their product (and an adapter's output beside a base output), with
    four hidden-size tensors of the residual stream's dtype (its input, the attention's output, their sum, the
    norm's output), and with adapters on a bf16/fp16 stream peft's fp32 copy of the MLP's input. ``head_tokens``: the positions the head runs on (model/supervised_head.py), all
    of them when None. An estimate, within 20% of the CPU allocator's peak on the tiny model
    (tests/test_plan_objectives.py); not measured on a GPU."""
    c = compute_bytes(setup)
    tokens = rows * row_tokens
    scored = tokens if head_tokens is None else head_tokens
    logit, converting = _logit_bytes(setup)
    logits = max(shape.vocab * scored * (logit + converting), shape.vocab * scored * logit
                 + _chunk_bytes(shape.vocab, scored))
    s = stream_bytes(setup)
    cast = 4 * shape.hidden if adapters and s < 4 else 0  # peft's fp32 copy of a bf16/fp16 input for the adapters
    layer = ((4 if adapters else 3) * c * shape.intermediate + 4 * s * shape.hidden + cast) * tokens
    return max(logits, layer)
