"""GRPO (objective.type: grpo): prompt rows and their errors, config clashes, rewards (built-ins, plugins and their
errors), advantages, the loss and its gradient against TRL's GRPOTrainer for each loss_type, and real runs on the tiny
model: metrics and samples, accumulation equivalence, num_iterations, exact resume after a SIGKILL, a non-finite
reward stopping the run, and two processes with rewards reduced across them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import FirstGrads, REPO, write_jsonl

from lorafit import LorafitCallback, load_config, train
from lorafit.config import DataSource, validate_config
from lorafit.config.grpo import GRPOConfig, RewardConfig
from lorafit.data.formats import FieldMap
from lorafit.data.prompts import PromptCollator, normalise_prompt, read_prompts
from lorafit.errors import LorafitError
from lorafit.training.grpo import GRPOObjective, token_logps
from lorafit.training.rewards import Reward, build_rewards, check_rows, score
from lorafit.training.rollout import advantages

QUICKSTART = [json.loads(line) for line in (REPO / "examples/data/quickstart_train.jsonl").read_text().splitlines()]
PLUGIN = '''
import math, os

def longer(prompts, completions, **kwargs):
    return [min(len(c if isinstance(c, str) else c[-1]["content"]), 30) / 30 for c in completions]

def rank_value(prompts, completions, **kwargs):
    return [float(os.environ.get("RANK", "0"))] * len(completions)

def explode(prompts, completions, reference, **kwargs):
    if any(r == "boom" for r in reference):
        raise ValueError("cannot score boom")
    return [0.0] * len(completions)

def nan_on_bad(prompts, completions, bad=None, **kwargs):
    return [math.nan if b else 0.0 for b in bad]

def a_string(prompts, completions, **kwargs):
    return "1.0"

def one_value(prompts, completions, **kwargs):
    return [0.0]

def none_values(prompts, completions, **kwargs):
    return [None] * len(completions)
'''


@pytest.fixture(autouse=True)
def _fresh_plugin_module():
    """Each test writes its own rewards_plugin.py next to its config: forget the one a previous test imported."""
    yield
    sys.modules.pop("rewards_plugin", None)


# ------------------------------------------------------------------------------------------------------ prompt rows


@pytest.mark.parametrize("row, reference, given", [
    ({"prompt": "Say hi", "reference": "hi"}, "hi", "Say hi"),
    ({"prompt": [{"role": "user", "content": "Say hi"}], "reference": {"a": 1}}, '{"a": 1}',
     [{"role": "user", "content": "Say hi"}]),
    ({"messages": [{"role": "user", "content": "Say hi"}]}, None, [{"role": "user", "content": "Say hi"}]),
    ({"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}, "hi",
     [{"role": "user", "content": "Say hi"}]),
    ({"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}, "hi",
     [{"role": "user", "content": "Say hi"}]),
])
def test_prompt_rows_in_every_shape_end_with_the_user_turn(row, reference, given):
    record = normalise_prompt({**row, "level": 3}, FieldMap({}), "p.jsonl:1")
    assert record.messages == ({"role": "user", "content": "Say hi"},)
    assert record.fields.get("reference") == reference and record.fields["level"] == 3
    assert record.given == given  # what reward functions receive as the prompt: as the row gave it


@pytest.mark.parametrize("row, expected", [
    ({"reference": "x"}, 'p.jsonl:2: field "prompt" (or "conversations") missing'),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     'p.jsonl:2: "prompt" must end with the user turn the model answers'),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "reference": "c"},
     'p.jsonl:2: "messages" ends with an assistant turn and the row has a "reference" too'),
    ({"prompt": "  "}, 'p.jsonl:2: field "prompt" is empty'),
])
def test_a_bad_prompt_row_names_file_line_and_field(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, row])
    with pytest.raises(LorafitError) as info:
        read_prompts(DataSource(path=str(path)))
    assert expected in info.value.render()


def test_the_prompt_collator_pads_on_the_left():
    records = ["a", "b"]
    batch = PromptCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "record": "a"}, {"input_ids": [8], "record": "b"}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]] and batch["records"] == records


# ---------------------------------------------------------------------------------------------------------- config


def _raw(objective: dict, **sections) -> dict:
    return {"data": {"train": [{"path": "t.jsonl"}]}, "objective": objective, **sections}


@pytest.mark.parametrize("raw, message", [
    (_raw({"type": "grpo"}), "GRPO needs at least one reward function"),
    (_raw({"type": "grpo", "grpo": {"rewards": [{"function": "json_valid"}]}}, distributed={"strategy": "fsdp"}),
     "objective.type: grpo with distributed.strategy: fsdp"),
    (_raw({"type": "grpo", "grpo": {"rewards": [{"function": "json_valid"}]}},
          distributed={"strategy": "deepspeed_zero3"}), "needs the whole weights on each process"),
    (_raw({"type": "sft", "grpo": {"num_generations": 8}}), "objective.grpo applies to type: grpo only"),
    (_raw({"type": "grpo", "grpo": {"rewards": [{"function": "jsn_valid"}]}}), "did you mean 'json_valid'?"),
    (_raw({"type": "grpo", "grpo": {"rewards": [{"function": "json_valid", "pattern": "x"}]}}),
     "pattern applies to function: regex only"),
    (_raw({"type": "grpo", "grpo": {"rewards": [{"function": "regex"}]}}), "function: regex needs pattern"),
    (_raw({"type": "grpo", "grpo": {"rewards": [{"function": "json_schema"}]}}), "json_schema needs a schema"),
    (_raw({"type": "grpo", "grpo": {"num_generations": 1, "rewards": [{"function": "json_valid"}]}}),
     "objective.grpo.num_generations"),
    (_raw({"type": "grpo", "grpo": {"max_completion_length": 600, "rewards": [{"function": "json_valid"}]}}),
     "leaves no room for the prompt"),
    (_raw({"type": "sft"}, data={"train": [{"path": "t.jsonl", "format": "prompts"}]}),
     "which only objective.type: grpo trains on"),
])
def test_grpo_settings_that_cannot_work_are_refused_before_training(raw, message):
    with pytest.raises(LorafitError) as info:
        validate_config(raw, base_dir=None)
    assert message in info.value.render()


# --------------------------------------------------------------------------------------------------------- rewards


def _records(rows: list[dict]):
    return [normalise_prompt(row, FieldMap({}), f"p.jsonl:{i}") for i, row in enumerate(rows, 1)]


def _rewards(*specs, folder=None) -> list[Reward]:
    settings = GRPOConfig(max_completion_length=8, rewards=[RewardConfig(**s) for s in specs])
    return build_rewards(settings, eval_config=SimpleNamespace(json_schema=None, citation_pattern=r"\[(\d+)\]"),
                         config_dir=folder)


def test_builtin_rewards_score_each_answer_against_its_row():
    records = _records([{"prompt": "Ana?", "reference": '{"name": "Ana", "age": 41}',
                         "context": "Ana is 41 and lives in Rome."}] * 4)
    rewards = _rewards({"function": "json_valid"}, {"function": "exact_match"}, {"function": "field_accuracy"},
                       {"function": "rouge_l"}, {"function": "groundedness"}, {"function": "regex", "pattern": r"^\{"},
                       {"function": "length_penalty", "soft_limit": 4})
    check_rows(rewards, [SimpleNamespace(record=r) for r in records], citation_pattern=r"\[(\d+)\]")
    answers = ['{"name": "Ana", "age": 41}', '{"name": "Ana", "age": "41"}', "Ana lives in Rome.", "no"]
    ids = [[1] * 2, [1] * 5, [1] * 6, [1] * 8]
    got = score(rewards, records, answers, ids)
    assert got.shape == (4, 7) and got.dtype == torch.float32
    assert got[:, 0].tolist() == [1, 1, 0, 0]  # json_valid
    assert got[:, 1].tolist() == [1, 0, 0, 0]  # exact_match
    assert got[:, 2].tolist() == [1, 0.5, 0, 0]  # field_accuracy ("41" is not 41)
    assert got[0, 3] == 1 and 0 < got[2, 3] < 1  # rouge_l
    assert got[2, 4] == 1 and got[3, 4] == 0  # groundedness: "no" has no content word the context holds
    assert got[:, 5].tolist() == [1, 1, 0, 0]  # regex
    assert got[:, 6].tolist() == pytest.approx([0, -0.25, -0.5, -1])  # DAPO's soft overlong punishment


def test_length_penalty_equals_trls_soft_overlong_punishment():
    pytest.importorskip("trl", reason="TRL is the reference implementation (dev extra)")
    from trl.rewards import get_soft_overlong_punishment

    ids = [[0] * n for n in range(0, 9)]
    mine = score(_rewards({"function": "length_penalty", "soft_limit": 3}), _records([{"prompt": "x"}] * 9),
                 ["a"] * 9, ids)[:, 0].tolist()
    assert mine == pytest.approx(get_soft_overlong_punishment(8, 3)(ids))


def test_rows_without_what_a_builtin_reward_compares_against_are_listed_before_training():
    records = _records([{"prompt": "a", "reference": "x"}, {"prompt": "b"}, {"prompt": "c", "reference": "plain"}])
    examples = [SimpleNamespace(record=r) for r in records]
    with pytest.raises(LorafitError) as info:
        check_rows(_rewards({"function": "exact_match"}), examples, citation_pattern="x")
    assert 'reward exact_match: 1 row(s) lack a "reference" field' in info.value.render()
    assert "p.jsonl:2" in info.value.render()
    with pytest.raises(LorafitError) as info:
        check_rows(_rewards({"function": "field_accuracy"}), examples, citation_pattern="x")
    assert "p.jsonl:1" in info.value.render() and "p.jsonl:3" in info.value.render()


@pytest.mark.parametrize("function, message", [
    ("explode", "reward rewards_plugin:explode raised ValueError: cannot score boom (row p.jsonl:3)"),
    ("a_string", "reward rewards_plugin:a_string returned a str"),
    ("one_value", "reward rewards_plugin:one_value returned 1 values for 4 answers"),
    ("none_values", "reward rewards_plugin:none_values returned None (NoneType) for row p.jsonl:1"),
    ("nan_on_bad", "reward rewards_plugin:nan_on_bad returned nan for row p.jsonl:2: a reward must be finite"),
])
def test_a_plugin_reward_that_fails_names_the_function_and_the_row(tmp_path, function, message):
    (tmp_path / "rewards_plugin.py").write_text(PLUGIN)
    rewards = _rewards({"function": f"rewards_plugin:{function}"}, folder=tmp_path)
    records = _records([{"prompt": "a", "reference": "x", "bad": False}, {"prompt": "b", "reference": "y", "bad": True},
                        {"prompt": "c", "reference": "boom", "bad": False}, {"prompt": "d", "reference": "z", "bad": False}])
    with pytest.raises(LorafitError) as info:
        score(rewards, records, ["w"] * 4, [[1]] * 4)
    assert message in info.value.render()


def test_a_plugin_function_is_found_next_to_the_config_and_named_when_missing(tmp_path):
    (tmp_path / "rewards_plugin.py").write_text(PLUGIN)
    [reward] = _rewards({"function": "rewards_plugin:longer", "weight": 0.5}, folder=tmp_path)
    assert (reward.name, reward.weight) == ("longer", 0.5)
    with pytest.raises(LorafitError) as info:
        _rewards({"function": "rewards_plugin:shorter"}, folder=tmp_path)
    assert "has no function 'shorter'" in info.value.render() and "longer" in info.value.render()


# ------------------------------------------------------------------------------------------- advantages and loss


def _trl_advantages(rewards_per_func, weights, group, scale):
    """trl/trainer/grpo_trainer.py (1.16), _generate_and_score_completions, multi_objective_aggregation
    sum_then_normalize: the lines that turn rewards into advantages, with trl's own nanstd."""
    from trl.trainer.utils import nanstd

    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    mean_grouped = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    out = rewards - mean_grouped
    return out / (std + 1e-4) if scale != "none" else out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trls(scale):
    pytest.importorskip("trl", reason="TRL is the reference implementation (dev extra)")
    from trl.trainer.utils import nanstd

    torch.manual_seed(1)
    per_func, weights = torch.rand(12, 2), torch.tensor([1.0, 0.5])
    totals = (per_func * weights.unsqueeze(0)).nansum(dim=1)
    batch_std = float(nanstd(totals)) if scale == "batch" else None
    mine, group_std = advantages(totals, 4, scale, batch_std)
    assert torch.equal(mine, _trl_advantages(per_func, weights, 4, scale))
    assert torch.allclose(group_std, nanstd(totals.view(-1, 4), dim=1))


