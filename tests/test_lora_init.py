"""LoRA initialisations (lora.init), LoRA+ (lora.loraplus_lr_ratio) and train.embedding_learning_rate.

Each initialisation is checked against what its paper says at step 0, on the real peft layers of the tiny model;
PiSSA/OLoRA adapters are proven to apply to the ORIGINAL base once published (and refused when not converted);
the optimizer the run really builds is inspected for its learning rates; and every option trains.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import conversation, write_jsonl
from transformers import AutoModelForCausalLM

from lorafit import LorafitCallback, load_config, train
from lorafit.artifact.verify import verify_artifact
from lorafit.config.model_sections import LoraConfig
from lorafit.errors import LorafitError
from lorafit.model.loading import attach_lora
from lorafit.model.lora_init import base_view, convert_to_original_base, initial_adapter

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 64, 12, 3], [8, 77, 150, 9, 200, 45, 6, 18, 120, 2]])


def _base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _adapted(model_dir, **lora):
    torch.manual_seed(0)
    return attach_lora(_base(model_dir), LoraConfig(**{"r": 8, "alpha": 16, "dropout": 0.0, **lora})).eval()


def _layers(model):
    """(base weight, lora_A, lora_B, scale) of every adapted linear layer."""
    from peft.tuners.lora import Linear

    return [(m.base_layer.weight.detach(), m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach(),
             m.scaling["default"]) for m in model.modules() if isinstance(m, Linear)]


def _original_weights(model_dir) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in _base(model_dir).named_parameters()}


def _pretend_training(model, seed=1):
    """Move every trainable tensor, as training would (fast and deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


@torch.no_grad()
def _logits(model):
    return model(IDS).logits


# ---------------------------------------------------------------------------------------------- step 0


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_default_and_gaussian_start_with_b_zero_so_the_model_is_the_base(tiny_model_dir, init):
    model = _adapted(tiny_model_dir, init=init)
    layers = _layers(model)
    assert layers and all(torch.count_nonzero(b) == 0 for _, _, b, _ in layers)
    assert torch.equal(_logits(model), _logits(_base(tiny_model_dir)))
    a = torch.cat([a.flatten() for _, a, _, _ in layers])
    if init == "gaussian":  # A ~ N(0, std 1/r) (peft: nn.init.normal_(std=1/r))
        assert abs(a.std().item() - 1 / 8) < 0.01 and abs(a.mean().item()) < 0.01
    else:  # Kaiming-uniform(a=sqrt(5)) on [r, in]: bound 1/sqrt(in_features), std bound/sqrt(3)
        bound = 1 / layers[0][1].shape[1] ** 0.5
        assert a.abs().max() <= bound and abs(a.std().item() - 1 / 8) > 0.05


def test_pissa_takes_the_top_r_singular_directions_and_leaves_the_residual_in_the_base(tiny_model_dir):
    original = _base(tiny_model_dir)
    originals = [m.weight.detach().clone() for n, m in original.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    model = _adapted(tiny_model_dir, init="pissa")
    layers = _layers(model)
    assert len(layers) == len(originals)
    for w, (residual, a, b, scale) in zip(originals, layers):
        torch.testing.assert_close(residual + scale * b @ a, w, atol=1e-5, rtol=0)  # adapter + residual = W
        s = torch.linalg.svdvals(w)
        torch.testing.assert_close(torch.linalg.svdvals(scale * b @ a)[:8], s[:8], atol=1e-4, rtol=1e-4)
        # what stays in the base is W without its top 8 directions: its largest singular value is W's 9th
        torch.testing.assert_close(torch.linalg.svdvals(residual)[0], s[8], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.T @ b, a @ a.T, atol=1e-4, rtol=1e-4)  # both sqrt(S): A = sqrt(S) U^T, B = V sqrt(S)
    torch.testing.assert_close(_logits(model), _logits(original), atol=1e-4, rtol=0)


@pytest.mark.parametrize("init", ["olora", "pissa_niter_2"])
def test_olora_and_randomised_pissa_also_reproduce_each_base_layer(tiny_model_dir, init):
    weights = [m.weight.detach().clone() for n, m in _base(tiny_model_dir).named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    model = _adapted(tiny_model_dir, init=init)
    for w, (residual, a, b, scale) in zip(weights, _layers(model)):
        torch.testing.assert_close(residual + scale * b @ a, w, atol=1e-5, rtol=0)
        assert not torch.allclose(residual, w)  # the base really was rewritten
        if init == "olora":  # B = Q[:, :r] of W = QR: orthonormal columns; A = R[:r], upper triangular
            torch.testing.assert_close(b.T @ b, torch.eye(8), atol=1e-5, rtol=0)
            assert torch.equal(a[:, :8], torch.triu(a[:, :8]))


# ---------------------------------------------------------------------------------------------- the base proof


@pytest.mark.parametrize("init, extra", [("pissa", {}), ("olora", {}),
                                         ("pissa", {"use_dora": True, "modules_to_save": ["norm"]})])
def test_the_converted_adapter_on_the_original_base_is_the_trained_model(tiny_model_dir, tmp_path, init, extra):
    from peft import PeftModel

    model = _adapted(tiny_model_dir, init=init, **extra)
    _pretend_training(model)
    trained = _logits(model)
    model.save_pretrained(tmp_path)
    record = convert_to_original_base(tmp_path, initial_adapter(model))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (record["trained_rank"], record["published_rank"], config["r"]) == (8, 16, 16)
    assert config["lora_alpha"] == 32 and config["init_lora_weights"] is True  # scale alpha / r kept
    reloaded = PeftModel.from_pretrained(_base(tiny_model_dir), tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), trained, atol=1e-4, rtol=0)
    # the base the adapter was loaded onto is still the file's: nothing rewrote it
    originals = _original_weights(tiny_model_dir)
    for name, param in reloaded.base_model.model.named_parameters():
        key = name.replace(".base_layer", "").replace(".original_module", "")
        if not param.requires_grad and key in originals and "lora_" not in name:
            assert torch.equal(param, originals[key]), name


def test_the_conversion_equals_peft_own_and_keeps_the_tensors_peft_drops(tiny_model_dir, tmp_path):
    """peft 0.21.2's save_pretrained(path_initial_model_for_weight_conversion=...) gives the same lora tensors, r
    and alpha, but keeps only lora_A/lora_B: modules_to_save would be lost (why lorafit converts by itself).
    If the last assertion fails, peft keeps them now and its conversion could be used directly."""
    from safetensors.torch import load_file

    model = _adapted(tiny_model_dir, init="pissa", modules_to_save=["norm"])
    model.peft_config["default"].init_lora_weights = True  # peft's recipe for saving the initial adapter
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = "pissa"
    _pretend_training(model)
    model.save_pretrained(tmp_path / "ours")
    convert_to_original_base(tmp_path / "ours", initial_adapter(model))
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours, peft = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    lora = [k for k in ours if ".lora_" in k]
    assert lora and all(torch.equal(ours[k], peft[k]) for k in lora)
    ours_config, peft_config = (json.loads((tmp_path / f / "adapter_config.json").read_text()) for f in ("ours", "peft"))
    assert (ours_config["r"], ours_config["lora_alpha"]) == (peft_config["r"], peft_config["lora_alpha"]) == (16, 32)
    saved = [k for k in ours if ".lora_" not in k]  # the norms trained in full (saved under their module's name)
    assert saved and not any(k in peft for k in saved)


def test_an_unconverted_pissa_adapter_is_wrong_on_the_base_and_verify_and_merge_refuse_it(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from lorafit.export.merge import merge_adapter

    model = _adapted(tiny_model_dir, init="pissa")
    _pretend_training(model)
    trained = _logits(model)
    folder = tmp_path / "unconverted"
    model.save_pretrained(folder)
    shutil.copy(tiny_model_dir / "tokenizer.json", folder)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", folder)
    report = verify_artifact(folder, tiny_model_dir)
    assert report.status == "failed" and any("init_lora_weights 'pissa'" in p for p in report.problems), report.problems
    with pytest.raises(LorafitError, match="rewrote"):
        merge_adapter(folder, tmp_path / "merged", dtype="fp32", base=tiny_model_dir)
    assert not (tmp_path / "merged").exists()
    # and why: the same tensors read as a plain adapter on the unchanged base are not the trained model
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": True}))
    plain = PeftModel.from_pretrained(_base(tiny_model_dir), folder).eval()
    assert (_logits(plain) - trained).abs().max() > 0.1


def test_an_unconverted_randomised_pissa_adapter_is_refused_by_eval_and_generate(tiny_model_dir, tmp_path):
    """peft redoes a randomised SVD while loading pissa_niter_N: another residual base, silently another model."""
    from lorafit.model.adapters import load_adapter_model, resolve_adapter

    model = _adapted(tiny_model_dir, init="pissa_niter_2")
    _pretend_training(model)
    folder = tmp_path / "unconverted"
    model.save_pretrained(folder)
    with pytest.raises(LorafitError, match="cannot be loaded reproducibly"):
        load_adapter_model(resolve_adapter(folder, tiny_model_dir))
    done = subprocess.run([sys.executable, "-m", "lorafit", "generate", "--adapter", str(folder), "--base",
                           str(tiny_model_dir), "--prompt", "hi"], capture_output=True, text=True)
    assert done.returncode != 0 and "cannot be loaded reproducibly" in done.stderr and "Traceback" not in done.stderr


def test_verify_checks_the_converted_rank_against_metadata(tiny_model_dir, tmp_path):
    model = _adapted(tiny_model_dir, init="olora")
    _pretend_training(model)
    model.save_pretrained(tmp_path)
    record = convert_to_original_base(tmp_path, initial_adapter(model))
    (tmp_path / "metadata.json").write_text(json.dumps({"adapter_init": record}))
    assert verify_artifact(tmp_path).problems == []
    (tmp_path / "metadata.json").write_text(json.dumps({"adapter_init": {**record, "published_rank": 32}}))
    assert any("converted to rank 32" in p for p in verify_artifact(tmp_path).problems)


def test_base_view_is_the_base_after_pissa_where_disabling_the_adapter_is_not(tiny_model_dir):
    model = _adapted(tiny_model_dir, init="pissa")
    _pretend_training(model)
    trained, base = _logits(model), _logits(_base(tiny_model_dir))
    with base_view(model):
        torch.testing.assert_close(_logits(model), base, atol=1e-4, rtol=0)
    torch.testing.assert_close(_logits(model), trained)  # the trained values are back
    with model.disable_adapter():
        assert (_logits(model) - base).abs().max() > 0.1  # the residual base, which the comparison must not show


def test_a_pissa_adapter_that_did_not_move_counts_as_unchanged(tiny_model_dir):
    from lorafit.artifact.integrity import require_adapter_changed

    model = _adapted(tiny_model_dir, init="pissa")
    with pytest.raises(LorafitError, match="step-0 value"):
        require_adapter_changed(model)
    _pretend_training(model)
    require_adapter_changed(model)


def test_publishing_a_pissa_model_without_its_initial_adapter_is_refused(tiny_model_dir, tmp_path):
    from lorafit.artifact.publish import _fit_to_original_base

    model = _adapted(tiny_model_dir, init="olora")
    del model.lorafit_initial_adapter
    config = load_config({"lora": {"init": "olora"}, "data": {"train": [{"path": "x.jsonl"}]}})
    with pytest.raises(LorafitError, match="cannot be converted"):
        _fit_to_original_base(tmp_path, model, config)


@pytest.mark.parametrize("lora, problem", [
    ({"init": "loftq"}, "loftq is not supported"),
    ({"init": "pissa_niter_0"}, "unknown initialisation"),
    ({"init": "svd"}, "unknown initialisation"),
    ({"loraplus_lr_ratio": 0}, "greater than 0"),
])
def test_bad_init_options_are_config_errors_naming_the_field(lora, problem):
    with pytest.raises(LorafitError) as error:
        load_config({"lora": lora, "data": {"train": [{"path": "x.jsonl"}]}})
    assert "lora." in str(error.value) and problem in str(error.value)


def test_pissa_on_a_quantized_base_is_refused():
    with pytest.raises(LorafitError, match="re-quantize a residual base"):
        load_config({"lora": {"init": "olora"}, "quant": {"bits": 4}, "data": {"train": [{"path": "x.jsonl"}]}})


# ---------------------------------------------------------------------------------------------- optimizer groups


def test_loraplus_groups_match_peft_create_loraplus_optimizer(tiny_model_dir):
    from peft.optimizers import create_loraplus_optimizer

    from lorafit.training.optimizer import LearningRates, parameter_groups

    model = _adapted(tiny_model_dir, use_dora=True)
    peft_opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    peft_lr = {id(p): g["lr"] for g in peft_opt.param_groups for p in g["params"]}
    ours = parameter_groups(model, LearningRates(1e-3, 16), 0.0, [])
    our_lr = {id(p): g["lr"] for g in ours for p in g["params"]}
    assert our_lr == peft_lr and sorted(set(our_lr.values())) == [1e-3, 16e-3]


WORDS = "red blue green black white pink gray gold".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [conversation(f"Say {w}", f"{w} {w} {w}") for w in WORDS]
    return write_jsonl(tmp_path_factory.mktemp("init-data") / "train.jsonl", rows)


def _config(out, model_dir, data, lora=None, **train_section):
    return load_config({
        "model": {"path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **(lora or {})},
        "data": {"train": [{"path": str(data)}], "max_seq_length": 64},
        "train": {"output_dir": str(out), "max_steps": 12, "batch_size": 8, "learning_rate": 3e-3, "log_every": 1,
                  "seed": 3, "scheduler": "constant", **train_section},
        "eval": {"every": None, "at_start": False, "generate_samples": 0},
    })


class Inspect(LorafitCallback):
    """The optimizer and model the run really built."""

    def on_train_begin(self, loop):
        from lorafit.training.optimizer import group_rates

        model, optimizer = loop.model, loop.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        self.rates = group_rates(inner)
        self.groups = {g.get("name", str(i)): [id(p) for p in g["params"]] for i, g in enumerate(inner.param_groups)}
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.model = model


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics_history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _falls(losses: list[float]) -> bool:
    return len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


@pytest.mark.slow
def test_loraplus_and_embedding_rate_reach_the_optimizer_the_run_builds(tmp_path, tiny_model_dir, data):
    seen = Inspect()
    result = train(_config(tmp_path / "run", tiny_model_dir, data,
                           {"loraplus_lr_ratio": 16, "modules_to_save": ["embed_tokens"]},
                           learning_rate=5e-4, embedding_learning_rate=1e-4, weight_decay=0.1), callbacks=[seen])
    assert seen.rates == {"lora_A": 5e-4, "lora_B": 5e-4 * 16, "full": 1e-4}, seen.rates
    names = {group: {seen.names[i] for i in ids} for group, ids in seen.groups.items()}
    assert all("lora_A" in n for n in names["lora_A"]) and all("lora_B" in n for n in names["lora_B"])
    assert names["full"] and all("modules_to_save" in n and "embed_tokens" in n for n in names["full"])
    assert _falls(_losses(result.run_dir))


@pytest.mark.slow
def test_without_either_option_trainer_builds_its_usual_optimizer(tmp_path, tiny_model_dir, data):
    seen = Inspect()
    train(_config(tmp_path / "run", tiny_model_dir, data, max_steps=1), callbacks=[seen])
    assert set(seen.rates.values()) == {3e-3} and "lora_B" not in seen.rates


# ---------------------------------------------------------------------------------------------- whole runs


@pytest.mark.slow
@pytest.mark.parametrize("init", ["default", "gaussian", "pissa_niter_2", "olora"])
def test_each_initialisation_trains(tmp_path, tiny_model_dir, data, init):
    result = train(_config(tmp_path / "run", tiny_model_dir, data, {"init": init}))
    assert _falls(_losses(result.run_dir)), _losses(result.run_dir)
    assert verify_artifact(result.adapter_dir, tiny_model_dir).status == "ok"


@pytest.mark.slow
def test_a_pissa_run_publishes_an_adapter_for_the_original_base_that_merges_to_the_trained_model(
        tmp_path, tiny_model_dir, data):
    from peft import PeftModel

    from lorafit.export.merge import merge_adapter

    seen = Inspect()
    result = train(_config(tmp_path / "run", tiny_model_dir, data, {"init": "pissa"}), callbacks=[seen])
    assert _falls(_losses(result.run_dir)), _losses(result.run_dir)
    seen.model.eval()
    trained = _logits(seen.model)  # the trained model as it stood: residual base + trained A, B
    folder = result.adapter_dir
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["adapter_init"]["converted_to_original_base"] and metadata["adapter_init"]["published_rank"] == 16
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 16
    assert "rank is 16" in (folder / "README.md").read_text()
    report = verify_artifact(folder, tiny_model_dir)
    assert report.status == "ok" and report.checked["init"] == "pissa", report.problems
    applied = PeftModel.from_pretrained(_base(tiny_model_dir), folder).eval()
    torch.testing.assert_close(_logits(applied), trained, atol=1e-4, rtol=0)
    merge_adapter(folder, tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged), trained, atol=1e-4, rtol=0)
    # the base-vs-adapter figures compared against the real base, not PiSSA's residual
    with base_view(seen.model):
        torch.testing.assert_close(_logits(seen.model), _logits(_base(tiny_model_dir)), atol=1e-4, rtol=0)


class CtrlC(LorafitCallback):
    """Ctrl-C during step 3: the run saves at the step boundary and stops (training/guards.py)."""

    def on_step_begin(self, step, loop):
        if step == 3:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_a_stopped_pissa_loraplus_run_resumes_to_the_same_converted_adapter(tmp_path, tiny_model_dir, data):
    """On resume the adapter is attached afresh (the same PiSSA init, kept for the conversion) and the grouped
    optimizer's state comes back from the checkpoint: the published bytes equal an uninterrupted run's."""
    from lorafit.training.recipe import RunStopped

    options = ({"init": "pissa", "loraplus_lr_ratio": 4}, )
    reference = train(_config(tmp_path / "straight", tiny_model_dir, data, *options, max_steps=6, save_every=2))
    config = _config(tmp_path / "stopped", tiny_model_dir, data, *options, max_steps=6, save_every=2)
    with pytest.raises(RunStopped):
        train(config, callbacks=[CtrlC()])
    resumed = train(config, resume="auto")
    assert ((resumed.adapter_dir / "adapter_model.safetensors").read_bytes()
            == (reference.adapter_dir / "adapter_model.safetensors").read_bytes())
    assert json.loads((resumed.adapter_dir / "adapter_config.json").read_text())["r"] == 16
