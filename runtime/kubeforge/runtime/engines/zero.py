"""DeepSpeed ZeRO-1/2/3, with the optimizer (or the parameters too) offloaded to host memory.

DeepSpeed owns accumulation, clipping, the optimizer and scheduler steps. Precision policy:
with bf16/fp16 compute the module holds a working copy in that dtype and DeepSpeed's
optimizer keeps the fp32 master weights and AdamW's fp32 moments, partitioned over the ranks
(stage 1: optimizer states; 2: and gradients; 3: and parameters). ``offload_optimizer``
puts the master weights and moments in host memory and steps them with DeepSpeed's CPU Adam
(ZeRO-Offload); ``offload_param`` (zero3-offload) moves the parameters there too.

ZeRO-3 never holds the whole model: the model is built under ``deepspeed.zero.Init`` (each
module's weights are partitioned as soon as it is created), then every rank copies its own
contiguous range of each flattened weight straight from the safetensors files
(shards.Checkpoint.flat). ZeRO-1/2 keep a whole working copy per GPU by design, loaded
straight onto the GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kubeforge.runtime import objectives
from kubeforge.runtime.contract import STRATEGIES
from kubeforge.runtime.engines import common, loading, shards


def deepspeed_config(contract: Any, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed config for the plan (what HF's "auto" values would become, made explicit)."""
    t, strategy = contract.training, contract.parallel.strategy
    facts = STRATEGIES[strategy]
    bucket = hidden_size * hidden_size
    zero: dict[str, Any] = {
        "stage": facts.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": contract.compute.device == "cuda",
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if facts.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * bucket), stage3_param_persistence_threshold=10 * hidden_size)
    pin = contract.compute.device == "cuda"
    if facts.offload in ("optimizer", "parameters"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if facts.offload == "parameters":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    policy = loading.policy(contract)
    compute = policy.compute
    bf16: dict[str, Any] = {"enabled": compute == "bf16"}
    if policy.master == "bf16":  # pure bf16: bf16 master partitions, gradients and Adam moments
        bf16.update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    return {
        # DeepSpeed counts every rank as data parallel (micro x accumulation x world): Ulysses peers too
        "train_batch_size": t.global_batch_size * contract.parallel.ulysses,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": bf16,
        "fp16": {"enabled": compute == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_partitioned_model(setup: common.Setup, config: dict[str, Any]) -> torch.nn.Module:
    """Build under zero.Init (each module partitioned as it is created, in the compute dtype: DeepSpeed
    keeps the fp32 masters in its optimizer), then read each rank's range of every weight."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    contract, device = setup.contract, setup.device
    hf = AutoConfig.from_pretrained(setup.model_dir)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    keep = HfDeepSpeedConfig(config)  # noqa: F841  the engine and transformers see ZeRO-3
    from transformers.initialization import no_init_weights
    from transformers.modeling_utils import set_zero3_state

    # Our own zero.Init, with transformers told one is open (set_zero3_state): left to itself, from_config
    # opens one and then gathers every module's weights whole (all ranks, one module at a time) to
    # initialise them, which every weight read below overwrites: that gather was the load's peak (0.62
    # of the model per process instead of its half, bench/sharded_load.py)
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=config), set_zero3_state():
        model = AutoModelForCausalLM.from_config(
            hf, dtype=loading.compute_dtype(contract), attn_implementation=contract.compute.attention
        )
    if getattr(hf, "tie_word_embeddings", False):
        model.tie_weights()
    model = loading.prepare(contract, model, device)
    ckpt = shards.Checkpoint(setup.model_dir)
    tied = getattr(hf, "tie_word_embeddings", False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not hasattr(param, "ds_tensor"):
                continue
            part = param.ds_tensor
            start = setup.dist.rank * part.numel()
            stop = min(start + part.numel(), param.ds_numel)
            if stop <= start:
                continue
            key = loading.hf_name(name)
            if key not in ckpt and tied and key.endswith("lm_head.weight"):
                key = "model.embed_tokens.weight"
            ckpt.copy_flat(key, start, stop, part.narrow(0, 0, stop - start))
    return model


class DeepSpeedEngine:
    def __init__(self, setup: common.Setup):
        import deepspeed
        from transformers import AutoConfig

        self.setup = setup
        self.contract = contract = setup.contract
        self.device = setup.device
        hf = AutoConfig.from_pretrained(setup.model_dir)
        self.config = deepspeed_config(contract, hf.hidden_size)
        self.stage = STRATEGIES[contract.parallel.strategy].zero_stage
        if self.stage == 3 and contract.training.method == "full":
            model = build_partitioned_model(setup, self.config)
        else:
            model = loading.load_whole(contract, setup.model_dir, setup.device, dtype=loading.compute_dtype(contract))
        self.model = model
        params = common.trainable(model)
        offload = STRATEGIES[contract.parallel.strategy].offload != "none"
        if offload:  # the host steps the fp32 masters with DeepSpeed's vectorised CPU Adam
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            t = contract.training
            optimizer = DeepSpeedCPUAdam(params, lr=t.learning_rate, weight_decay=t.weight_decay, adamw_mode=True)
        else:
            optimizer = common.adamw(params, setup)
        scheduler = common.schedule(optimizer, setup)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )
        self.module = self.engine
        self.dp_rank = setup.dist.rank

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        objective = objectives.for_contract(self.contract)
        total = 0.0
        metrics = []
        for batch in micro_batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss, found = objective(self.engine, batch)  # the module itself is in the compute dtype
            self.engine.backward(loss)  # scales by 1/accumulation and steps at the boundary itself
            self.engine.step()
            total += float(loss.detach()) / len(micro_batches)
            metrics.append(found)
        return objectives.StepLoss(total, objectives.mean_metrics(metrics))

    def save(self, root: Path, step: int, extra: dict, main: bool) -> None:
        # DeepSpeed's checkpoint holds the optimizer and the scheduler it was given
        common.save_sharded(root, step, extra, main, lambda tmp: self.engine.save_checkpoint(str(tmp), tag="deepspeed"))

    def load(self, path: Path) -> dict:
        # a QLoRA module's state also holds bitsandbytes' quantization constants as extra keys; the frozen
        # NF4 base is rebuilt from the model folder, only the adapters and the optimizer come from here
        strict = self.contract.training.method != "qlora"
        self.engine.load_checkpoint(str(path), tag="deepspeed", load_module_strict=strict)
        return common.restore(path)

    def full_state_dict(self, staging: Path) -> dict[str, torch.Tensor] | None:
        """ZeRO-3 partitions parameters: gather them (every rank takes part); rank 0 keeps a CPU copy."""
        import deepspeed

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            full = (
                {k: v.detach().cpu().float().clone() for k, v in self.model.state_dict().items()}
                if self.setup.dist.main
                else None
            )
        return full

    def describe(self) -> str:
        offload = STRATEGIES[self.contract.parallel.strategy].offload
        where = "" if offload == "none" else f", {offload} offloaded to host memory"
        share = 100 * common.local_share(self.model)
        return f"deepspeed zero-{self.stage}{where}; this rank holds {share:.0f}% of the parameters"