def _peft_model(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a trained-looking adapter: policy, old policy and reference all differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def _fixed_batch(tokenizer, model, *, width: int, temperature: float):
    """2 prompts x 2 answers of unequal length (one cut at the limit, the others ending at <|end|>), their
    left-padded prompts and right-padded answers, old log-probs off the current ones, and advantages."""
    from lorafit.data.collate import left_padded
    from lorafit.training.preference import reference_model

    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for q in ("Extract: Ana is 41.", "Say twice: red")] * 1
    prompts = [p for p in prompts for _ in range(2)]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    answers = [tokenizer('{"name": "Ana"}', add_special_tokens=False)["input_ids"][:width - 1] + [end],
               tokenizer("Ana is 41 years old and lives far away from here", add_special_tokens=False)["input_ids"][:width],
               tokenizer("red red", add_special_tokens=False)["input_ids"] + [end],
               tokenizer("blue", add_special_tokens=False)["input_ids"] + [end]]
    prompt_ids, prompt_mask = left_padded(prompts, tokenizer.pad_token_id)
    completion_ids = torch.full((4, width), tokenizer.pad_token_id)
    completion_mask = torch.zeros((4, width), dtype=torch.long)
    for row, ids in enumerate(answers):
        completion_ids[row, :len(ids)], completion_mask[row, :len(ids)] = torch.tensor(ids), 1
    input_ids, attention_mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        current = token_logps(model, input_ids, attention_mask, width, temperature)
        with reference_model(model):
            ref = token_logps(model, input_ids, attention_mask, width, temperature)
    torch.manual_seed(3)
    old = current + 0.3 * torch.randn_like(current)  # ratios off 1 on both sides: some tokens clip
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "input_ids": input_ids, "attention_mask": attention_mask,
            "old": old, "ref": ref, "advantages": torch.tensor([1.2, -0.8, 0.5, -0.9])}


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_and_gradient_equal_trl_grpotrainer(tmp_path, tiny_model_dir, tiny_tokenizer, loss_type):
    """The same prompts, answers, advantages, old and reference log-probs through GRPOTrainer._compute_loss
    (trl 1.16) and lorafit's objective: equal loss and equal gradient of every LoRA weight, to 1e-5."""
    pytest.importorskip("trl", reason="TRL is the reference implementation (dev extra)")
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    width, temperature, knobs = 12, 0.7, {"beta": 0.05, "epsilon": 0.2, "epsilon_high": 0.28}
    model = _peft_model(tiny_model_dir)
    args = TRLConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                     max_completion_length=width, loss_type=loss_type, temperature=temperature, report_to="none",
                     use_cpu=True, bf16=False, **knobs)
    trl = GRPOTrainer(model=model, reward_funcs=lambda prompts, completions, **_: [0.0] * len(prompts), args=args,
                      processing_class=tiny_tokenizer, train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4))
    trl.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this test does not run
    model.train()
    b = _fixed_batch(tiny_tokenizer, model, width=width, temperature=temperature)
    trainable = [p for p in model.parameters() if p.requires_grad]

    trl_loss = trl._compute_loss(model, {
        "prompt_ids": b["prompt_ids"], "prompt_mask": b["prompt_mask"], "completion_ids": b["completion_ids"],
        "completion_mask": b["completion_mask"], "advantages": b["advantages"], "old_per_token_logps": b["old"],
        "ref_per_token_logps": b["ref"], "num_items_in_batch": b["completion_mask"].sum()})
    trl_grads = torch.autograd.grad(trl_loss, trainable)

    objective = GRPOObjective(GRPOConfig(max_completion_length=width, temperature=temperature, loss_type=loss_type,
                                         num_iterations=2, **knobs), [], seed=0)
    batch = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "completion_mask": b["completion_mask"],
             "advantages": b["advantages"], "old_logps": b["old"], "ref_logps": b["ref"], "completions": 4,
             "completion_tokens": int(b["completion_mask"].sum()), "fresh": False}
    loss, metrics = objective.compute(model, batch)
    grads = torch.autograd.grad(loss, trainable)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    for mine, theirs in zip(grads, trl_grads):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-7)
    logged = {k: v[-1] for k, v in trl._metrics["train"].items()}
    clip, kl = (s / w for s, w in (metrics["clip_ratio"], metrics["kl"]))
    assert clip.item() == pytest.approx(logged["clip_ratio/region_mean"], abs=1e-6) and clip > 0  # something clipped
    assert kl.item() == pytest.approx(logged["kl"], rel=1e-5)


