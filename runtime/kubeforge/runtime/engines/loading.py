"""Build the model a plan trains, in the dtypes of the precision policy (contract.precision_policy).

- ``load_whole``: every weight on this process (DDP, ZeRO-1/2, one process). Full fine-tuning
  keeps the trainable weights in fp32 (the master copy; matmuls run in the compute dtype under
  autocast); LoRA keeps the frozen base in the compute dtype and the adapters in fp32; QLoRA
  keeps the base in NF4. Pure bf16 (compute.master_weights bf16): whatever trains is bf16.
- ``build_empty``: the same architecture on the meta device, no memory at all, for engines that
  shard first and then read only their share of the weights (FSDP2, see fsdp.py).
- ``lora_values``: the initial adapter weights, the same on every rank (seeded), for engines that
  materialise a model from nothing.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from kubeforge.runtime import chunked_loss, selective
from kubeforge.runtime.contract import Contract, PrecisionPolicy, chunked_loss_runs, precision_policy

log = logging.getLogger("kubeforge.train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def policy(contract: Contract) -> PrecisionPolicy:
    c = contract.compute
    return precision_policy(c.precision, contract.training.method, c.master_weights)


def compute_dtype(contract: Contract) -> torch.dtype:
    return DTYPES[policy(contract).compute]


def master_dtype(contract: Contract) -> torch.dtype:
    """The dtype of whatever trains: fp32 masters, or bf16 under pure bf16 (compute.master_weights)."""
    return DTYPES[policy(contract).master]


def storage_dtype(contract: Contract) -> torch.dtype:
    """The dtype weights are created in: the masters' when they train, the compute dtype when frozen."""
    return master_dtype(contract) if contract.training.method == "full" else compute_dtype(contract)


def load_whole(contract: Contract, model_dir: Path, device: torch.device, *, dtype: torch.dtype | None = None):
    """The whole model on ``device`` (loaded straight onto a GPU: no host copy per process)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": dtype or storage_dtype(contract),
        "attn_implementation": contract.compute.attention,
    }
    if contract.training.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(contract),
            bnb_4bit_quant_storage=compute_dtype(contract),  # so that sharding engines can split the NF4 bytes
        )
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return prepare(contract, model, device)


def prepare(contract: Contract, model, device: torch.device, *, fsdp: bool = False):
    """The chunked loss, float8, gradient checkpointing and LoRA adapters, in that order."""
    if contract.compute.loss_chunk_tokens and not chunked_loss_runs(contract.parallel.strategy):
        log.warning("chunked loss: not under %s; the model's own loss runs", contract.parallel.strategy)
    elif contract.compute.loss_chunk_tokens:
        # the most tokens a micro-batch puts on this rank (a Ulysses rank holds 1/degree of every sequence; a DPO
        # micro-batch element is a pair, two sequences)
        rows = contract.training.micro_batch_size * (2 if contract.training.objective == "dpo" else 1)
        most = -(-rows * contract.dataset.max_seq_length // contract.parallel.ulysses)
        chunked_loss.install(model, contract.compute.loss_chunk_tokens, most)
    if policy(contract).float8:
        from kubeforge.runtime.engines.float8 import convert

        convert(model, fsdp=fsdp)
    if contract.compute.gradient_checkpointing:  # full, or selective (selective.py)
        kwargs = selective.checkpoint_kwargs(contract.compute.checkpointing_policy)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if contract.training.method in ("lora", "qlora"):
        model = add_lora(contract, model)
    if contract.training.method != "qlora" and device.type != "meta":
        model.to(device)
    return model


def add_lora(contract: Contract, model):
    """Frozen base (compute dtype or NF4), adapters in the masters' dtype (peft casts them to fp32 itself;
    pure bf16 casts them back)."""
    from peft import LoraConfig, get_peft_model

    lora = contract.training.lora
    assert lora is not None
    for p in model.parameters():
        p.requires_grad_(False)
    if contract.compute.gradient_checkpointing:
        model.enable_input_require_grads()
    targets: Any = "all-linear" if "all-linear" in lora.target_modules else list(lora.target_modules)
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config, autocast_adapter_dtype=True)
    share_adapter_inputs(model)
    values = lora_values(model, contract.training.seed)  # the same initial adapters for every engine
    master = master_dtype(contract)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and p.dtype != master:
                p.data = p.data.to(master)
            if name in values and p.device.type != "meta":
                p.copy_(values[name])
    return model


def share_adapter_inputs(model) -> int:
    """Let each adapter read its module's input as it is (returns how many adapted modules).

    By default peft copies each adapted module's input to the adapter's dtype (fp32) before its matmul,
    and autocast copies it back to bf16 for it: one bf16 copy per adapted module that autograd keeps for
    the backward pass (2 bytes per input element: q, k and v each keep their own copy of one input). The
    runtime trains every adapter under autocast (DDP, FSDP2) or in the base's dtype (DeepSpeed), so the
    cast is not needed, and bf16 -> fp32 -> bf16 is exact: the adapters compute the same values (with
    dropout, up to rounding the dropped input in bf16: tests/runtime/test_lora_inputs.py), and the modules
    that share an input (q, k, v; gate, up) keep it once (memory.lora_activations counts it so; measured in
    tests/planner/test_activations.py)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def build_empty(contract: Contract, model_dir: Path):
    """The model with every tensor on the meta device (no memory, no initialisation)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=storage_dtype(contract), attn_implementation=contract.compute.attention
        )
    return prepare(contract, model, torch.device("meta"), fsdp=True)


def lora_values(model, seed: int) -> dict[str, torch.Tensor]:
    """Initial adapter weights by parameter name, as peft initialises them (A: Kaiming-uniform, B: 0),
    drawn from ``seed`` so that every rank computes the same values."""
    gen = torch.Generator().manual_seed(seed)
    values: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = tuple(p.shape)
        if ".lora_A." in name:
            bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on fan_in
            values[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        elif ".lora_B." in name:
            values[name] = torch.zeros(shape)
    return values


def reset_rotary(model, device: torch.device) -> None:
    """Recompute non-persistent rotary buffers (inv_freq) that a meta-built model lost."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "rope_init_fn"):
            inv_freq, scaling = module.rope_init_fn(module.config, device)
            module.inv_freq = inv_freq
            if hasattr(module, "original_inv_freq"):
                module.original_inv_freq = inv_freq.clone()
            module.attention_scaling = scaling
        elif hasattr(module, "inv_freq") and hasattr(module, "compute_default_rope_parameters"):
            init = module.compute_default_rope_parameters
            if getattr(module, "rope_type", "default") != "default":
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                init = ROPE_INIT_FUNCTIONS[module.rope_type]
            inv_freq, scaling = init(module.config, device)
            module.inv_freq = inv_freq
            if hasattr(module, "original_inv_freq"):
                module.original_inv_freq = inv_freq.clone()
            module.attention_scaling = scaling


def hf_name(name: str) -> str:
    """A (peft-wrapped) parameter name -> its name in the Hugging Face checkpoint."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")
