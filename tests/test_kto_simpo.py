"""KTO (objective.type: kto, unpaired answers) and SimPO (objective.type: simpo, pairs without a reference): rows
and their errors, the losses (and KTO's gradient) against TRL's trainers on the same batch, dropout switched off as
TRL does (a train-mode parity test with DPOTrainer), and real runs on the tiny model with accumulation
equivalence."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import FirstGrads, write_jsonl

from lorafit import load_config, train
from lorafit.config import DataSource
from lorafit.data.formats import FieldMap
from lorafit.data.labels import IGNORE_INDEX
from lorafit.data.sample_preference import generate_pairs
from lorafit.data.sources import SourceStats
from lorafit.data.unpaired import UnpairedCollator, normalise_unpaired, read_unpaired, tokenise_unpaired
from lorafit.errors import LorafitError
from lorafit.training.kto import KTOObjective, mismatched_rows
from lorafit.training.preference import DPOObjective, SimPOObjective
from lorafit.training.run_setup import apply_dropout_policy


def unpaired(pairs: list[dict]) -> list[dict]:
    """Each pair as two KTO rows: the chosen answer desirable, the rejected one not (TRL's unpair_preference_dataset)."""
    return [{"prompt": p["prompt"], "completion": answer, "label": label}
            for p in pairs for answer, label in ((p["chosen"], True), (p["rejected"], False))]


# ------------------------------------------------------------------------------------------------------ rows


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "2+3?", "completion": "5"}, 'u.jsonl:2: field "label" must be true'),
    ({"prompt": "2+3?", "completion": "5", "label": "maybe"}, "got 'maybe'"),
    ({"completion": "5", "label": True}, "u.jsonl:2"),
])
def test_a_bad_unpaired_row_names_file_line_and_field(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "ok?", "completion": "yes", "label": True}, row])
    with pytest.raises(LorafitError) as info:
        read_unpaired(DataSource(path=str(path)))
    assert expected in info.value.render()


def test_plain_and_conversational_unpaired_rows_are_the_same_record():
    plain = normalise_unpaired({"prompt": "2+3?", "completion": "5", "label": "true"}, FieldMap({}), "u:1")
    chat = normalise_unpaired({"prompt": [{"role": "user", "content": "2+3?"}],
                               "completion": [{"role": "assistant", "content": "5"}], "label": True},
                              FieldMap({}), "u:2")
    assert plain.identity() == chat.identity() and plain.label is True


def test_mismatched_rows_rotate_answers_by_one_as_trl_does():
    """trl/trainer/kto_trainer.py add_kl_completion_ids: KL_completion_ids = [c[-1]] + c[:-1]."""
    rows = [([1, 2, 10, 11], [IGNORE_INDEX] * 2 + [10, 11], 2), ([3, 20], [IGNORE_INDEX, 20], 1),
            ([4, 5, 6, 30, 31, 32], [IGNORE_INDEX] * 3 + [30, 31, 32], 3)]
    pairs = mismatched_rows(rows)
    assert [p["input_ids"] for p in pairs] == [[1, 2, 30, 31, 32], [3, 10, 11], [4, 5, 6, 20]]
    assert pairs[1]["labels"] == [IGNORE_INDEX, 10, 11]


# ------------------------------------------------------------------------------------------- losses against TRL


def _peft_model(model_dir: Path, *, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout))


