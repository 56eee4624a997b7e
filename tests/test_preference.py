"""Preference training (objective.type: dpo | orpo): rows and their errors, labels, config clashes, the losses
against TRL's, the reference model, and real runs on the tiny model (rewards rise, artifact verifies, exact
resume after a SIGKILL)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import FirstGrads, REPO, write_jsonl

from lorafit import LorafitCallback, load_config, train
from lorafit.config import DataSource
from lorafit.data.formats import FieldMap
from lorafit.data.labels import IGNORE_INDEX, tokenize_conversation
from lorafit.data.pairs import PreferenceCollator, normalise_preference, read_preference, tokenise_pair
from lorafit.data.sample_preference import generate_pairs, write_sample_preference
from lorafit.data.sources import SourceStats
from lorafit.errors import LorafitError
from lorafit.training.preference import DPOObjective, ORPOObjective, answer_logps

PROMPT = "What is 2 plus 3?"
TRL_PLAIN = {"prompt": PROMPT, "chosen": "2 plus 3 is 5.", "rejected": "2 plus 3 is 6."}
TRL_CONVERSATIONAL = {"prompt": [{"role": "user", "content": PROMPT}],
                      "chosen": [{"role": "assistant", "content": "2 plus 3 is 5."}],
                      "rejected": [{"role": "assistant", "content": "2 plus 3 is 6."}]}
SHAREGPT = {"conversations": [{"from": "human", "value": PROMPT}],
            "chosen": {"from": "gpt", "value": "2 plus 3 is 5."},
            "rejected": {"from": "gpt", "value": "2 plus 3 is 6."}}


# ------------------------------------------------------------------------------------------------ rows and labels


def _data(**overrides):
    return SimpleNamespace(system_turn="keep", max_seq_length=512, truncation="drop", **overrides)


def test_trl_plain_trl_conversational_and_sharegpt_rows_are_the_same_pair(tiny_tokenizer):
    records = [normalise_preference(row, FieldMap({}), f"f.jsonl:{i}")
               for i, row in enumerate((TRL_PLAIN, TRL_CONVERSATIONAL, SHAREGPT), 1)]
    assert {r.identity() for r in records} == {json.dumps(
        [[{"role": "user", "content": PROMPT}], {"role": "assistant", "content": "2 plus 3 is 5."},
         {"role": "assistant", "content": "2 plus 3 is 6."}], sort_keys=True)}


def test_each_row_is_labelled_like_sft_on_its_answer_only(tiny_tokenizer):
    """Token by token: the chosen row is the SFT tokenisation of prompt + chosen (last assistant turn trained),
    the rejected row that of prompt + rejected; the trained tokens decode to the answer and its end-of-turn."""
    record = normalise_preference({"system": "Be exact.", **TRL_PLAIN}, FieldMap({}), "f.jsonl:1")
    example = tokenise_pair(tiny_tokenizer, record, system_turn="keep", stats=SourceStats("f"), max_seq_length=512,
                            truncation="drop")
    system = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": PROMPT}]
    for answer, ids, labels in (("2 plus 3 is 5.", example.input_ids, example.labels),
                                ("2 plus 3 is 6.", example.rejected_ids, example.rejected_labels)):
        sft = tokenize_conversation(tiny_tokenizer, [*system, {"role": "assistant", "content": answer}],
                                    train_on="last_assistant")
        assert (ids, labels) == (sft.input_ids, sft.labels)
        trained = tiny_tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        assert trained.startswith(answer) and trained != answer  # the end-of-turn token is trained too
    # The prompt tokens are identical in both rows and never trained.
    first = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
    assert example.input_ids[:first] == example.rejected_ids[:first]


def test_the_collator_puts_chosen_rows_first_then_rejected(tiny_tokenizer):
    features = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "rejected_ids": [1, 4], "rejected_labels": [-100, 4]},
                {"input_ids": [5, 6], "labels": [-100, 6], "rejected_ids": [5, 7, 8, 9],
                 "rejected_labels": [-100, 7, 8, 9]}]
    batch = PreferenceCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [5, 6, 0, 0], [1, 4, 0, 0], [5, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [-100, 6, -100, -100], [-100, 4, -100, -100],
                                        [-100, 7, 8, 9]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 2, 4]


def test_a_pair_over_the_length_limit_is_dropped_or_truncated_as_a_pair(tiny_tokenizer):
    record = normalise_preference({**TRL_PLAIN, "rejected": "no " * 80}, FieldMap({}), "f.jsonl:1")
    full = tokenise_pair(tiny_tokenizer, record, system_turn="keep", stats=SourceStats("f"), max_seq_length=4096,
                         truncation="drop")
    limit = len(full.input_ids) + 2  # the chosen row fits, the rejected one does not
    stats = SourceStats("f")
    assert tokenise_pair(tiny_tokenizer, record, system_turn="keep", stats=stats, max_seq_length=limit,
                         truncation="drop") is None
    assert stats.dropped_too_long == 1
    cut = tokenise_pair(tiny_tokenizer, record, system_turn="keep", stats=stats, max_seq_length=limit,
                        truncation="truncate")
    assert len(cut.rejected_ids) == limit and cut.input_ids == full.input_ids and stats.truncated == 1


@pytest.mark.parametrize("row, expected", [
    ({"prompt": PROMPT, "chosen": "5"}, 'pairs.jsonl:2: field "rejected" missing'),
    ({"prompt": PROMPT, "chosen": "5", "rejected": [{"role": "user", "content": "6"}]},
     'pairs.jsonl:2: field "rejected" must be one assistant turn'),
    ({"prompt": PROMPT, "chosen": "5", "rejected": "5"}, 'pairs.jsonl:2: "chosen" and "rejected" are identical'),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "chosen": "a",
      "rejected": "b"}, 'pairs.jsonl:2: "prompt" must end with the user turn'),
    ({"chosen": "a", "rejected": "b"}, 'pairs.jsonl:2: field "prompt" (or "conversations") missing'),
    ({"conversations": [{"from": "alien", "value": "x"}], "chosen": "a", "rejected": "b"},
     "pairs.jsonl:2: conversations[0].from is 'alien'"),
])
def test_a_bad_row_names_file_line_and_field(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "pairs.jsonl", [TRL_PLAIN, row])
    with pytest.raises(LorafitError) as info:
        read_preference(DataSource(path=str(path)))
    assert expected in info.value.render()
    # on_error: skip keeps the good row and counts the bad one by reason.
    records, stats, skipped = read_preference(DataSource(path=str(path), on_error="skip", max_skip_fraction=0.5))
    assert len(records) == 1 and sum(stats.skipped.values()) == 1 and skipped[0]["where"].endswith("pairs.jsonl:2")


def test_the_field_map_renames_preference_keys(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": PROMPT, "good": "5", "bad": "6"}])
    [record], _, _ = read_preference(DataSource(path=str(path), fields={"prompt": "question", "chosen": "good",
                                                                         "rejected": "bad"}))
    assert record.chosen["content"] == "5" and record.rejected["content"] == "6"


# ------------------------------------------------------------------------------------------------------- config


def _config(folder: Path, model_dir: Path, *, objective=None, train_overrides=None, eval_section=None, data=None,
            rows=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = rows or generate_pairs(n_train=16, n_eval=8, seed=5)
    write_jsonl(folder / "train.jsonl", train_rows)
    write_jsonl(folder / "eval.jsonl", eval_rows)
    config = {
        "model": {"path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "objective": objective or {"type": "dpo", "beta": 0.1},
        "data": {"train": [{"path": "train.jsonl"}], "eval": [{"path": "eval.jsonl"}], "max_seq_length": 128,
                 **(data or {})},
        "train": {"output_dir": str(folder / "run"), "max_steps": 1, "batch_size": 4, "grad_accum": 1,
                  "group_by_length": False, "log_every": 1, "seed": 3, "max_grad_norm": None,
                  **(train_overrides or {})},
        "eval": eval_section or {"every": None, "at_start": False, "generate_samples": 0},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("change, message", [
    ({"data": {"packing": "padding_free"}}, "objective.type: dpo with data.packing: padding_free"),
    ({"objective": {"type": "orpo", "loss_type": "ipo"}}, "loss_type: loss_type applies to type: dpo (type is 'orpo')"),
    ({"objective": {"type": "sft", "beta": 0.5}}, "beta: beta applies to type: dpo, orpo, simpo or kto"),
    ({"objective": {"type": "dpo"}, "eval": {"best": {"metric": "eval_nll_loss"}}},
     "logged only by objective.type: orpo"),
    ({"objective": {"type": "sft"}, "eval": {"best": {"metric": "eval_reward_margin"}}},
     "logged only by objective.type: dpo"),
    ({"objective": {"type": "sft"}, "data": {"train": [{"path": "t.jsonl", "format": "preference"}]}},
     "only objective.type: dpo, orpo or simpo trains on"),
    ({"objective": {"type": "dpo"}, "data": {"train": [{"path": "t.jsonl", "format": "messages"}]}},
     "objective.type: dpo reads preference rows"),
])
def test_settings_that_do_not_go_with_preference_training_are_refused(tmp_path, change, message):
    (tmp_path / "t.jsonl").write_text(json.dumps(TRL_PLAIN) + "\n")
    raw = {"model": {"path": "m"}, "objective": {"type": "dpo"}, "data": {"train": [{"path": "t.jsonl"}]}}
    for key, value in change.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(LorafitError) as info:
        load_config(path)
    assert message in info.value.render()


def test_the_cli_reports_a_bad_pair_with_file_and_line_and_no_traceback(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, rows=([TRL_PLAIN, {"prompt": PROMPT, "chosen": "5"}], [TRL_PLAIN]))
    done = subprocess.run([sys.executable, "-m", "lorafit", "config", "validate", str(config)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode != 0
    assert 'train.jsonl:2: field "rejected" missing' in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------- losses against TRL


def _peft_model(model_dir: Path, *, trained: bool = True):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    if trained:
        _train_adapter(model)
    return model.eval()


def _train_adapter(model) -> None:
    """A trained-looking adapter: policy and reference differ."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                param.normal_(0, 0.05)


