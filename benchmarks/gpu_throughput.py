"""GPU throughput: lorafit vs TRL SFTTrainer vs a plain PEFT loop, same GPU, same invocation.

    python benchmarks/gpu_throughput.py OUT [--plan 3b|8b|7b-6gb|all|tiny] [--steps 10] [--warmup 3]
                                            [--deadline 460] [--only RUN,RUN] [--profile]

Builds Llama-shaped models with random weights (nothing downloaded; the embedded tiny tokenizer, whose ids fit
any vocabulary), writes synthetic two-turn chats of 160-1,200 words, then runs each RUN in a fresh process and
prints one JSON line per run and a Markdown table: tokens/s (training steps after --warmup, input tokens that
are not padding), MFU (4 x parameters FLOPs per token, LoRA's forward + input gradients, against the GPU's dense
bf16 peak), peak GPU memory (torch.cuda.max_memory_allocated, weights included), whole-process wall time.

Runs (LoRA r16 alpha 32, no dropout, all linear layers, lr 2e-4, max length 2048, packed, batch 4 unless the
shape says otherwise):
  loop            plain PEFT model + AdamW, no Trainer, rows of --seq tokens holding documents of 400-700 tokens
                  (position_ids restart, no mask, use_cache=False, sdpa): the reference a trainer should approach
  trl             TRL SFTTrainer, its defaults (packing bfd; gradient checkpointing on)
  trl_fast        TRL, fastest settings: no checkpointing, liger and flash-attention when installed
  lorafit_plain   lorafit with model.attn_implementation: sdpa, model.kernels: none
  lorafit         lorafit defaults (attention and kernels: auto)
  lorafit_flex    lorafit with model.attn_implementation: flex_attention (block-sparse mask over the packed row)
  *_qlora         loop, lorafit (defaults) and TRL (fastest settings) with a 4-bit NF4 base, bf16 compute
  lorafit_6gb     7B shape, QLoRA, batch 1, gradient checkpointing, paged 8-bit AdamW: the 6 GB-card budget

Each run gets at most the time left before --deadline seconds (from the start); runs that do not fit are listed
as "not run". `--plan tiny` is a CPU smoke test of every runner (OMP_NUM_THREADS=1: about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    "3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=8192),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
}
BF16_RUNS = ["loop", "trl", "trl_fast", "lorafit_plain", "lorafit"]
QLORA_RUNS = ["loop_qlora", "trl_qlora", "lorafit_qlora"]
# (shape, batch, runs). 8B at batch 4 x 2048 without checkpointing needs >100 GB of activations: batch 2.
PLANS = {
    "3b": [("3b", 4, BF16_RUNS + QLORA_RUNS + ["lorafit_flex"])],
    "8b": [("8b", 2, BF16_RUNS + QLORA_RUNS)],
    "7b-6gb": [("7b", 1, ["lorafit_6gb"])],
    "tiny": [("tiny", 2, ["loop", "trl", "lorafit", "lorafit_qlora"])],  # CPU smoke: every runner kind, ~1 minute
}
PLANS["all"] = PLANS["3b"] + PLANS["8b"] + PLANS["7b-6gb"]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense, no sparsity
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------------------------- inputs


def build_model(out: Path, shape: str) -> Path:
    """A random Llama of ``shape`` saved in bf16 with the embedded tokenizer (built on the GPU: seconds, not minutes)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from lorafit.model.tiny import build_tokenizer

    folder = out / f"model-{shape}"
    if (folder / "nparams").is_file():
        return folder
    tokenizer = build_tokenizer()
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "nparams").write_text(str(sum(p.numel() for p in model.parameters())))
    return folder


def write_chats(out: Path, count: int) -> Path:
    path = out / f"chats-{count}.jsonl"
    if path.is_file():
        return path
    rng = random.Random(0)
    words = ("model adapter token layer weight train data loss rank alpha batch step learn answer city name age "
             "job json value field list number text question quick brown fox lazy dog").split()
    with path.open("w") as fh:
        for _ in range(count):
            user = " ".join(rng.choice(words) for _ in range(rng.randint(80, 500)))
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(80, 700)))
            fh.write(json.dumps({"messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": answer}]}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- measuring


