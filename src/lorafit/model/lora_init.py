"""How a LoRA adapter starts (``lora.init``), and what that means for the base weights.

    default  A Kaiming-uniform, B = 0: the adapted model equals the base at step 0 (the LoRA paper)
    gaussian A ~ N(0, (1/r)^2), B = 0: the same, with a Gaussian A
    pissa    A, B from the top-r singular vectors of each adapted weight W (PiSSA); the base keeps the residual
             W - scale * B0 @ A0, so the model still equals the base at step 0 but the frozen weights are NOT W
    pissa_niter_N  the same with a randomised SVD of N subspace iterations (faster on large matrices)
    olora    A, B from a QR decomposition of W (OLoRA); the base keeps W - scale * B0 @ A0 like PiSSA

PiSSA and OLoRA change the frozen weights, so an adapter saved as trained fits only that residual base. lorafit
publishes it converted to fit the ORIGINAL base (``convert_to_original_base``): the update the training made is
``scale * (B @ A - B0 @ A0) = scale * [B | -B0] @ [A ; A0]``, a plain LoRA adapter of rank 2r with the same scale.
That is peft's own conversion (``save_pretrained(path_initial_model_for_weight_conversion=...)``,
``LoraModel.subtract_mutated_init``), done here from the initial adapter kept in memory because peft 0.21's keeps
only lora_A/lora_B tensors and would silently drop modules_to_save, DoRA magnitudes and trained biases.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# peft values of init_lora_weights that rewrite the base weights (peft also has corda, lora_ga, loftq; lorafit
# does not offer them, but an adapter saved with any of them does not fit an unchanged base either).
MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
INIT_ATTRIBUTE = "lorafit_initial_adapter"  # set on the PeftModel by attach_lora for a mutating init


def peft_init_value(init: str):
    """``lora.init`` as peft's ``init_lora_weights``: True for lorafit's 'default', the name otherwise."""
    return True if init == "default" else init


def mutates_base(init) -> bool:
    """Whether peft's ``init_lora_weights`` value rewrites the frozen base weights when the adapter is created
    (or loaded: peft re-runs the initialisation on the base it loads an adapter onto)."""
    return isinstance(init, str) and init.lower().startswith(MUTATING_INITS)


@dataclass
class InitialAdapter:
    """The adapter's values at step 0, for a mutating init: what the conversion subtracts, and what puts the
    model back to the base for a base-vs-adapter comparison (disabling the adapter would show the residual)."""

    init: str
    state: dict  # get_peft_model_state_dict keys (as saved in adapter_model.safetensors) -> tensor at step 0
    parameters: dict  # named_parameters keys -> every trainable tensor at step 0

    @classmethod
    def capture(cls, model, init: str) -> "InitialAdapter":
        from peft import get_peft_model_state_dict

        return cls(
            init=init,
            state={k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()},
            parameters={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        )

    def changed(self, model) -> bool:
        """Whether any trainable tensor moved away from its step-0 value."""
        import torch

        return any(not torch.equal(p.detach().cpu(), self.parameters[n].cpu())
                   for n, p in model.named_parameters() if n in self.parameters)


def initial_adapter(model) -> InitialAdapter | None:
    return getattr(model, INIT_ATTRIBUTE, None)


@contextmanager
def base_view(model):
    """The model as the base behaves: the adapter disabled, or, after a mutating init (where disabling leaves the
    residual base), every trainable tensor put back to its step-0 value (residual + initial adapter = the base)."""
    import torch

    initial = initial_adapter(model)
    if initial is None:
        with model.disable_adapter():
            yield model
        return
    trained = {}
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in initial.parameters:
                    trained[name] = param.detach().clone()
                    param.copy_(initial.parameters[name])
        yield model
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in trained:
                    param.copy_(trained[name])


def convert_to_original_base(folder: Path, initial: InitialAdapter) -> dict:
    """Rewrite the adapter peft saved in ``folder`` (as trained, for the residual base) into a plain LoRA adapter
    for the original base: lora_A -> [A ; A0], lora_B -> [B | -B0], r and alpha doubled (alpha x sqrt(2) with
    rsLoRA, so alpha / sqrt(r) stays), init_lora_weights -> true. Returns what metadata.json records."""
    import torch
    from safetensors.torch import load_file, save_file

    weights_path, config_path = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    tensors = load_file(str(weights_path))
    for name, tensor in tensors.items():
        if ".lora_A." in name or name.endswith(".lora_A.weight"):
            tensors[name] = torch.cat([tensor, initial.state[name].to(tensor.dtype)], dim=0).contiguous()
        elif ".lora_B." in name or name.endswith(".lora_B.weight"):
            tensors[name] = torch.cat([tensor, -initial.state[name].to(tensor.dtype)], dim=1).contiguous()
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    config = json.loads(config_path.read_text(encoding="utf-8"))
    trained_rank = config["r"]
    config["r"] = 2 * trained_rank
    config["lora_alpha"] = config["lora_alpha"] * (2 ** 0.5 if config.get("use_rslora") else 2)
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            config[key] = {k: 2 * v for k, v in config[key].items()}
    config["init_lora_weights"] = True
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {
        "init": initial.init,
        "base_mutated_by_init": True,
        "converted_to_original_base": True,
        "trained_rank": trained_rank,
        "published_rank": config["r"],
        "meaning": "the frozen weights during training were the residual W - scale*B0@A0; the published adapter is "
        "[B | -B0] @ [A ; A0] (rank doubled, same scale), which applied to the ORIGINAL base gives the trained model",
    }


def mutating_init_problem(adapter_config: dict) -> str | None:
    """Why an adapter_config.json does not fit an unchanged base (a PiSSA/OLoRA/LoftQ adapter saved unconverted),
    or None."""
    init = adapter_config.get("init_lora_weights")
    if not mutates_base(init):
        return None
    return (f"adapter_config.json: init_lora_weights {init!r}: the adapter was saved for a base that its "
            "initialisation rewrote (W - scale*B0@A0), not for the base files; loading it makes peft rewrite the base "
            "again (not reproducible for randomised inits), so it is not proven to apply to the unchanged base. "
            "Convert it to a plain LoRA adapter for the original base (lorafit publishes PiSSA/OLoRA adapters "
            "converted; peft: save_pretrained(path_initial_model_for_weight_conversion=...))")