def test_step_totals_make_any_split_of_a_step_the_same_loss(tiny_model_dir, tiny_tokenizer):
    """dapo: each micro-batch divides by the whole step's answer tokens; the shares add up to the one-batch loss."""
    from lorafit.training.objectives import StepTotals

    model = _peft_model(tiny_model_dir)
    b = _fixed_batch(tiny_tokenizer, model, width=12, temperature=1.0)
    objective = GRPOObjective(GRPOConfig(max_completion_length=12, num_iterations=2), [], seed=0)

    def batch(rows):
        mask = b["completion_mask"][rows]
        return {"input_ids": b["input_ids"][rows], "attention_mask": b["attention_mask"][rows], "completion_mask": mask,
                "advantages": b["advantages"][rows], "old_logps": b["old"][rows], "completions": len(mask),
                "completion_tokens": int(mask.sum()), "fresh": False}
    whole, _ = objective.compute(model, batch(slice(0, 4)))
    totals = StepTotals(tokens=int(b["completion_mask"].sum()), examples=4)
    parts = sum(objective.compute(model, batch(rows), totals)[0] for rows in (slice(0, 1), slice(1, 4)))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------------- real runs


def _config(folder: Path, model_dir: Path, *, grpo=None, train_overrides=None, eval_section=None, rows=None,
            eval_rows=None, lora=None, extra=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rewards_plugin.py").write_text(PLUGIN)
    sys.modules.pop("rewards_plugin", None)  # a test with two configs: each run imports the module next to its own
    write_jsonl(folder / "train.jsonl", rows or QUICKSTART[:8])
    sections = {"eval": eval_section or {"every": None, "at_start": False}}
    data = {"train": [{"path": "train.jsonl"}], "max_seq_length": 256}
    if eval_rows:
        write_jsonl(folder / "eval.jsonl", eval_rows)
        data["eval"] = [{"path": "eval.jsonl"}]
    config = {
        "model": {"path": str(model_dir)},
        "lora": lora or {"r": 4, "alpha": 8, "dropout": 0.0},
        "objective": {"type": "grpo", "grpo": {"num_generations": 2, "max_completion_length": 10, "beta": 0.04,
                                               "rewards": [{"function": "rouge_l"},
                                                           {"function": "rewards_plugin:longer", "weight": 0.5}],
                                               **(grpo or {})}},
        "data": data,
        "train": {"output_dir": str(folder / "run"), "max_steps": 2, "batch_size": 4, "grad_accum": 1,
                  "group_by_length": False, "log_every": 1, "seed": 3, "learning_rate": 5e-3, **(train_overrides or {})},
        **sections, **(extra or {}),
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics_history.jsonl").read_text().splitlines()]


def test_a_grpo_run_logs_rewards_kl_and_samples_and_its_report_shows_them(tmp_path, tiny_model_dir):
    eval_rows = QUICKSTART[20:24]
    result = train(load_config(_config(tmp_path, tiny_model_dir, eval_rows=eval_rows,
                                       eval_section={"every": 2, "at_start": True})))
    history = _history(result.run_dir)
    trained = [r for r in history if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2]
    for key in ("reward", "reward_std", "reward/rouge_l", "reward/longer", "reward_std/longer", "kl",
                "completion_length", "clip_ratio", "zero_std_groups", "generation_seconds"):
        assert key in trained[0], key
    # The total is the weighted sum of the functions' means; answers are at most max_completion_length tokens.
    assert trained[0]["reward"] == pytest.approx(trained[0]["reward/rouge_l"] + 0.5 * trained[0]["reward/longer"])
    assert 0 < trained[0]["completion_length"] <= 10 and trained[0]["kl"] == 0  # step 1: policy = reference
    evals = [r for r in history if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 2] and "eval_reward/longer" in evals[0]
    samples = [json.loads(line) for line in (result.run_dir / "completion_samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and len(samples) == 4  # 2 answers of each step's first prompt
    assert set(samples[0]["rewards"]) == {"rouge_l", "longer"}
    report = (result.run_dir / "report.html").read_text()
    assert '</svg><figcaption>Rewards</figcaption>' in report and "Sampled answers during training" in report
    assert samples[0]["completion"][:20] in report.replace("&quot;", '"').replace("&#x27;", "'")


@pytest.mark.parametrize("grpo", [{"loss_type": "dapo", "scale_rewards": "batch"}, {"loss_type": "grpo"}])
def test_batch_4_accum_1_equals_batch_2_accum_2(tmp_path, tiny_model_dir, grpo):
    """One step's answers are sampled in one call for the whole step, so both layouts train on the same answers;
    the loss shares over the step's totals then give the same gradients."""
    captured = {}
    for batch, accum in ((4, 1), (2, 2)):
        capture = FirstGrads()
        config = load_config(_config(tmp_path / f"b{batch}", tiny_model_dir, grpo=grpo,
                                     train_overrides={"batch_size": batch, "grad_accum": accum, "max_steps": 1}))
        train(config, callbacks=[capture])
        captured[batch] = capture.grads
    assert captured[4].keys() == captured[2].keys() and captured[4]
    assert any(g.norm() > 0 for g in captured[4].values())
    for name, grad in captured[4].items():
        if grad.norm() > 0:
            assert (grad - captured[2][name]).norm() / grad.norm() < 1e-5, name


def test_num_iterations_trains_each_generation_several_steps_clipped_against_it(tmp_path, tiny_model_dir):
    """num_iterations 2: steps 1-2 train on one generation of the first 4 prompts, steps 3-4 on the next; the
    second step's ratio is not 1 (the policy moved), so clipping can act; rewards are logged once per generation."""
    seen = []

    class Answers(LorafitCallback):
        def on_before_optimizer_step(self, step, loop):
            buffer = loop.objective.buffer
            seen.append((step, [b["input_ids"].clone() for b in buffer], [b["old_logps"].clone() for b in buffer]))

    result = train(load_config(_config(tmp_path, tiny_model_dir, grpo={"num_iterations": 2},
                                       train_overrides={"max_steps": 4, "learning_rate": 2e-2})),
                   callbacks=[Answers()])
    (s1, ids1, old1), (s2, ids2, old2), (s3, ids3, _), _ = seen
    assert torch.equal(ids1[0], ids2[0]) and torch.equal(old1[0], old2[0])  # step 2 reused step 1's answers
    assert not torch.equal(ids1[0], ids3[0])  # step 3 sampled again, for other prompts
    history = {r["step"]: r for r in _history(result.run_dir)}
    assert "reward" in history[1] and "reward" not in history[2] and "reward" in history[3]
    assert history[1]["clip_ratio"] == 0 and history[2]["clip_ratio"] >= 0 and history[2]["kl"] > 0


def test_beta_0_takes_no_reference_pass_and_logs_no_kl(tmp_path, tiny_model_dir):
    kept = []

    class Batches(LorafitCallback):
        def on_before_optimizer_step(self, step, loop):
            kept.extend(loop.objective.buffer)

    result = train(load_config(_config(tmp_path, tiny_model_dir, grpo={"beta": 0.0, "num_iterations": 2},
                                       train_overrides={"max_steps": 1})), callbacks=[Batches()])
    assert kept and all("ref_logps" not in b and "old_logps" in b for b in kept)
    trained = [r for r in _history(result.run_dir) if "loss" in r]
    assert "kl" not in trained[0] and "reward" in trained[0]


def test_a_killed_grpo_run_resumes_to_the_same_adapter_and_history(tmp_path, tiny_model_dir):
    """SIGKILL the CLI after the checkpoint of step 3 (mid num_iterations: step 4 reuses step 3's answers, which
    travel in the checkpoint) and resume: the adapter bytes and every logged value equal the uninterrupted run's
    (the sampling stream is per step, so the resumed run samples the very same answers)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import kill_resume

    overrides = {"max_steps": 6, "log_every": 2, "save_every": 3, "batch_size": 2, "grad_accum": 2}
    grpo = {"num_iterations": 2}
    lora = {"r": 4, "alpha": 8, "dropout": 0.1}  # switched off by the objective (objective.disable_dropout)
    reference = train(load_config(_config(tmp_path / "reference", tiny_model_dir, grpo=grpo, lora=lora,
                                          train_overrides=overrides)))
    ref_history = kill_resume.history(reference.run_dir)
    config = _config(tmp_path / "killed", tiny_model_dir, grpo=grpo, lora=lora, train_overrides=overrides)
    run_dir = tmp_path / "killed" / "run"
    assert kill_resume.kill_after_checkpoint(config, run_dir, step=3) == 3
    resumed = train(load_config(config), resume="auto")
    adapter = "adapter_model.safetensors"
    assert (resumed.adapter_dir / adapter).read_bytes() == (reference.adapter_dir / adapter).read_bytes()
    assert kill_resume.history(run_dir) == ref_history
    samples = [json.loads(line)["step"] for line in (run_dir / "completion_samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples) and len(samples) == len(set(samples)) * 2  # no step written twice


def test_a_non_finite_reward_stops_the_run_naming_the_row_and_trains_nothing(tmp_path, tiny_model_dir):
    rows = [{**row, "bad": i == 2} for i, row in enumerate(QUICKSTART[:4])]
    config = load_config(_config(tmp_path, tiny_model_dir, rows=rows, train_overrides={"save_every": 1},
                                 grpo={"rewards": [{"function": "rewards_plugin:nan_on_bad"}]}))
    with pytest.raises(LorafitError) as info:
        train(config)
    assert "reward rewards_plugin:nan_on_bad returned nan for row" in info.value.render()
    assert "train.jsonl:3" in info.value.render()
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "failed"
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))


def test_two_processes_reduce_rewards_across_them(tmp_path, tiny_model_dir):
    """`--nproc 2` (gloo): each process samples its own answers; a reward that is the process's rank logs 0.5
    (the mean over both processes' answers), and the batch-scaled advantages use the std of both."""
    config = _config(tmp_path, tiny_model_dir, grpo={"scale_rewards": "batch", "rewards": [
        {"function": "rewards_plugin:rank_value"}, {"function": "rewards_plugin:longer"}]},
        train_overrides={"batch_size": 2, "max_steps": 2})
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lorafit", "train", str(config), "--nproc", "2"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    trained = [r for r in _history(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2]
    assert all(r["reward/rank_value"] == 0.5 for r in trained)
    assert all(math.isfinite(r["reward"]) and r["reward_std/rank_value"] == 0 for r in trained)
    samples = (tmp_path / "run" / "completion_samples.jsonl").read_text().splitlines()
    assert len(samples) == 4  # the main process alone writes: 2 answers of each step's first prompt


def test_data_inspect_and_dry_run_understand_prompt_rows(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, eval_rows=QUICKSTART[20:22])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lorafit", "data", "inspect", str(config), "--json"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == "prompts" and report["train_examples"] == 8 and report["eval_examples"] == 2
    assert report["audit"] == [] and report["example"]["prompt"].endswith("<|assistant|>\n")
    assert report["example"]["fields"]["reference"].startswith('{"name"')
    checked = train(load_config(config), dry_run=True).dry_run
    assert checked["batch_rows"] == 8  # 4 prompts x 2 answers, sampled during the check
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_shipped_example_trains_on_its_prompts_with_its_plugin_rewards(tmp_path):
    """examples/grpo/ages.yaml (its numbers are in README and docs/objectives.md), 3 steps: its plugin rewards load
    from its folder, score as documented, and every reward function is logged."""
    sys.modules.pop("age_rewards", None)
    example = REPO / "examples" / "grpo" / "ages.yaml"
    config = load_config(example, [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.log_every=1",
                                   "eval.every=null", "eval.at_start=false"])
    result = train(config)
    trained = [r for r in _history(result.run_dir) if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3]
    age_rewards = sys.modules["age_rewards"]  # imported by the run, from the config's folder
    assert Path(age_rewards.__file__).parent == example.parent
    assert age_rewards.digit_share([], ["26", "a1", "", "ab"]) == [1.0, 0.5, 0.0, 0.0]
    assert age_rewards.says_the_age([], ["26 years", "25"], reference=["26", "26"]) == [1.0, 0.0]
    for key in ("reward/digit_share", "reward/says_the_age", "reward/exact_match"):
        assert 0 <= trained[0][key] <= 1, key
    sys.modules.pop("age_rewards", None)
