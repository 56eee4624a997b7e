"""model/token_logprobs.py: the one token log-probability function. Values against float64 cross-entropy, bf16
against upcast-then-compute, gradients against autograd, no host reads, and its peak extra memory measured.

How the memory is measured. tracemalloc does not see torch's CPU tensors: it traces Python's own allocator, and
torch allocates tensor storage with its C++ allocator (a 64 MiB tensor shows as 480 bytes in tracemalloc). So each
measurement runs in a fresh subprocess that reads its peak resident memory from the kernel: VmHWM in
/proc/self/status, reset to the current RSS by writing 5 to /proc/self/clear_refs just before the call. Allocations
of chunk size are mmapped by glibc and returned on free, so the high-water mark is what the call really held.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorafit.model.token_logprobs import (CHUNK_BYTES, causal_lm_loss, chunk_positions, next_token_logprobs,
                                          token_logprobs)

SRC = Path(__file__).resolve().parent.parent / "src"


def _random(shape, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    logits = (torch.randn(*shape, dtype=torch.float64) * 4).to(dtype)
    targets = torch.randint(0, shape[-1], shape[:-1])
    targets[0, :3] = -100  # masked tokens: a prompt, and padding at the end of the last row
    targets[-1, -4:] = -100
    return logits, targets


def _reference(logits, targets, temperature=1.0):
    """log p in float64 by the textbook route: -cross_entropy, 0 where ignored."""
    return -F.cross_entropy((logits.double() / temperature).transpose(1, 2), targets, ignore_index=-100,
                            reduction="none")


@pytest.mark.parametrize("chunk_tokens", [1, 5, 16, 64, None])  # token windows, whole rows, the default budget
def test_values_equal_float64_cross_entropy_for_every_chunking(chunk_tokens):
    logits, targets = _random((3, 16, 50))
    got = token_logprobs(logits, targets, chunk_tokens=chunk_tokens)
    assert got.dtype == torch.float64 and got.shape == targets.shape
    torch.testing.assert_close(got, _reference(logits, targets), rtol=0, atol=1e-6)
    assert (got[targets == -100] == 0).all() and (got[targets != -100] < 0).all()
    # float32 logits: float32 arithmetic, still within 1e-6 of float64 per token at these magnitudes (|log p| < 20)
    got32 = token_logprobs(logits.float(), targets, chunk_tokens=chunk_tokens)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), _reference(logits, targets), rtol=0, atol=1e-5)


def test_bf16_logits_give_what_upcasting_them_first_gives():
    logits, targets = _random((2, 40, 300), dtype=torch.bfloat16)
    got = token_logprobs(logits, targets, chunk_tokens=7)
    assert got.dtype == torch.float32  # upcast chunk by chunk, never computed in bf16
    torch.testing.assert_close(got, token_logprobs(logits.float(), targets, chunk_tokens=1000), rtol=0, atol=1e-6)
    torch.testing.assert_close(got.double(), _reference(logits.float(), targets), rtol=0, atol=1e-5)


def test_temperature_and_a_strided_view():
    logits, targets = _random((3, 12, 20))
    for temperature in (0.7, 1.3):
        got = token_logprobs(logits[:, :-1], targets[:, :-1], temperature=temperature, chunk_tokens=4)
        torch.testing.assert_close(got, _reference(logits, targets, temperature)[:, :-1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_tokens,temperature", [(3, 1.0), (100, 0.6)])
def test_gradient_equals_autograd_through_cross_entropy(chunk_tokens, temperature):
    """The chunked backward recomputes each chunk's softmax from the saved log-sum-exp: same gradient as
    autograd through the full float64 cross-entropy, ignored targets included."""
    logits, targets = _random((3, 10, 17))
    weights = torch.randn(3, 10, dtype=torch.float64)
    mine = logits.clone().requires_grad_()
    (token_logprobs(mine, targets, temperature=temperature, chunk_tokens=chunk_tokens) * weights).sum().backward()
    theirs = logits.clone().requires_grad_()
    (_reference(theirs, targets, temperature) * weights).sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-12)
    assert (mine.grad[targets == -100] == 0).all()
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, targets[:, :4] % 6, chunk_tokens=2, temperature=0.5),
                                    (logits[:, :4, :6].clone().requires_grad_(),))


def test_next_token_shift_and_the_models_loss_match_transformers():
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, labels = _random((2, 9, 30))
    logps, mask = next_token_logprobs(logits, labels)
    assert mask[:, -1].sum() == 0 and torch.equal(mask[:, :-1], labels[:, 1:] != -100)
    torch.testing.assert_close(logps[:, :-1], _reference(logits[:, :-1], labels[:, 1:]), rtol=0, atol=1e-12)
    for items in (None, torch.tensor(40)):
        ours = causal_lm_loss(logits, labels, 30, num_items_in_batch=items)
        theirs = ForCausalLMLoss(logits.float(), labels, 30, num_items_in_batch=items)  # transformers upcasts to fp32
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_no_host_reads(monkeypatch):
    """Nothing converts a tensor to a Python value (a device sync on a GPU), forward or backward."""
    seen = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        def counted(t, *a, _o=getattr(torch.Tensor, name), _n=name, **k):
            seen.append(_n)
            return _o(t, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    logits, targets = _random((2, 20, 40))
    logits.requires_grad_()
    token_logprobs(logits, targets, chunk_tokens=6, temperature=0.9).sum().backward()
    next_token_logprobs(logits.detach(), targets)
    assert seen == []


def test_the_default_chunk_is_a_byte_budget():
    assert chunk_positions(32_000) == CHUNK_BYTES // (4 * 32_000) == 524
    assert chunk_positions(128_256) == 130 and chunk_positions(10**9) == 1 and chunk_positions(50, 7) == 7


MEASURE = r"""
import json, sys, torch
import torch.nn.functional as F
from lorafit.model.token_logprobs import token_logprobs
torch.set_num_threads(1)
mode, (B, T, V) = sys.argv[1], (4, 512, 32_000)
torch.manual_seed(0)
logits = torch.empty(B, T, V, dtype=torch.bfloat16).normal_(0, 4)  # in place: no float32 temporary before the mark
targets = torch.randint(0, V, (B, T))
targets[:, :16] = -100
grad = mode.endswith("backward")
if grad:
    logits.requires_grad_()
