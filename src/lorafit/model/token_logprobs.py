"""Token log-probabilities from logits, chunk by chunk: the one place lorafit turns logits into log p(token).

Every loss and score that needs log p(y_t) uses ``token_logprobs``: the supervised loss (when the model's fused
loss is off; ``causal_lm_loss`` is then also the model's own loss), the per-source loss, ``lorafit eval``'s loss,
DPO/ORPO/SimPO/KTO answer log-probabilities, the contrastive objective's task loss and GRPO's token
log-probabilities.

The float32 rule. Logits stay in the compute dtype (bf16 under mixed precision); one chunk of positions at a time
is copied to float32 (float64 stays float64), log p = x[target] - logsumexp(x) is taken on that copy in place, and
the copy is freed before the next chunk. A full float32 copy of (batch x tokens x vocabulary) never exists: 16.8 GB
at 16 x 2048 tokens and a 128k vocabulary, against ``CHUNK_BYTES`` here. Under autograd the backward pass does the
same (``_ChunkedLogprobs``): it keeps only the logits (already alive for the model's graph) and one float32 log-sum-exp
per position, and recomputes each chunk's softmax, so the backward makes no float32 copy either. Its one full-size
output is the gradient of the logits, in their own dtype, which any loss on those logits has.

Peak extra memory (on top of the logits and the (positions,) outputs): one float32 chunk, ``CHUNK_BYTES`` (64 MiB)
or ``chunk_tokens x vocabulary x 4`` bytes, plus a (chunk,) scratch. tests/test_token_logprobs.py measures it.

What the function cannot bound is a float32 copy made before it runs: accelerate's mixed precision converts the
prepared model's bf16/fp16 outputs to float32 (``ConvertOutputsToFp32``), so in lorafit's training loop the logits
arrive as float32 (docs/design.md, #20). ``lorafit eval`` has no accelerate and passes them in the model's dtype.

No host reads: chunk bounds come from shapes, ignored targets are masked with ``torch.where``; nothing calls
``.item()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.data.labels import IGNORE_INDEX

CHUNK_BYTES = 64 * 2**20  # one float32 chunk: 524 positions at a 32k vocabulary, 130 at 128k


def chunk_positions(vocab: int, chunk_tokens: int | None = None) -> int:
    """Positions per float32 chunk: ``chunk_tokens``, or as many as fit in ``CHUNK_BYTES``."""
    return max(1, chunk_tokens if chunk_tokens is not None else CHUNK_BYTES // (4 * max(vocab, 1)))


def _chunks(shape: torch.Size, size: int):
    """Index tuples over logits (B, T, V), each at most ``size`` positions: token windows of one row, or whole rows
    when a row is shorter than a chunk. Basic indexing only, so a chunk is a view of the logits (a strided view,
    e.g. ``logits[:, :-1]``, is then reshaped, a copy of that one chunk at most)."""
    rows, length = shape[0], shape[1]
    if length >= size:
        for b in range(rows):
            for t in range(0, length, size):
                yield (b, slice(t, min(t + size, length)))
    else:
        step = max(1, size // max(length, 1))
        for b in range(0, rows, step):
            yield (slice(b, min(b + step, rows)),)


def _float_copy(logits: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """One chunk's logits (positions, V) as a new float tensor, divided by the temperature: the one float copy."""
    x = logits.reshape(-1, logits.size(-1)).to(dtype, copy=True)
    return x.div_(temperature) if temperature != 1.0 else x


def _chunk_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, dtype: torch.dtype):
    """(log p(target), logsumexp) of one chunk, both (positions,). In place on the chunk's float copy (no second
    chunk-sized temporary, as torch.logsumexp would make), which is freed on return."""
    x = _float_copy(logits, dtype, temperature)
    picked = x.gather(-1, targets.reshape(-1, 1).clamp(min=0)).squeeze(-1)
    top = x.amax(-1, keepdim=True)
    top = torch.where(top.isfinite(), top, top.new_zeros(()))  # a row of -inf gives -inf, not nan
    lse = x.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))
    return picked - lse, lse