def _batch(tokenizer, n: int = 3):
    rows, _ = generate_pairs(n_train=n, n_eval=0, seed=9)
    examples = [tokenise_pair(tokenizer, normalise_preference(r, FieldMap({}), "x"), system_turn="keep",
                              stats=SourceStats("x"), max_seq_length=512, truncation="drop") for r in rows]
    return PreferenceCollator(tokenizer.pad_token_id)([e.as_features() for e in examples])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_and_rewards_equal_trl_dpotrainer_on_the_same_batch(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                     loss_type):
    pytest.importorskip("trl", reason="TRL is the reference implementation (dev extra)")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # Handed a PeftModel, TRL keeps a frozen copy of its adapter at hand-over as the reference ("ref"); lorafit's
    # adapter is fresh (zero) when training starts, so that copy is the base model, which lorafit gets by switching
    # the adapter off instead of copying it.
    model, batch = _peft_model(tiny_model_dir, trained=False), _batch(tiny_tokenizer)
    args = DPOConfig(output_dir=str(tmp_path), beta=0.3, loss_type=[loss_type], report_to="none", use_cpu=True,
                     bf16=False, max_length=None)
    trl = DPOTrainer(model=model, args=args, processing_class=tiny_tokenizer,
                     train_dataset=Dataset.from_list([TRL_PLAIN]))
    assert trl.ref_model is None and "ref" in model.peft_config
    _train_adapter(model)
    model.eval()
    loss, metrics = DPOObjective(beta=0.3, loss_type=loss_type).compute(model, batch)
    completion = (batch["labels"] != IGNORE_INDEX).long()
    trl_loss = trl._compute_loss(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                         "completion_mask": completion}, return_outputs=False)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    logged = {k: v[-1] for k, v in trl._metrics["eval"].items()}
    assert metrics["reward_chosen"] == pytest.approx(logged["rewards/chosen"], rel=1e-5, abs=1e-6)
    assert metrics["reward_rejected"] == pytest.approx(logged["rewards/rejected"], rel=1e-5, abs=1e-6)
    assert metrics["reward_margin"] == pytest.approx(logged["rewards/margins"], rel=1e-5, abs=1e-6)
    assert metrics["reward_accuracy"] == pytest.approx(logged["rewards/accuracies"])