token_logprobs(torch.randn(2, 3, 5, requires_grad=grad), torch.zeros(2, 3, dtype=torch.long)).sum()  # warm up

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = status("VmRSS")
if mode.startswith("chunked"):
    out = token_logprobs(logits, targets)
else:  # the rule this replaces: the whole batch upcast at once (answer_logps, lorafit eval)
    full = logits.float()
    out = full.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(full, -1)
    del full
if grad:
    out.sum().backward()
print(json.dumps({"peak": status("VmHWM") - before, "full_copy": B * T * V * 4,
                  "grad": logits.grad.nelement() * logits.grad.element_size() if grad else 0}))
"""


def _measure(mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, mode], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_peak_extra_memory_is_one_float32_chunk_not_a_full_copy():
    """4 x 512 tokens x 32k vocabulary in bf16 (the logits: 125 MiB; a float32 copy: 250 MiB). The chunked
    function's peak extra memory stays near one chunk (CHUNK_BYTES, 64 MiB); the whole-batch upcast it replaces
    holds the full copy and logsumexp's temporaries on top. With a backward pass the peak beyond the gradient of
    the logits (bf16, which any loss on them makes) is again about one chunk."""
    chunked, full = _measure("chunked"), _measure("full")
    mib = 2**20
    print(f"peak extra: chunked {chunked['peak'] / mib:.1f} MiB, whole-batch upcast {full['peak'] / mib:.1f} MiB, "
          f"full float32 copy {chunked['full_copy'] / mib:.1f} MiB")
    assert full["peak"] >= chunked["full_copy"]  # the measurement sees a full copy when there is one
    assert chunked["peak"] <= 1.25 * CHUNK_BYTES + 8 * mib
    assert chunked["peak"] < chunked["full_copy"] / 3
    backward = _measure("chunked_backward")
    print(f"with backward: {backward['peak'] / mib:.1f} MiB, of which the logits' gradient "
          f"{backward['grad'] / mib:.1f}")
    assert backward["peak"] - backward["grad"] <= 1.25 * CHUNK_BYTES + 8 * mib


def test_eval_loss_reads_the_device_once_and_equals_each_example_alone(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """``lorafit eval``'s per-example losses (evaluate/loss.py): no ``.item()`` per row, one read at the end, and
    each example's summed NLL equal to that example scored alone in float64."""
    from conftest import conversation
    from transformers import AutoModelForCausalLM

    from lorafit.data import TokenizedDataset
    from lorafit.data.labels import tokenize_conversation
    from lorafit.data.sources import Example
    from lorafit.evaluate.loss import example_losses

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    tokenised = [tokenize_conversation(tiny_tokenizer, conversation("Repeat: " + "alpha beta " * (1 + i),
                                                                    "alpha " * (1 + 2 * i))["messages"])
                 for i in range(5)]
    examples = [Example(t.input_ids, t.labels, f"row {i}", str(i)) for i, t in enumerate(tokenised)]
    reads = []
    for name in ("item", "tolist", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(t, *a, _o=original, _n=name, **k):
            import traceback

            if traceback.extract_stack()[-2].filename.endswith("evaluate/loss.py"):
                reads.append(_n)
            return _o(t, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    losses = example_losses(model, TokenizedDataset(examples), batch_size=2, pad_token_id=tiny_tokenizer.pad_token_id)
    monkeypatch.undo()
    assert reads == ["tolist", "tolist"]  # the sums and the counts, once, after the last batch
    for example, (nll, count) in zip(examples, losses):
        labels = torch.tensor([example.labels])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example.input_ids])).logits
        expected = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        assert count == int((labels[0, 1:] != -100).sum()) > 0
        assert nll == pytest.approx(float(expected), rel=1e-9)


def test_the_supervised_loss_keeps_a_mixture_of_experts_router_loss():
    """SFT calls the model without labels and takes the loss from the logits; a mixture of experts with
    ``output_router_logits`` adds its router balance loss to its own loss, and so does the objective."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from lorafit.training.objectives import StepTotals, SupervisedObjective

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.5))
    ids = torch.randint(0, 60, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        loss, _ = SupervisedObjective().compute(model, batch, StepTotals(tokens=None, examples=None))
        own = model(**batch)
        plain = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels, output_router_logits=False)
    assert own.aux_loss is not None and float(own.aux_loss) > 0.1  # the router term is there and not negligible
    assert float(loss) == pytest.approx(float(own.loss), rel=1e-6)
    assert float(loss) == pytest.approx(float(plain.loss) + 0.5 * float(own.aux_loss), rel=1e-6)
