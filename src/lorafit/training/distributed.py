"""Several processes, one run: who is who, where they wait for each other, what they reduce, and the
TrainingArguments each strategy needs (docs/scaling.md).

A launcher (torchrun, or ``lorafit train --nproc N``, which re-runs the command under torchrun) starts every
process with RANK/WORLD_SIZE/LOCAL_RANK set; each runs the same recipe. transformers' Trainer and accelerate do
the distributed training itself (DDP, FSDP2, DeepSpeed ZeRO): lorafit adds only

    init_processes     the process group, before the data is read (the main process tokenises and caches first)
    barrier            the others wait while the main process writes run files, checkpoints and the artifact
    sum_across_ranks   supervised-token counts (each process counts its own shard's labels)
    gather_objects     each process's RNG state and loss accumulator, for the checkpoint the main process writes
    strategy_arguments the TrainingArguments of distributed.strategy
    require_same_world_size   a checkpoint resumes only with the world size that wrote it

With one process every function here is a no-op, and no process group is created.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from lorafit.config import Config
from lorafit.errors import LorafitError


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def init_processes(config: Config) -> None:
    """Join the launcher's process group now (Trainer would only do it when the Trainer is built), so the
    processes can wait for each other while the data is read. accelerate finds the group and uses it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    from datetime import timedelta

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # gloo beside nccl: the small Python objects gathered for checkpoints travel on the CPU.
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=timedelta(minutes=config.distributed.timeout_minutes))


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


@contextmanager
def main_process_first():
    """The main process runs the block first (it fills the data cache); the others run it after, reading the
    cache it wrote instead of tokenising the same files again."""
    main = rank() == 0
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


def sum_across_ranks(value: int) -> int:
    """Sum of ``value`` over every process (each counts its own shard); ``value`` itself with one process."""
    if not _active():
        return value
    # A "cuda:nccl,cpu:gloo" group (init_processes) reduces a CPU tensor with gloo; a pure nccl group, made by
    # someone else before lorafit, needs it on the GPU.
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    total = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(total)
    return int(total.item())


def gather_objects(value) -> list:
    """Every process's ``value``, in rank order (a one-element list with one process)."""
    if not _active():
        return [value]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def broadcast_from_main(value):
    """The main process's ``value`` on every process (``value`` itself with one process)."""
    if not _active():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def strategy_arguments(config: Config) -> dict:
    """The TrainingArguments keywords of ``distributed.strategy`` (accelerate builds the plugin from them)."""
    d = config.distributed
    args = {"ddp_find_unused_parameters": False, "ddp_timeout": d.timeout_minutes * 60}
    if d.strategy == "fsdp":
        args["fsdp"] = True
        args["fsdp_config"] = {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one shard unit per decoder layer (the model's _no_split_modules)
            "reshard_after_forward": True,
            "cpu_offload": d.fsdp_cpu_offload,
            # the main process reads the weights, the others get them from it: one copy in CPU memory, not N
            "cpu_ram_efficient_loading": False,
            "state_dict_type": "FULL_STATE_DICT",
        }
    elif d.strategy.startswith("deepspeed_zero"):
        args["deepspeed"] = deepspeed_config(int(d.strategy[-1]), config)
    return args


def deepspeed_config(stage: int, config: Config) -> dict:
    """A DeepSpeed config whose batch, precision and clipping values are "auto": Trainer fills them from its own
    arguments, so the config file cannot disagree with the lorafit config."""
    from lorafit.model.quantization import mixed_precision

    precision = mixed_precision(config)
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        # peft's adapter weights are gathered for saving; 16-bit weights on save keeps the artifact loadable.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def require_same_world_size(folder: Path, saved: int) -> None:
    """Refuse to resume a checkpoint written by another number of processes.

    Resharding would be possible for DDP (every process holds the same adapter and optimizer state), but the
    data position is not: each process's place in its shard, its RNG state and its loss accumulator belong to a
    split of the data that another world size does not have. A resume that is not exact is not offered."""
    current = world_size()
    if saved != current:
        raise LorafitError(
            f"cannot resume from {folder}: it was written by {saved} process{'es' * (saved != 1)}, this run has "
            f"{current}",
            why="each process's data shard, RNG state and loss accumulator are saved per process; another world "
            "size splits the data differently, so the resumed run would not continue the same run",
            fix=f"resume with the same number of processes (lorafit train CONFIG --nproc {saved} --resume auto), or "
            "start a new run (another train.output_dir, or --overwrite)",
        )


# ---------------------------------------------------------------------------------------------- checkpoints
# A checkpoint is written by the main process, but some of what it holds lives on every process: the adapter and
# optimizer shards under FSDP/ZeRO-3, and each process's RNG and loss accumulator under any strategy.


def strategy_of(trainer) -> str:
    if trainer.is_fsdp_enabled:
        return "fsdp"
    if trainer.is_deepspeed_enabled:
        return "deepspeed"
    return "ddp" if world_size() > 1 else "single"


def checkpoint_state(trainer) -> dict:
    """What every process contributes to a checkpoint; call it on every process (it gathers)."""
    from lorafit.training.checkpoint import capture_rng

    strategy = strategy_of(trainer)
    own = {"rng": capture_rng(), "tr_loss": trainer._tr_loss.detach().cpu()}
    return {
        "strategy": strategy,
        "adapter": adapter_tensors(trainer),
        "optimizer": _optimizer_state(trainer, strategy),
        "ranks": gather_objects(own) if world_size() > 1 else None,
    }


def adapter_tensors(trainer) -> dict[str, torch.Tensor]:
    """The full adapter on the CPU. Under FSDP2 each parameter is a DTensor shard: ``full_tensor`` gathers it
    (every process, same order); under ZeRO-3 DeepSpeed gathers the adapter parameters (only those, not the base)."""
    from peft import get_peft_model_state_dict

    model = trainer.model
    if trainer.is_deepspeed_enabled and _zero_stage(trainer) == 3:
        import deepspeed

        trainable = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable):
            return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    state = get_peft_model_state_dict(model)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
            for k, v in state.items()}