def test_orpo_odds_ratio_term_equals_trl(tiny_model_dir, tiny_tokenizer):
    pytest.importorskip("trl", reason="TRL is the reference implementation (dev extra)")
    from trl.experimental.orpo import ORPOTrainer

    model, batch = _peft_model(tiny_model_dir), _batch(tiny_tokenizer)
    loss, metrics = ORPOObjective(beta=0.2).compute(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    average = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    chosen, rejected = average.chunk(2)
    trl_self = SimpleNamespace(beta=0.2, accelerator=SimpleNamespace(device="cpu"))
    or_losses, chosen_rewards, rejected_rewards, _, log_odds = ORPOTrainer.odds_ratio_loss(trl_self, chosen, rejected)
    nll = -chosen.mean()  # lorafit's NLL: each chosen answer's mean token loss, averaged over pairs
    assert loss.item() == pytest.approx((nll - or_losses.mean()).item(), rel=1e-5)
    assert metrics["log_odds_ratio"] == pytest.approx(log_odds.item(), rel=1e-5)
    assert metrics["reward_margin"] == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), rel=1e-5)


def test_the_reference_is_the_base_model_with_the_adapter_off(tiny_model_dir, tiny_tokenizer):
    """DPO's reference log-probabilities are those of a separately loaded base model, from the same model object
    with a non-zero adapter: no second copy is made, and the objective holds no model."""
    from transformers import AutoModelForCausalLM

    from lorafit.training.preference import forward_answer_logps, reference_model

    model, batch = _peft_model(tiny_model_dir), _batch(tiny_tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected, _ = answer_logps(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch["labels"])
        policy, _ = forward_answer_logps(model, batch)
    with reference_model(model):
        reference, _ = forward_answer_logps(model, batch)
    assert torch.allclose(reference, expected, atol=1e-5) and not torch.allclose(policy, expected, atol=1e-3)
    assert torch.allclose(forward_answer_logps(model, batch)[0], policy)  # the adapter is back on after the block
    objective = DPOObjective()
    assert not [v for v in vars(objective).values() if isinstance(v, torch.nn.Module)]


def test_after_a_pissa_init_the_reference_is_still_the_base_and_the_step_trains(tiny_model_dir, tiny_tokenizer):
    """PiSSA leaves the residual W - B0A0 in the base, so switching the adapter off is NOT the base model: the
    reference must put the step-0 adapter back (model.lora_init.base_view), before the policy forward (an in-place
    write into parameters the policy's graph holds would break backward)."""
    from transformers import AutoModelForCausalLM

    from lorafit.config import LoraConfig as LorafitLora
    from lorafit.model.loading import attach_lora
    from lorafit.training.preference import forward_answer_logps, reference_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                        LorafitLora(r=4, alpha=8, dropout=0.0, init="pissa_niter_2")).eval()
    _train_adapter(model)
    batch = _batch(tiny_tokenizer)
    with torch.no_grad():
        expected, _ = answer_logps(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch["labels"])
        with model.disable_adapter():
            residual, _ = forward_answer_logps(model, batch)
    with reference_model(model):
        reference, _ = forward_answer_logps(model, batch)
    assert torch.allclose(reference, expected, atol=1e-4)
    assert not torch.allclose(residual, expected, atol=1e-2)  # what disable_adapter alone would have used
    loss, _ = DPOObjective().compute(model, batch)
    loss.backward()  # no "modified by an inplace operation" error
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)


