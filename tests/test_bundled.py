"""The embedded defaults: tiny model and sample data are deterministic and the shipped copies are current."""

from __future__ import annotations

import json

from conftest import REPO

from lorafit.config import default_config_path
from lorafit.data.sample import generate_conversations, write_sample_data
from lorafit.hashing import folder_digest
from lorafit.model.tiny import TINY_ARCH, write_tiny_model

RESOURCES = default_config_path().parent


def test_shipped_sample_data_is_what_the_generator_writes(tmp_path):
    write_sample_data(tmp_path)
    for name in ("quickstart_train.jsonl", "quickstart_eval.jsonl"):
        fresh = (tmp_path / name).read_bytes()
        assert (RESOURCES / "data" / name).read_bytes() == fresh, f"regenerate: python -m lorafit.data.sample {RESOURCES / 'data'}"
        assert (REPO / "examples" / "data" / name).read_bytes() == fresh, "examples/data must equal the packaged copy"
    assert (REPO / "examples" / "quickstart.yaml").read_bytes() == default_config_path().read_bytes()


def test_sample_task_is_checkable_and_eval_is_disjoint():
    train, evaluation = generate_conversations()
    assert len(train) >= 1000 and len(evaluation) >= 100
    train_inputs = {row["messages"][1]["content"] for row in train}
    assert not any(row["messages"][1]["content"] in train_inputs for row in evaluation)
    for row in train[:50]:
        answer = json.loads(row["messages"][2]["content"])
        assert set(answer) == {"name", "age", "city", "job"}
        assert answer["name"] in row["messages"][1]["content"] and str(answer["age"]) in row["messages"][1]["content"]


def test_tiny_model_is_deterministic_for_a_seed(tmp_path):
    a, b, c = (write_tiny_model(tmp_path / n, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    assert folder_digest(a) == folder_digest(b)
    assert folder_digest(a) != folder_digest(c)


def test_tiny_model_shape_and_tokenizer(tiny_model_dir, tiny_tokenizer):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "vocab_size"):
        assert config[key] % 64 == 0 and config[key] == TINY_ARCH[key]
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert not list(tiny_model_dir.glob("*.bin"))
    assert len(tiny_tokenizer) <= config["vocab_size"]
    assert tiny_tokenizer.eos_token == "<|end|>" and tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\n"