def _zero_stage(trainer) -> int:
    return trainer.accelerator.state.deepspeed_plugin.zero_stage


def _raw_optimizer(trainer):
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's AcceleratedOptimizer wraps it


def _optimizer_state(trainer, strategy: str):
    if strategy == "deepspeed":
        return None  # ZeRO partitions it in its own format: these checkpoints do not resume (load_optimizer_state)
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # The unsharded state, keyed by parameter name, on the main process (the others get an empty dict).
        return get_optimizer_state_dict(trainer.model, _raw_optimizer(trainer),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return trainer.optimizer.state_dict()


def load_optimizer_state(trainer, state) -> None:
    if state is None:
        raise LorafitError(
            "this checkpoint was written by a DeepSpeed run: it holds the adapter but not the optimizer state",
            why="ZeRO partitions the optimizer state in DeepSpeed's own format, which lorafit does not save (it "
            "would need pickle); resuming without it would not continue the same run",
            fix="train resumable runs with distributed.strategy: ddp or fsdp; to continue from this adapter, "
            "start a new run from it",
        )
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # Every process reads the same file, so each takes its own shard of the full state.
        set_optimizer_state_dict(trainer.model, _raw_optimizer(trainer), state,
                                 options=StateDictOptions(full_state_dict=True))
        return
    trainer.optimizer.load_state_dict(state)


def own_rank_state(state: dict) -> dict:
    """This process's RNG state and loss accumulator from a checkpoint's training state."""
    ranks = state.get("ranks")
    if ranks:
        return ranks[rank()]
    return {"rng": state["rng"], "tr_loss": state["loop"]["tr_loss"]}


def unshard_for_outputs(trainer) -> None:
    """After the last step, give every process the whole (adapter and base) weights back, for what the recipe
    does with the trained model: the frozen-weights check, generation, the best-adapter restore and the artifact.

    Under FSDP2 the parameters are DTensor shards; ``unshard`` all-gathers them into plain tensors. Under ZeRO-3
    DeepSpeed gathers them while its context is open; it is left open, as nothing trains after this point. This
    costs one full copy of the model per process at the end of the run: the same as DDP holds throughout."""
    if trainer.is_fsdp_enabled:
        from torch.distributed.fsdp import FSDPModule

        for module in trainer.model.modules():
            if isinstance(module, FSDPModule):
                module.unshard()
    elif trainer.is_deepspeed_enabled and _zero_stage(trainer) == 3:
        import deepspeed

        deepspeed.zero.GatheredParameters(list(trainer.model.parameters())).__enter__()



def check_strategy_can_run(config: Config) -> None:
    """Before Trainer is built: FSDP and DeepSpeed need CUDA GPUs and a launcher (transformers raises a bare
    ValueError without a launcher; accelerate silently drops them on a CPU, see require_strategy_active)."""
    wanted = config.distributed.strategy
    if wanted == "ddp":
        return
    if not torch.cuda.is_available():
        _refuse_strategy(wanted, "on a CPU")
    if "WORLD_SIZE" not in os.environ:
        _refuse_strategy(wanted, "without a launcher")


def require_strategy_active(config: Config, trainer) -> None:
    """Refuse a run in which accelerate dropped the asked-for strategy. accelerate applies FSDP and DeepSpeed only
    to processes on GPUs started by a launcher; elsewhere it trains without them and says nothing (measured with
    accelerate 1.15: an fsdp run of 2 CPU processes trained with plain DDP)."""
    wanted, active = config.distributed.strategy, strategy_of(trainer)
    if wanted == "fsdp" and active != "fsdp" or wanted.startswith("deepspeed") and active != "deepspeed":
        _refuse_strategy(wanted, f"accelerate set up {'one process' if active == 'single' else active}")


def _refuse_strategy(wanted: str, where: str):
    raise LorafitError(
        f"distributed.strategy: {wanted} is not possible in this run ({where})",
        why="accelerate applies FSDP and DeepSpeed only to processes on CUDA GPUs started by a launcher; otherwise "
        "it trains without them, and the run would not be the one the config asks for",
        fix="run on CUDA GPUs with lorafit train CONFIG --nproc N (--nproc 1 for one GPU), or set "
        "distributed.strategy: ddp",
    )