# ------------------------------------------------------------------------------------------------------ real runs


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics_history.jsonl").read_text().splitlines()]


class ModelsInMemory(LorafitCallback):
    """Every transformers model alive at each step: a reference copy (TRL's default without PEFT) would be one
    more than the trained model's own base."""

    def __init__(self):
        self.extra: list[int] = []
        self.before = 0  # models other tests in this process left alive: not this run's

    @staticmethod
    def _others(model) -> int:
        import gc

        from transformers import PreTrainedModel

        gc.collect()
        own = {id(m) for m in model.modules()}  # the trained model and its inner decoder (also a PreTrainedModel)
        return sum(isinstance(o, PreTrainedModel) and id(o) not in own for o in gc.get_objects())

    def on_train_begin(self, loop):
        self.model = loop.model
        self.before = self._others(loop.model)

    def on_step_end(self, step, logs):
        self.extra.append(self._others(self.model) - self.before)


def test_dpo_on_the_shipped_set_raises_margin_and_accuracy_and_verifies(tmp_path, tiny_model_dir):
    """The shipped pairs through the real run: eval reward margin and accuracy rise from the start (0: at init the
    adapter is zero, so policy = reference), the history and report hold the rewards, the artifact verifies."""
    from lorafit.artifact.verify import verify_artifact

    shipped = REPO / "examples" / "preference" / "data"
    rows = ([json.loads(l) for l in (shipped / "preference_train.jsonl").read_text().splitlines()][:96],
            [json.loads(l) for l in (shipped / "preference_eval.jsonl").read_text().splitlines()][:16])
    counter = ModelsInMemory()
    config = load_config(_config(tmp_path, tiny_model_dir, rows=rows,
                                 train_overrides={"max_steps": 16, "batch_size": 8, "learning_rate": 1e-3,
                                                  "log_every": 4, "warmup_steps": 2},
                                 eval_section={"every": 8, "at_start": True, "generate_samples": 0,
                                               "best": {"metric": "eval_reward_accuracy"}},
                                 objective={"type": "dpo", "beta": 0.1}))
    result = train(config, callbacks=[], extra_callbacks=[counter])
    history = _history(result.run_dir)
    evals = [r for r in history if "eval_reward_margin" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_reward_margin"] == 0 and evals[0]["eval_reward_accuracy"] == 0
    assert evals[-1]["eval_reward_margin"] > 0.1, evals
    assert evals[-1]["eval_reward_accuracy"] >= 0.6, evals
    trained = [r for r in history if "reward_margin" in r]
    assert trained[-1]["reward_margin"] > trained[0]["reward_margin"] + 0.1
    assert {"reward_chosen", "reward_rejected", "reward_accuracy"} <= set(trained[-1])
    assert result.best["metric"] == "eval_reward_accuracy" and result.best["value"] == max(
        r["eval_reward_accuracy"] for r in evals)
    assert counter.extra and set(counter.extra) == {0}  # no model in memory but the one trained
    assert "Preference rewards" in (result.run_dir / "report.html").read_text()
    report = verify_artifact(result.adapter_dir)
    assert report.ok, report.problems


def test_orpo_trains_its_loss_and_nll_decrease(tmp_path, tiny_model_dir):
    config = load_config(_config(tmp_path, tiny_model_dir, objective={"type": "orpo", "beta": 0.1},
                                 train_overrides={"max_steps": 12, "batch_size": 8, "learning_rate": 2e-3,
                                                  "log_every": 1}))
    history = [r for r in _history(train(config).run_dir) if "loss" in r]
    assert {"nll_loss", "log_odds_ratio", "reward_margin"} <= set(history[0])
    first, last = history[0], sum(r["loss"] for r in history[-3:]) / 3
    assert last < first["loss"] - 0.5, history
    assert sum(r["nll_loss"] for r in history[-3:]) / 3 < first["nll_loss"] - 0.5


@pytest.mark.parametrize("objective", [{"type": "dpo", "loss_type": "ipo"}, {"type": "orpo"}])
def test_batch_4_accum_1_equals_batch_1_accum_4(tmp_path, tiny_model_dir, objective):
    captured = {}
    for batch, accum in ((4, 1), (1, 4)):
        capture = FirstGrads()
        config = load_config(_config(tmp_path / f"b{batch}", tiny_model_dir, objective=objective,
                                     train_overrides={"batch_size": batch, "grad_accum": accum}))
        train(config, extra_callbacks=[capture])
        captured[batch] = capture.grads
    assert captured[4].keys() == captured[1].keys() and captured[4]
    for name, grad in captured[4].items():
        if grad.norm() > 0:
            assert (grad - captured[1][name]).norm() / grad.norm() < 1e-5, name


def test_a_killed_dpo_run_resumes_to_the_same_adapter_and_history(tmp_path, tiny_model_dir):
    """SIGKILL a CLI run once and resume: adapter bytes and every logged value (rewards included) equal the
    uninterrupted run's (log_every 3, save_every 2: reward sums between logs travel in the checkpoint)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import kill_resume

    overrides = {"max_steps": 8, "batch_size": 2, "grad_accum": 2, "log_every": 3, "save_every": 2,
                 "learning_rate": 5e-3, "max_grad_norm": 1.0}
    eval_section = {"every": 4, "at_start": True, "generate_samples": 0}
    reference = train(load_config(_config(tmp_path / "reference", tiny_model_dir, train_overrides=overrides,
                                          eval_section=eval_section)))
    ref_history = kill_resume.history(reference.run_dir)
    assert any("reward_margin" in r and r["step"] == 3 for r in ref_history)

    config = _config(tmp_path / "killed", tiny_model_dir, train_overrides=overrides, eval_section=eval_section)
    run_dir = tmp_path / "killed" / "run"
    assert 2 <= kill_resume.kill_after_checkpoint(config, run_dir) < 8
    resumed = train(load_config(config), resume="auto")
    adapter = resumed.adapter_dir / "adapter_model.safetensors"
    assert adapter.read_bytes() == (reference.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert kill_resume.history(run_dir) == ref_history


def test_the_shipped_preference_set_is_what_the_script_writes(tmp_path):
    for path in write_sample_preference(tmp_path):
        assert (REPO / "examples" / "preference" / "data" / path.name).read_bytes() == path.read_bytes()


def test_data_inspect_and_dry_run_understand_preference_pairs(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir)
    done = subprocess.run([sys.executable, "-m", "lorafit", "data", "inspect", str(config), "--json"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == "preference" and report["train_examples"] == 16 and report["eval_examples"] == 8
    assert report["audit"] == [] and "[[" in report["example"]["chosen"] and "[[" in report["example"]["rejected"]
    checked = train(load_config(config), dry_run=True).dry_run
    assert checked is not None and not (tmp_path / "run" / "checkpoints").exists()
