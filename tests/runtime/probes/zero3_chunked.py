"""The chunked loss under ZeRO-3: the gradients it gives every weight, the head's included, against the model's own
loss, in one process group.

    python -m tests.runtime.probes.zero3_chunked CONTRACT.json OUT.json   (under torchrun)

Builds the ZeRO-3 engine twice from the same contract, once with its loss in chunks and once with the model's own
loss (loss_chunk_tokens 0), runs one micro-batch forward and backward through each and writes, on rank 0, the
largest difference between their losses and between their full (gathered) gradients, per weight, relative to the
largest gradient of that weight.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _grads(contract, setup, batch) -> tuple[float, dict]:
    from deepspeed.utils import safe_get_full_grad

    from kubeforge.runtime import objectives
    from kubeforge.runtime.engines import Setup, zero

    setup = Setup(contract, setup.dist, setup.device, setup.model_dir, total_steps=1)
    engine = zero.DeepSpeedEngine(setup)
    loss, _ = objectives.for_contract(contract)(engine.engine, batch)
    engine.engine.backward(loss)
    grads = {}
    for name, param in engine.model.named_parameters():
        grad = safe_get_full_grad(param)  # every rank takes part in the gather
        if grad is not None:
            grads[name] = grad.detach().float().clone()
    engine.engine.destroy()
    return float(loss.detach()), grads


def main(argv: list[str]) -> int:
    import torch

    from tests.runtime.probes import gang

    contract, setup = gang.join(argv[0])
    torch.manual_seed(0)
    vocab = json.loads((setup.model_dir / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (contract.training.micro_batch_size, 40))
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt
    batch = {"input_ids": ids, "labels": labels}
    own = contract.model_copy(update={"compute": contract.compute.model_copy(update={"loss_chunk_tokens": 0})})
    chunked_loss, chunked = _grads(contract, setup, batch)
    own_loss, whole = _grads(own, setup, batch)
    if setup.dist.rank == 0:
        diffs = {
            name: float((chunked[name] - whole[name]).abs().max() / whole[name].abs().max().clamp_min(1e-30))
            for name in whole
        }
        result = {"loss_diff": abs(chunked_loss - own_loss), "grads": diffs, "names": sorted(chunked)}
        Path(argv[1]).write_text(json.dumps(result))
    gang.leave()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
