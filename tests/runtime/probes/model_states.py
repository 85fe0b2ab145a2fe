"""Measure what one rank really holds after one training step: the bytes of every live tensor.

    python -m tests.runtime.probes.model_states CONTRACT.json OUT_DIR   (alone or under torchrun)

Builds the engine the contract names (kubeforge.runtime.engines.build), runs one step on a
synthetic batch (so that the optimizer's states exist), then the forward and backward passes
of a second step, stopping before its optimizer step: the moment weights, gradients and
optimizer states all exist. Drops the batch and the graph and counts the bytes of every
tensor storage still alive in the process (each storage once: views, DDP's bucket views of
gradients and DeepSpeed's flat buffers are not counted twice), minus those alive before the
engine was built. Writes OUT_DIR/rank<N>.json: {"bytes": ..., "parameters": ..., "local_parameters": ...}.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path


def live_storages() -> dict[int, int]:
    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            if hasattr(obj, "to_local"):  # DTensor: its local shard is a tensor of its own
                obj = obj.to_local()
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, AttributeError, TypeError):
            continue
    return seen


def main(argv: list[str]) -> int:
    import torch

    from kubeforge.runtime.contract import load
    from kubeforge.runtime.engines import Setup, build
    from kubeforge.runtime.train import _dist_env, _init_process_group

    contract, out = load(argv[0]), Path(argv[1])
    dist = _dist_env()
    device = torch.device("cpu")
    torch.manual_seed(0)
    if dist.world > 1 or contract.parallel.strategy.startswith("zero"):
        _init_process_group(dist, device)
    gc.collect()
    before = live_storages()
    engine = build(Setup(contract, dist, device, Path(contract.model.local_path), total_steps=10))
    t = contract.training
    vocab = engine.model.config.vocab_size
    ids = torch.randint(0, vocab, (t.micro_batch_size, contract.dataset.max_seq_length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    micro_batches = [batch] * t.gradient_accumulation_steps
    engine.train_step(micro_batches)
    backward_only(engine, micro_batches, contract, device)
    del batch, ids, micro_batches
    gc.collect()
    grads = [p.grad for p in engine.model.parameters() if p.grad is not None]  # C++-held until touched
    after = live_storages()
    del grads
    held = sum(size for ptr, size in after.items() if ptr not in before)
    if os.environ.get("KUBEFORGE_PROBE_SIZES"):
        print("sizes", dist.rank, sorted((size for ptr, size in after.items() if ptr not in before), reverse=True))
    params = sum(getattr(p, "ds_numel", None) or p.numel() for p in engine.model.parameters())
    dtypes = {
        "trainable": sorted({str(p.dtype) for p in engine.model.parameters() if p.requires_grad}),
        "frozen": sorted({str(p.dtype) for p in engine.model.parameters() if not p.requires_grad}),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.rank}.json").write_text(json.dumps({"bytes": held, "parameters": params, "dtypes": dtypes}))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def backward_only(engine, micro_batches, contract, device) -> None:
    """A step's forward and backward passes without its optimizer step."""
    from kubeforge.runtime.engines import common

    if hasattr(engine, "engine"):  # DeepSpeed: its own backward (reduces gradients at the boundary)
        for batch in micro_batches:
            engine.engine.backward(engine.engine(**batch).loss)
        return
    common.accumulate(engine.module, micro_batches, device, contract, engine._sync)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