def _logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, size: int):
    """(log p of each target, 0 where ignored; the log-sum-exp of each position), both (B, T), chunk by chunk."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    out = torch.empty(logits.shape[:2], dtype=dtype, device=logits.device)
    lse = torch.empty(logits.shape[:2], dtype=dtype, device=logits.device)
    for index in _chunks(logits.shape, size):
        logps, sums = _chunk_logprobs(logits[index], targets[index], temperature, dtype)
        out[index] = logps.view(out[index].shape)
        lse[index] = sums.view(lse[index].shape)
    return torch.where(targets != IGNORE_INDEX, out, out.new_zeros(())), lse


class _ChunkedLogprobs(torch.autograd.Function):
    """log p of each target, its backward recomputing each chunk's softmax from the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, size):
        out, lse = _logprobs(logits, targets, temperature, size)
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature, ctx.size = temperature, size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):  # as in token_logprobs
            return _ChunkedLogprobs._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        # d log p(y) / d x = (onehot(y) - softmax(x)) / temperature; 0 for an ignored target
        grad_out = torch.where(targets != IGNORE_INDEX, grad_out, grad_out.new_zeros(()))
        grad = torch.empty_like(logits)
        for index in _chunks(logits.shape, ctx.size):
            x = _float_copy(logits[index], lse.dtype, ctx.temperature)
            g = grad_out[index].reshape(-1, 1).to(lse.dtype)
            x.sub_(lse[index].reshape(-1, 1)).exp_().mul_(-g)  # -g * softmax, in place on the chunk's copy
            x.scatter_add_(-1, targets[index].reshape(-1, 1).clamp(min=0), g)
            if ctx.temperature != 1.0:
                x.div_(ctx.temperature)
            grad[index] = x.view(grad[index].shape)
            del x  # before the next chunk's copy is made: one float copy alive at a time
        return grad, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   chunk_tokens: int | None = None) -> torch.Tensor:
    """log p(targets[..., t]) under softmax(logits[..., t, :] / temperature), at least float32, shaped like
    ``targets``; 0 where the target is ``IGNORE_INDEX`` (-100). ``logits`` (B, T, V) or (T, V) in any float dtype
    (left as it is: one chunk at a time is upcast, module docstring); ``targets`` (B, T) or (T,) aligned with the
    logits' positions (``next_token_targets`` shifts labels)."""
    if logits.dim() == 2:
        return token_logprobs(logits.unsqueeze(0), targets.unsqueeze(0), temperature=temperature,
                              chunk_tokens=chunk_tokens).squeeze(0)
    size = chunk_positions(logits.size(-1), chunk_tokens)
    targets = targets.to(logits.device)
    # Never under autocast: the float32 rule is this function's own, and autocast would make its in-place steps
    # (the gradient written into the logits' dtype) go through casting copies of whole chunks.
    with torch.autocast(logits.device.type, enabled=False):
        if torch.is_grad_enabled() and logits.requires_grad:
            return _ChunkedLogprobs.apply(logits, targets, float(temperature), size)
        with torch.no_grad():  # the same chunks without a graph (evaluation, reference model, rollouts)
            return _logprobs(logits, targets, float(temperature), size)[0]


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """The target at each position: position t predicts label t+1 (transformers' ``ForCausalLMLoss`` shift); the
    last position has none (``IGNORE_INDEX``)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def next_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each next label (B, T), 0 where unlabelled; the mask of labelled positions (B, T) bool)."""
    targets = next_token_targets(labels.to(logits.device))
    return token_logprobs(logits, targets, **options), targets != IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None = None, vocab_size: int | None = None,
                   num_items_in_batch=None, ignore_index: int = IGNORE_INDEX, shift_labels=None,
                   **kwargs) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (same arguments, same result up to float noise) on ``token_logprobs``:
    the summed next-token loss over ``num_items_in_batch``, or its mean over the labelled tokens without it."""
    targets = shift_labels if shift_labels is not None else next_token_targets(labels)
    targets = targets.to(logits.device)
    if ignore_index != IGNORE_INDEX:
        targets = torch.where(targets == ignore_index, IGNORE_INDEX, targets)
    total = -token_logprobs(logits, targets).sum()
    count = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(count):
        return total / count.to(total.device, total.dtype).clamp(min=1)
    return total / max(count, 1)


def use_causal_lm_loss(model) -> None:
    """Make ``causal_lm_loss`` the model's own loss (transformers' public ``loss_function`` setter), so that
    ``model(**batch, labels=...).loss`` anywhere (a plugin, a callback, a test) follows the same float32 rule as
    lorafit's objectives. ``model``: a transformers model, or a PeftModel / DDP wrapper around one; a model whose
    loss is not the causal-LM loss is left alone."""
    base = transformers_model(model)
    if getattr(base, "loss_type", None) == "ForCausalLM" and base.loss_function is not causal_lm_loss:
        base.loss_function = causal_lm_loss


def transformers_model(model):
    """The transformers model inside a DDP wrapper and a PeftModel (or ``model`` itself)."""
    base = getattr(model, "module", model)  # DDP
    return base.get_base_model() if hasattr(base, "get_base_model") else base  # peft