def _train_adapter(model) -> None:
    """A trained-looking adapter (the same one on every call): policy and reference differ."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name and ".default." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _unpaired_batch(tokenizer, n_pairs: int = 3):
    pairs, _ = generate_pairs(n_train=n_pairs, n_eval=0, seed=9)
    rows = unpaired(pairs)
    rows = rows[:1] + rows[2:] + rows[1:2]  # not strictly alternating: chosen and rejected counts per batch differ
    features = [tokenise_unpaired(tokenizer, normalise_unpaired(r, FieldMap({}), f"u:{i}"), system_turn="keep",
                                  stats=SourceStats("u"), max_seq_length=512, truncation="drop").as_features()
                for i, r in enumerate(rows[:5])]
    return UnpairedCollator(tokenizer.pad_token_id)(features)


def test_kto_loss_gradient_and_rewards_equal_trl_ktotrainer(tmp_path, tiny_model_dir, tiny_tokenizer):
    """The same rows (3 desirable, 2 undesirable) and the same mismatched pairs through KTOTrainer._compute_loss
    (trl 1.16) and lorafit's KTOObjective: equal loss, gradient of every LoRA weight, rewards and KL (z)."""
    pytest.importorskip("trl", reason="TRL is the reference implementation (dev extra)")
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from lorafit.data.collate import PadCollator

    model, batch = _peft_model(tiny_model_dir), _unpaired_batch(tiny_tokenizer)
    args = KTOConfig(output_dir=str(tmp_path), beta=0.3, desirable_weight=1.0, undesirable_weight=1.5,
                     report_to="none", use_cpu=True, bf16=False, max_length=None)
    trl = KTOTrainer(model=model, args=args, processing_class=tiny_tokenizer,
                     train_dataset=Dataset.from_list(unpaired(generate_pairs(n_train=2, n_eval=0, seed=1)[0])))
    assert trl.ref_model is None and trl.calculate_KL
    _train_adapter(model)
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]

    pairs = PadCollator(tiny_tokenizer.pad_token_id)(mismatched_rows(batch["rows"]))
    trl_loss = trl._compute_loss(model, {
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != IGNORE_INDEX).long(), "label": batch["desirable"],
        "KL_input_ids": pairs["input_ids"], "KL_attention_mask": pairs["attention_mask"],
        "KL_completion_mask": (pairs["labels"] != IGNORE_INDEX).long()}, return_outputs=False)
    trl_grads = torch.autograd.grad(trl_loss, trainable)

    objective = KTOObjective(beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    objective.use_tokenizer(tiny_tokenizer)
    loss, metrics = objective.compute(model, batch)
    grads = torch.autograd.grad(loss, trainable)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    for mine, theirs in zip(grads, trl_grads):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7)
    logged = {k: v[-1] for k, v in trl._metrics["eval"].items()}
    value = {k: (s / w).item() for k, (s, w) in ((k, (torch.as_tensor(s), torch.as_tensor(w)))
                                                 for k, (s, w) in metrics.items())}
    assert value["kl"] == pytest.approx(logged["kl"], rel=1e-5, abs=1e-7)
    assert value["reward_chosen"] == pytest.approx(logged["rewards/chosen"], rel=1e-5, abs=1e-6)
    assert value["reward_rejected"] == pytest.approx(logged["rewards/rejected"], rel=1e-5, abs=1e-6)


def test_simpo_loss_and_rewards_equal_trl_cpo_simpo(tiny_model_dir, tiny_tokenizer):
    """trl/experimental/cpo/cpo_trainer.py: loss_type simpo, cpo_alpha 0 (pure SimPO): get_batch_logps averaged per
    token, then cpo_loss; the same pairs through lorafit's SimPOObjective."""
    pytest.importorskip("trl", reason="TRL is the reference implementation (dev extra)")
    from test_preference import _batch
    from trl.experimental.cpo import CPOTrainer

    model = _peft_model(tiny_model_dir)
    _train_adapter(model)
    model.eval()
    batch = _batch(tiny_tokenizer)
    loss, metrics = SimPOObjective(beta=2.5, gamma=0.7).compute(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen, rejected = CPOTrainer.get_batch_logps(logits, batch["labels"].clone(), average_log_prob=True).chunk(2)
    trl_self = SimpleNamespace(alpha=0.0, beta=2.5, simpo_gamma=0.7, loss_type="simpo", label_smoothing=0.0,
                               accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trl_self, chosen, rejected)
    assert loss.item() == pytest.approx(losses.mean().item(), rel=1e-5)
    assert metrics["reward_chosen"].item() == pytest.approx(chosen_rewards.mean().item(), rel=1e-5)
    assert metrics["reward_margin"].item() == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), rel=1e-5)


def test_dropout_is_off_as_trl_turns_it_off_and_train_mode_losses_match(tmp_path, tiny_model_dir, tiny_tokenizer):
    """LoRA dropout 0.1, train mode: DPOTrainer switches dropout off in its model (disable_dropout, on by default);
    lorafit's dropout policy does the same to its own copy, so the train-mode losses agree to 1e-5 and repeat
    exactly. objective.disable_dropout: false keeps dropout (two forwards then differ)."""
    pytest.importorskip("trl", reason="TRL is the reference implementation (dev extra)")
    from datasets import Dataset
    from test_preference import TRL_PLAIN, _batch
    from trl import DPOConfig, DPOTrainer

    batch = _batch(tiny_tokenizer)
    theirs = _peft_model(tiny_model_dir, dropout=0.1)
    args = DPOConfig(output_dir=str(tmp_path), beta=0.3, report_to="none", use_cpu=True, bf16=False, max_length=None)
    trl = DPOTrainer(model=theirs, args=args, processing_class=tiny_tokenizer,
                     train_dataset=Dataset.from_list([TRL_PLAIN]))
    _train_adapter(theirs)

    def config(**objective):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"model": {"path": str(tiny_model_dir)}, "objective": {"type": "dpo", **objective},
                                        "data": {"train": [{"path": "t.jsonl"}]}}))
        return load_config(path)

    write_jsonl(tmp_path / "t.jsonl", [TRL_PLAIN])
    kept = _peft_model(tiny_model_dir, dropout=0.1)
    assert apply_dropout_policy(config(disable_dropout=False), kept) == 0
    _train_adapter(kept)  # a zero lora_B would hide the dropout on lora_A's input
    kept.train()
    assert not torch.equal(kept(input_ids=batch["input_ids"]).logits, kept(input_ids=batch["input_ids"]).logits)

    mine = _peft_model(tiny_model_dir, dropout=0.1)
    assert apply_dropout_policy(config(), mine) > 0  # every LoRA dropout layer
    _train_adapter(mine)
    theirs.train(), mine.train()
    completion = (batch["labels"] != IGNORE_INDEX).long()
    trl_loss = trl._compute_loss(theirs, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                          "completion_mask": completion}, return_outputs=False)
    first, _ = DPOObjective(beta=0.3).compute(mine, batch)
    again, _ = DPOObjective(beta=0.3).compute(mine, batch)
    assert first.item() == again.item()
    assert first.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------------------------------------ real runs


