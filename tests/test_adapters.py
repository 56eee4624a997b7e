"""One adapter-loading path: run folders, artifact folders and any PEFT adapter folder; the tokenizer falls back to
the base's; adapters for another task are refused; GGUF bases get their own answer.

The PEFT adapters here are made with peft directly (not by lorafit), with random non-zero LoRA weights, as a user
would bring them from elsewhere: no tokenizer files, no checksums, no training_config.yaml.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import conversation, write_jsonl

from lorafit.config import ModelConfig, QuantConfig
from lorafit.errors import LorafitError
from lorafit.model.adapters import resolve_adapter
from lorafit.model.loading import resolve_model_path


def _peft_adapter(folder, tiny_model_dir, *, task_type="CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if task_type == "SEQ_CLS":
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                            task_type=task_type))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, tiny_model_dir):
    return _peft_adapter(tmp_path_factory.mktemp("peft") / "adapter", tiny_model_dir)


def test_a_peft_adapter_without_tokenizer_files_uses_the_base_tokenizer(peft_adapter, tiny_model_dir):
    assert not list(peft_adapter.glob("tokenizer*"))
    resolved = resolve_adapter(peft_adapter)
    assert resolved.adapter_dir == peft_adapter.resolve() and resolved.base_path == str(tiny_model_dir)
    assert resolved.tokenizer_dir == tiny_model_dir and resolved.task_type == "CAUSAL_LM"
    assert resolved.load_tokenizer().chat_template and resolved.training_config() is None


def test_eval_of_a_peft_adapter_without_tokenizer_files(peft_adapter, tmp_path):
    """Before: AutoTokenizer on the adapter folder raised a ValueError traceback."""
    from lorafit.evaluate.command import run_eval

    data = write_jsonl(tmp_path / "eval.jsonl", [conversation("Say red", "red red"), conversation("Say blue", "blue blue")])
    report = run_eval(adapter=peft_adapter, model=None, data=[data], metrics=("loss", "exact_match"), baseline=True,
                      limit=1, max_new_tokens=4, batch_size=2)
    assert report["adapter"] == str(peft_adapter.resolve())
    adapted, base = report["model_result"]["loss"], report["base_result"]["loss"]
    assert adapted > 0 and base > 0 and adapted != pytest.approx(base)  # the adapter was applied (random B != 0)
    assert report["loss_tokenisation"] == {"max_seq_length": 1024, "truncation": "truncate", "train_on": "all_assistant"}


def test_merge_of_a_peft_adapter_without_training_config_has_no_quantization_gap(peft_adapter, tmp_path):
    from lorafit.export.merge import merge_adapter

    report = merge_adapter(peft_adapter, tmp_path / "merged", dtype="fp32")
    assert report["max_abs_logit_diff"] <= 1e-4 and "quantization_gap" not in report
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()  # the base's tokenizer travels with it
    # An explicit quant section without bits (what artifact.merge passes for an unquantized run): no gap either.
    report = merge_adapter(peft_adapter, tmp_path / "merged-again", dtype="fp32", quant=QuantConfig())
    assert "quantization_gap" not in report


def test_a_sequence_classification_adapter_is_refused_naming_its_task_type(tmp_path, tiny_model_dir):
    from lorafit.export.merge import merge_adapter

    folder = _peft_adapter(tmp_path / "cls", tiny_model_dir, task_type="SEQ_CLS")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    with pytest.raises(LorafitError, match="task_type is 'SEQ_CLS', not CAUSAL_LM") as error:
        merge_adapter(folder, tmp_path / "out", dtype="fp32")
    assert "score" in error.value.why
    assert not (tmp_path / "out").exists()


def test_run_folders_resolve_to_their_newest_final_artifact(tmp_path, peft_adapter):
    run = tmp_path / "run"
    older, newer = run / "x-v0.1.0" / "final_artifact", run / "x-v0.2.0" / "final_artifact"
    shutil.copytree(peft_adapter, older)
    shutil.copytree(peft_adapter, newer)
    (newer / "adapter_config.json").touch()
    assert resolve_adapter(run).adapter_dir == newer  # no summary yet: the newest artifact
    (run / "training_summary.json").write_text(json.dumps({"adapter_dir": str(older)}))
    assert resolve_adapter(run).adapter_dir == older  # the summary names the one the last run published
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    assert resolve_adapter(moved).adapter_dir == moved / "x-v0.1.0" / "final_artifact"  # its own copy, not the old
    assert resolve_adapter(older).adapter_dir == older
    with pytest.raises(LorafitError, match="not an adapter folder") as error:
        resolve_adapter(tmp_path)
    assert "run folder" in error.value.fix


def test_a_gguf_file_as_base_says_gguf_is_not_supported(tmp_path):
    gguf = tmp_path / "model-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(LorafitError, match="GGUF bases are not supported for training") as error:
        resolve_model_path(ModelConfig(path=str(gguf)))
    assert "Hugging Face folder" in error.value.fix
    other = tmp_path / "weights.safetensors"
    other.write_bytes(b"x")
    with pytest.raises(LorafitError, match="a file, not a model folder"):
        resolve_model_path(ModelConfig(path=str(other)))
