"""The final artifact and `lorafit verify`: tampering of any kind is caught and named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import conversation, write_jsonl
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lorafit import load_config, train
from lorafit.artifact.publish import CHECKSUMS, checksums_for
from lorafit.cli import app
from lorafit.errors import LorafitError
from lorafit import fine_tune
from lorafit.artifact.verify import verify_artifact

runner = CliRunner()


def _rows(n: int) -> list[dict]:
    return [conversation(f"Say the number {i} twice.", f"{i} {i}", system="Be exact.") for i in range(n)]


def _config(tmp_path, model_dir, **train_section):
    data = write_jsonl(tmp_path / "train.jsonl", _rows(12))
    return load_config({
        "model": {"path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [{"path": str(data)}], "eval": [{"path": str(data)}]},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "learning_rate": 1e-2,
                  **train_section},
        "eval": {"every": None, "at_start": False},
        "artifact": {"name": "numbers", "version": "1.2.3", "license": "apache-2.0"},
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("artifact")
    result = train(_config(tmp, tiny_model_dir))
    return result


def _copy(artifact, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(artifact, target)
    return target


def test_layout_metadata_and_card(trained, tiny_model_dir):
    artifact = trained.adapter_dir
    assert artifact == trained.run_dir / "numbers-v1.2.3" / "final_artifact"
    names = {p.name for p in artifact.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "metadata.json", "training_config.yaml",
            "training_metrics.json", CHECKSUMS, "README.md"} <= names
    assert not [n for n in names if n.startswith(".")]  # no staging leftovers
    assert json.loads((artifact / CHECKSUMS).read_text())["files"] == checksums_for(artifact)

    meta = json.loads((artifact / "metadata.json").read_text())
    assert meta["base_weight_check"]["unchanged"] is True and meta["base_weight_check"]["tensors"] > 0
    assert meta["base_model"]["weight_files_sha256"].keys() == {"model.safetensors"}
    assert meta["seed"] == 42 and meta["software"]["torch"] and meta["parameters"]["trainable"] > 0
    source = meta["data"]["train"]["sources"][0]
    assert source["sha256"] and source["rows"] == 12 and source["kept"] == 12 and meta["data"]["train"]["kept"] == 12
    assert meta["tokenizer"]["chat_template_sha256"]

    card = (artifact / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: peft" in front and "license: apache-2.0" in front and f"base_model: {tiny_model_dir}" in front
    assert "PeftModel.from_pretrained" in card

    result = json.loads((trained.run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["id"].startswith("ftjob-")
    assert result["params"]["validated_params"]["finetuned_model_id"] == str(artifact)
    assert result["params"]["validated_params"]["hyperparameters"]["lora_r"] == 4


def test_a_clean_artifact_verifies_with_its_base(trained, tiny_model_dir):
    report = verify_artifact(trained.adapter_dir, tiny_model_dir)
    assert report.ok, report.problems
    assert report.checked["base_modules"] == 8  # q_proj and v_proj in 4 layers


def test_one_flipped_byte_in_any_file_is_named(trained, tmp_path):
    files = sorted(p.name for p in trained.adapter_dir.iterdir())
    for name in files:
        copy = _copy(trained.adapter_dir, tmp_path / name)
        path = copy / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        report = verify_artifact(copy)
        assert not report.ok, name
        if name != CHECKSUMS:
            assert any(p.startswith(f"changed file: {name}") for p in report.problems), (name, report.problems)


def test_missing_and_extra_files_are_reported(trained, tmp_path):
    copy = _copy(trained.adapter_dir, tmp_path)
    (copy / "tokenizer.json").unlink()
    (copy / "notes.txt").write_text("hello")
    problems = verify_artifact(copy).problems
    assert "missing file: tokenizer.json" in problems
    assert any(p.startswith("extra file: notes.txt") for p in problems)


def _rewrite_adapter(copy, change):
    tensors = load_file(copy / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, copy / "adapter_model.safetensors", metadata={"format": "pt"})
    (copy / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": checksums_for(copy)}))


def test_non_finite_values_are_refused_even_with_valid_checksums(trained, tmp_path):
    copy = _copy(trained.adapter_dir, tmp_path)
    name = next(iter(load_file(copy / "adapter_model.safetensors")))
    _rewrite_adapter(copy, lambda t: t[name].view(-1).__setitem__(0, float("nan")))
    problems = verify_artifact(copy).problems
    assert problems == [f"adapter_model.safetensors: tensor {name} has 1 non-finite values"]


def test_shapes_must_match_the_rank_and_the_base(trained, tmp_path, tiny_model_dir):
    copy = _copy(trained.adapter_dir, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite_adapter(copy, lambda t: t.__setitem__(key, torch.zeros(4, 128)))
    problems = verify_artifact(copy, tiny_model_dir).problems
    assert any("layers.0.self_attn.q_proj.weight is [256, 256], the adapter expects [256, 128]" in p for p in problems)
    _rewrite_adapter(copy, lambda t: t.__setitem__(key, torch.zeros(3, 256)))
    assert any(f"adapter tensor {key}: shape [3, 256], expected [r=4" in p for p in verify_artifact(copy).problems)


def test_a_different_base_is_detected(trained, tmp_path):
    from lorafit.model.tiny import write_tiny_model

    other = write_tiny_model(tmp_path / "other", seed=1)
    problems = verify_artifact(trained.adapter_dir, other).problems
    assert problems == [f"--base {other}: weight files differ from the base trained on: model.safetensors"]


def test_a_corrupt_safetensors_header_is_explained(trained, tmp_path):
    copy = _copy(trained.adapter_dir, tmp_path)
    path = copy / "adapter_model.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + path.read_bytes()[8:])
    problems = verify_artifact(copy).problems
    assert any("header length 1000000000 does not fit the file" in p for p in problems)


def test_pickle_adapters_are_refused_unless_allowed(trained, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "adapter_model.bin")
    problems = verify_artifact(folder).problems
    assert any("adapter_model.bin: pickle file refused" in p for p in problems)
    allowed = verify_artifact(folder, allow_pickle=True)
    assert any("accepted because of --allow-pickle" in w for w in allowed.warnings)
    assert not any("pickle file refused" in p for p in allowed.problems)


def test_a_pickle_only_base_is_refused(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "pickle-base"
    shutil.copytree(tiny_model_dir, base)
    model = AutoModelForCausalLM.from_pretrained(base)
    (base / "model.safetensors").unlink()
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    with pytest.raises(LorafitError, match="weights are pickle files only"):
        train(_config(tmp_path, base))


def test_cli_verify_exit_codes_json_and_alias(trained, tmp_path):
    ok = runner.invoke(app, ["verify", str(trained.adapter_dir), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["ok"] is True
    copy = _copy(trained.adapter_dir, tmp_path)
    (copy / "metadata.json").write_text("{}")
    bad = runner.invoke(app, ["verify", str(copy)])
    assert bad.exit_code == 1 and "changed file: metadata.json" in bad.output
    alias = runner.invoke(app, ["train", "--verify-only", "--artifact-dir", str(copy)])
    assert alias.exit_code == 1 and "changed file: metadata.json" in alias.output


def test_an_existing_version_is_not_overwritten(trained, tiny_model_dir):
    config = _config(trained.run_dir.parent, tiny_model_dir)
    before = (trained.adapter_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(LorafitError, match="holds a finished run already"):
        train(config)
    (trained.run_dir / "training_summary.json").rename(trained.run_dir / "summary.bak")
    try:
        with pytest.raises(LorafitError, match="version 1.2.3 of numbers exists already"):
            train(config)
    finally:
        (trained.run_dir / "summary.bak").rename(trained.run_dir / "training_summary.json")
    assert (trained.adapter_dir / "adapter_model.safetensors").read_bytes() == before


def test_artifact_folder_may_not_lead_outside_the_output_folder(tmp_path, tiny_model_dir):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "numbers-v1.2.3").symlink_to(outside)
    with pytest.raises(LorafitError, match="outside the output folder"):
        train(_config(tmp_path, tiny_model_dir))
    assert list(outside.iterdir()) == []


def test_fine_tune_api_returns_the_result_dictionary(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir).to_dict()
    done = fine_tune(config)
    assert done["status"] == "completed" and done["metrics"]["steps"] == 2
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == done

    broken = write_jsonl(tmp_path / "broken.jsonl", [{"messages": [{"role": "user", "content": "no answer"}]}])
    config["data"]["train"] = [{"path": str(broken)}]
    config["train"]["output_dir"] = str(tmp_path / "run2")
    failed = fine_tune(config)
    assert failed["status"] == "failed" and "no assistant turn" in failed["error"]["message"]
    assert failed["error"]["user_error"] is True
    assert json.loads((tmp_path / "run2" / "result.json").read_text())["status"] == "failed"