class Meter:
    """Input tokens per optimizer step and the time each step ended (after a device sync). ``ends[0]`` is the
    start mark each runner sets just before its first step; step i (1-based) ends at ``ends[i]``."""

    def __init__(self, warmup: int, profile: Path | None = None, steps: int = 0):
        self.warmup, self.tokens, self.ends, self.losses = warmup, [0], [], []
        # --profile: the last two steps run under torch.profiler and are left out of tokens/s
        self.profile, self._profiler, self.profile_from = profile, None, steps - 2 if profile else None

    def count(self, module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.tokens[-1] += int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel()

    def step_done(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.tokens.append(0)
        if self.profile is not None:
            self._profile_steps()

    def _profile_steps(self) -> None:
        """--profile: the last two steps under torch.profiler; the top kernels and ops go to a file."""
        import torch

        if len(self.ends) == self.profile_from + 1:
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
        elif len(self.ends) == self.profile_from + 3 and self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            averages = self._profiler.key_averages()
            by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            text = averages.table(sort_by=by, row_limit=25) + "\n\n" + averages.table(sort_by="cpu_time_total", row_limit=25)
            self.profile.write_text(text)
            self._profiler = None

    def watch(self, model) -> None:
        """Count what enters the decoder stack of ``model`` (wrapped by peft, TRL or not)."""
        inner = next(m for m in model.modules() if type(m).__name__.endswith("Model") and hasattr(m, "embed_tokens"))
        inner.register_forward_pre_hook(self.count, with_kwargs=True)

    def result(self) -> dict:
        steps = len(self.ends) - 1
        if self.profile_from is not None:
            steps = min(steps, self.profile_from)
        if steps < 1:
            return {"steps": 0, "timed_steps": 0, "tokens_per_s": None, "timed_seconds": None}
        first = max(min(self.warmup, steps - 1), 0)  # the steps after `first` are timed
        seconds = self.ends[steps] - self.ends[first]
        tokens = sum(self.tokens[first + 1 : steps + 1])
        return {"steps": steps, "timed_steps": steps - first, "tokens_per_s": round(tokens / seconds, 1),
                "timed_seconds": round(seconds, 2)}


def trainer_callback(meter: Meter):
    """For the TRL runs (transformers' Trainer)."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            meter.watch(model)

        def on_step_end(self, args, state, control, **kwargs):
            meter.step_done()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                meter.losses.append(round(float(logs["loss"]), 4))

    return Timing()


def lorafit_callback(meter: Meter):
    """For the lorafit runs (its own loop's LorafitCallback events)."""
    from lorafit import LorafitCallback

    class Timing(LorafitCallback):
        def on_train_begin(self, loop):
            meter.watch(loop.model)

        def on_step_end(self, step, logs):
            meter.step_done()
            if logs and "loss" in logs:
                meter.losses.append(round(float(logs["loss"]), 4))

    return Timing()


# ---------------------------------------------------------------------------------------------- runners


def bnb_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def run_loop(a, meter: Meter, qlora: bool) -> None:
    """The reference: no Trainer, no data pipeline, one AdamW step per batch."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    extra = {"quantization_config": bnb_config()} if qlora else {}
    extra.update({"device_map": {"": 0}} if qlora and gpu else {})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if gpu or qlora else torch.float32,
                                                 attn_implementation="sdpa", **extra)
    model.config.use_cache = False
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(0)  # the adapter init draws from the RNG
    model = get_peft_model(model, LoraConfig(**LORA))
    if not qlora:
        model = model.to(device)  # a 4-bit model is placed by device_map; transformers refuses .to() on it
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    generator = torch.Generator().manual_seed(0)
    positions = []
    for _ in range(a.batch):  # each row: documents of 400-700 tokens, positions restarting per document
        row = []
        while len(row) < a.seq:
            row += range(int(torch.randint(400, 700, (1,), generator=generator)))
        positions.append(row[: a.seq])
    position_ids = torch.tensor(positions, device=device)
    ids = torch.randint(10, 1000, (a.batch, a.seq), generator=generator).to(device)
    labels = ids.masked_fill(position_ids == 0, -100)  # never predict a document from the previous one
    model.train()
    meter.step_done()  # the start mark
    for step in range(a.steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu or qlora):
            loss = model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.tokens[-1] += ids.numel()
        meter.step_done()
        if step in (0, a.steps - 1):  # reading a loss syncs the device: twice only
            meter.losses.append(round(float(loss), 4))


def run_trl(a, meter: Meter, *, fast: bool, qlora: bool) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available()
    attn = "sdpa"
    if fast:
        from lorafit.model.attention import resolve_attention

        attn = resolve_attention("auto", torch.bfloat16 if gpu else torch.float32)
    extra = {"quantization_config": bnb_config()} if qlora else {}
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if gpu else torch.float32,
                                                 attn_implementation=attn, **extra)
    model.config.use_cache = False  # keeps TRL's padding-free packed rows apart (issue 12's trap); no speed effect
    settings = dict(output_dir=str(a.out / "trl"), per_device_train_batch_size=a.batch, max_steps=a.steps,
                    learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to=[], bf16=gpu,
                    max_length=a.seq, packing=True, packing_strategy="bfd", seed=42)
    if not gpu:
        settings.update(activation_checkpointing=False)  # SFTConfig's GPU defaults fail or crawl on a CPU
    if fast:
        from lorafit.model.kernels import liger_installed

        settings.update(activation_checkpointing=False, use_liger_kernel=gpu and liger_installed(),
                        dataloader_num_workers=2, dataloader_pin_memory=gpu)
    trainer = SFTTrainer(model=model, args=SFTConfig(**settings), processing_class=AutoTokenizer.from_pretrained(a.model),
                         train_dataset=load_dataset("json", data_files=str(a.data), split="train"),
                         peft_config=LoraConfig(**LORA), callbacks=[trainer_callback(meter)])
    meter.step_done()
    trainer.train()


def run_lorafit(a, meter: Meter, *, plain: bool, qlora: bool, budget: bool = False, attn: str | None = None) -> None:
    import torch

    from lorafit import load_config, train

    gpu = torch.cuda.is_available()
    model = {"path": str(a.model), "dtype": "bf16" if gpu else "fp32"}
    if plain:
        model.update(attn_implementation="sdpa", kernels="none")
    if attn:
        model.update(attn_implementation=attn)
    config = {
        "model": model,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": [{"path": str(a.data)}], "max_seq_length": a.seq, "truncation": "truncate",
                 "packing": "bfd", "audit": False},
        "train": {"output_dir": str(a.out / "lorafit-run"), "max_steps": a.steps, "batch_size": a.batch,
                  "learning_rate": 2e-4, "log_every": 1, "save_every": None},
        "eval": {"every": None, "at_start": False, "generate_samples": 0},
    }
    if qlora or budget:
        config["quant"] = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bf16" if gpu else "fp32"}
    if budget:
        config["train"].update(gradient_checkpointing=True, optimizer="paged_adamw_8bit" if gpu else "adamw")
    meter.step_done()
    train(load_config(config), overwrite=True, callbacks=[lorafit_callback(meter)])


RUNNERS = {
    "loop": lambda a, m: run_loop(a, m, qlora=False),
    "loop_qlora": lambda a, m: run_loop(a, m, qlora=True),
    "trl": lambda a, m: run_trl(a, m, fast=False, qlora=False),
    "trl_fast": lambda a, m: run_trl(a, m, fast=True, qlora=False),
    "trl_qlora": lambda a, m: run_trl(a, m, fast=True, qlora=True),
    "lorafit_plain": lambda a, m: run_lorafit(a, m, plain=True, qlora=False),
    "lorafit": lambda a, m: run_lorafit(a, m, plain=False, qlora=False),
    "lorafit_qlora": lambda a, m: run_lorafit(a, m, plain=False, qlora=True),
    "lorafit_6gb": lambda a, m: run_lorafit(a, m, plain=False, qlora=True, budget=True),
    "lorafit_flex": lambda a, m: run_lorafit(a, m, plain=False, qlora=False, attn="flex_attention"),
}
NEEDS = {"trl": ("trl", "datasets"), "qlora": ("bitsandbytes",)}


def child(a) -> None:
    """One run in this process; writes its JSON result."""
    import torch

    meter = Meter(a.warmup, a.out / f"profile-{a.run}.txt" if a.profile else None, a.steps)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    RUNNERS[a.run](a, meter)
    result = meter.result()
    if torch.cuda.is_available():
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:  # on a CPU the process's peak resident memory stands in (Linux reports KiB)
        import resource

        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["loss_first_last"] = meter.losses[:1] + meter.losses[-1:]
    Path(a.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- parent


def missing_packages(run: str) -> list[str]:
    import importlib.util

    wanted = [*NEEDS["trl"]] if run.startswith("trl") else []
    wanted += [*NEEDS["qlora"]] if ("qlora" in run or run == "lorafit_6gb") else []
    return [name for name in wanted if importlib.util.find_spec(name) is None]


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "liger-kernel", "flash-attn"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def run_one(a, shape: str, batch: int, run: str, model: Path, data: Path, left: float) -> dict:
    row = {"shape": shape, "run": run, "batch": batch}
    missing = missing_packages(run)
    if missing:
        return {**row, "status": f"skipped: {', '.join(missing)} not installed"}
    if left < 20:
        return {**row, "status": "not run: time budget"}
    result_file = a.out / f"result-{shape}-{run}.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, str(a.out), "--run", run, "--model", str(model), "--data", str(data),
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--seq", str(a.seq), "--batch", str(batch),
               "--result", str(result_file)] + (["--profile"] if a.profile else [])
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        return {**row, "status": f"timed out after {left:.0f} s", "wall_s": time.perf_counter() - started}
    row["wall_s"] = round(time.perf_counter() - started, 1)
    (a.out / f"log-{shape}-{run}.txt").write_text(done.stdout[-20000:] + "\n---\n" + done.stderr[-20000:])
    if done.returncode != 0 or not result_file.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return {**row, "status": f"failed (rc {done.returncode}): {tail[0][:200]}"}
    return {**row, "status": "ok", **json.loads(result_file.read_text())}


def table(rows: list[dict], peak: float | None) -> str:
    lines = ["| shape | run | batch | tokens/s | MFU (4N) | peak GiB (GPU; CPU: RSS) | whole-process wall s | loss first -> last |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['shape']} | {r['run']} | {r['batch']} | {r['status']} | | | {r.get('wall_s', '')} | |")
            continue
        tps = r.get("tokens_per_s") or 0
        mfu = f"{100 * tps * 4 * r['nparams'] / peak:.1f}%" if peak else "-"
        mem = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        losses = " -> ".join(str(x) for x in r.get("loss_first_last", []))
        lines.append(f"| {r['shape']} | {r['run']} | {r['batch']} | {tps:,.0f} | {mfu} | {mem} | {r['wall_s']} | {losses} |")
    return "\n".join(lines)


def parent(a) -> None:
    import torch

    started = time.perf_counter()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    peak = a.peak_tflops * 1e12 if a.peak_tflops else next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    rows = []
    for shape, batch, runs in PLANS[a.plan]:
        runs = [r for r in runs if not a.only or r in a.only]
        if not runs:
            continue
        if shape == "tiny":
            a.seq, a.chats = min(a.seq, 512), min(a.chats, 60)
        model = build_model(a.out, shape)
        nparams = int((model / "nparams").read_text())
        data = write_chats(a.out, a.chats)
        for run in runs:
            left = a.deadline - (time.perf_counter() - started)
            row = run_one(a, shape, 1 if run == "lorafit_6gb" else batch, run, model, data, left)
            row["nparams"] = nparams
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {gpu}; {versions()}")
    print(f"command: python benchmarks/gpu_throughput.py OUT --plan {a.plan} --steps {a.steps} --warmup {a.warmup} "
          f"--seq {a.seq}; whole invocation {time.perf_counter() - started:.0f} s\n")
    print(table(rows, peak))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--plan", choices=sorted(PLANS), default="3b")
    p.add_argument("--only", type=lambda s: s.split(","), default=None, help="comma-separated runs of the plan")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s (compilation, allocator)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--chats", type=int, default=400)
    p.add_argument("--deadline", type=float, default=460, help="seconds for the whole invocation")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, if the GPU is not in PEAK_BF16")
    p.add_argument("--run", choices=sorted(RUNNERS))  # internal: one run in a child process
    p.add_argument("--model", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--result")
    p.add_argument("--profile", action="store_true", help="write profile-RUN.txt: the top ops of two steps after warmup")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    child(a) if a.run else parent(a)


if __name__ == "__main__":
    main()