def _config(folder: Path, model_dir: Path, objective: dict, *, train_overrides=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pairs, eval_pairs = generate_pairs(n_train=8, n_eval=4, seed=5)
    kto = objective["type"] == "kto"
    write_jsonl(folder / "train.jsonl", unpaired(pairs) if kto else pairs)
    write_jsonl(folder / "eval.jsonl", unpaired(eval_pairs) if kto else eval_pairs)
    config = {
        "model": {"path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05},  # switched off (objective.disable_dropout)
        "objective": objective,
        "data": {"train": [{"path": "train.jsonl"}], "eval": [{"path": "eval.jsonl"}], "max_seq_length": 128},
        "train": {"output_dir": str(folder / "run"), "max_steps": 1, "batch_size": 4, "grad_accum": 1,
                  "group_by_length": False, "log_every": 1, "seed": 3, "max_grad_norm": None, "learning_rate": 1e-2,
                  **(train_overrides or {})},
        "eval": {"every": None, "at_start": False, "generate_samples": 0},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("objective", [{"type": "kto", "beta": 0.2}, {"type": "simpo"}])
def test_batch_4_accum_1_equals_batch_2_accum_2(tmp_path, tiny_model_dir, objective):
    """KTO's reference point z is taken once per optimizer step over all its micro-batches, so it, and the
    gradients, do not depend on how the step is cut; SimPO's terms are per pair."""
    captured = {}
    for batch, accum in ((4, 1), (2, 2)):
        capture = FirstGrads()
        config = load_config(_config(tmp_path / f"b{batch}", tiny_model_dir, objective,
                                     train_overrides={"batch_size": batch, "grad_accum": accum}))
        train(config, callbacks=[capture])
        captured[batch] = capture.grads
    assert captured[4].keys() == captured[2].keys() and captured[4]
    assert any(g.norm() > 0 for g in captured[4].values())
    for name, grad in captured[4].items():
        if grad.norm() > 0:
            assert (grad - captured[2][name]).norm() / grad.norm() < 1e-5, name


@pytest.mark.parametrize("objective, keys", [
    ({"type": "kto", "beta": 0.2, "undesirable_weight": 1.2}, ("reward_chosen", "reward_rejected", "kl")),  # kl: z, every step
    ({"type": "simpo", "beta": 2.0, "simpo_gamma": 0.5}, ("reward_chosen", "reward_accuracy", "reward_margin")),
])
def test_kto_and_simpo_runs_train_and_log_their_metrics(tmp_path, tiny_model_dir, objective, keys):
    import json

    result = train(load_config(_config(tmp_path, tiny_model_dir, objective,
                                       train_overrides={"max_steps": 4})))
    history = [json.loads(line) for line in (result.run_dir / "metrics_history.jsonl").read_text().splitlines()]
    trained = [r for r in history if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4]
    for key in keys:  # a KTO step without an undesirable row reports no reward_rejected (weight 0: nothing)
        assert any(key in r for r in trained), key
    assert all(keys[-1] in r for r in trained)
    assert trained[-1]["loss"] < trained[0]["loss"]  # the same rows come round again: their loss falls


def test_data_inspect_and_dry_run_understand_unpaired_rows(tmp_path, tiny_model_dir):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    config = _config(tmp_path, tiny_model_dir, {"type": "kto"})
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lorafit", "data", "inspect", str(config), "--json"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == "unpaired" and report["train_examples"] == 16 and report["eval_examples"] == 8
    checked = train(load_config(config), dry_run=True).dry_run
    assert checked["batch_rows"] == 4
    assert not (tmp_path / "run" / "checkpoints").exists()
