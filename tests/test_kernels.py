"""model.kernels (liger-kernel): off where it cannot run, a clear error when asked for there, and on the GPU the
fused path's loss and gradients equal the plain path's within bf16 tolerance (skipped without CUDA + liger)."""

from __future__ import annotations

import pytest
import torch

from lorafit.config import LoraConfig, ModelConfig
from lorafit.errors import LorafitError
from lorafit.model.kernels import LIGER_MARK, apply_kernels, liger_installed, resolve_kernels
from lorafit.model.loading import attach_lora, load_base_model

CUDA = torch.cuda.is_available()


def test_auto_is_off_without_cuda_and_none_is_always_off():
    assert resolve_kernels("auto", "llama", cuda=False) == "none"
    assert resolve_kernels("none", "llama", cuda=True) == "none"


def test_liger_without_cuda_is_an_error_that_says_why():
    with pytest.raises(LorafitError) as error:
        resolve_kernels("liger", "llama", cuda=False)
    text = str(error.value)
    assert "model.kernels: liger cannot be used here" in text and "no CUDA" in text and "model.kernels: auto" in text


@pytest.mark.skipif(liger_installed(), reason="checks the message when liger-kernel is missing")
def test_liger_without_the_package_names_the_extra():
    assert resolve_kernels("auto", "llama", cuda=True) == "none"
    with pytest.raises(LorafitError, match="liger-kernel package is not installed") as error:
        resolve_kernels("liger", "llama", cuda=True)
    assert "-m pip install -e '.[liger]' in the lorafit checkout" in str(error.value)


@pytest.mark.skipif(CUDA, reason="checks the CPU default")
def test_the_default_load_on_a_cpu_runs_plain_code(tiny_model_dir):
    model = load_base_model(ModelConfig(path=str(tiny_model_dir)), str(tiny_model_dir))
    assert getattr(model, LIGER_MARK) == "none"
    assert "forward" not in model.__dict__ and "forward" not in model.model.norm.__dict__  # nothing rebound


def test_an_adapter_on_the_output_head_is_refused_with_the_fused_loss(tiny_model_dir):
    model = load_base_model(ModelConfig(path=str(tiny_model_dir)), str(tiny_model_dir))
    setattr(model, LIGER_MARK, "liger")  # what apply_kernels records once liger is applied (GPU only)
    with pytest.raises(LorafitError, match="lm_head") as error:
        attach_lora(model, LoraConfig(target_modules=["q_proj", "lm_head"]))
    assert "model.kernels: none" in str(error.value)
    attach_lora(model, LoraConfig())  # all-linear leaves the head out: fine


# ------------------------------------------------------------------------------------------ GPU


needs_liger_gpu = pytest.mark.skipif(not (CUDA and liger_installed()),
                                     reason="needs an NVIDIA GPU and liger-kernel (pip install 'lorafit[liger]')")


def _loss_and_grads(model_dir, kernels: str, batch: dict, num_items: int | None):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = load_base_model(ModelConfig(path=str(model_dir), dtype="bf16", kernels=kernels), str(model_dir))
    assert getattr(base, LIGER_MARK) == ("liger" if kernels == "liger" else "none")
    torch.manual_seed(0)
    model = get_peft_model(base, PeftLoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                                init_lora_weights=False)).cuda()
    model.train()
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items, device="cuda")}
    loss = model(**{k: v.cuda() for k, v in batch.items()}, **extra).loss
    loss.backward()
    return float(loss), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.gpu
@needs_liger_gpu
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("accumulating", [False, True], ids=["mean", "num_items_in_batch"])
def test_liger_loss_and_gradients_equal_the_plain_path(tiny_model_dir, tiny_tokenizer, layout, accumulating):
    """`num_items_in_batch` is how Trainer normalises over accumulated micro-batches: the fused loss must honour it."""
    from lorafit.data.collate import PadCollator
    from lorafit.data.packing import PackedCollator

    texts = ["The quick brown fox jumps over the lazy dog.", "LoRA trains two low-rank matrices per layer.",
             'Answer: {"key": "value", "count": 3}']
    features = [{"input_ids": ids, "labels": list(ids)} for ids in (tiny_tokenizer(t)["input_ids"] for t in texts)]
    batch = PackedCollator()(features) if layout == "packed" else PadCollator(tiny_tokenizer.pad_token_id)(features)
    num_items = 3 * int(batch["labels"][..., 1:].ne(-100).sum()) if accumulating else None  # as if 3 micro-batches
    plain_loss, plain_grads = _loss_and_grads(tiny_model_dir, "none", batch, num_items)
    fused_loss, fused_grads = _loss_and_grads(tiny_model_dir, "liger", batch, num_items)
    assert fused_loss == pytest.approx(plain_loss, rel=2e-2)
    for name, grad in plain_grads.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), fused_grads[name].flatten(), dim=0)
        scale = fused_grads[name].norm() / grad.norm()
        assert cosine > 0.99 and abs(scale - 1) < 0.02, f"{name}: cosine {cosine:.4f}, norm ratio {scale:.4f}"


@pytest.mark.gpu
@needs_liger_gpu
def test_liger_leaves_other_models_of_the_family_plain(tiny_model_dir):
    """The merge at the end of a run builds a fresh model on the CPU: it must not get Triton kernels."""
    from transformers.models.llama import modeling_llama

    before = dict(vars(modeling_llama)), modeling_llama.LlamaForCausalLM.forward
    patched = load_base_model(ModelConfig(path=str(tiny_model_dir), kernels="liger"), str(tiny_model_dir))
    assert "forward" in patched.model.norm.__dict__  # this instance runs liger's RMSNorm
    assert dict(vars(modeling_llama)) == before[0] and modeling_llama.LlamaForCausalLM.forward is before[1]
    plain = load_base_model(ModelConfig(path=str(tiny_model_dir), kernels="none"), str(tiny_model_dir))
    assert "forward" not in plain.model.norm.__dict__ and "forward" not in plain.__dict__
    assert apply_kernels(plain, "none") == "none"
