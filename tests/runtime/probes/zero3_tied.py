"""ZeRO-3's loader on a model with tied input and output embeddings (Qwen3-0.6B/1.7B, Llama-3.2-1B...).

    python -m tests.runtime.probes.zero3_tied CONTRACT.json OUT.json   (under torchrun)

Builds the model as the ZeRO-3 engine does (engines/zero.build_partitioned_model), then writes
whether the output embedding is the input embedding's parameter and the largest difference between
the gathered embedding and the checkpoint's (the file has no lm_head.weight, as save_pretrained writes
a tied model).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import deepspeed
    from safetensors.torch import load_file

    from kubeforge.runtime.engines import zero
    from tests.runtime.probes import gang

    contract, setup = gang.join(argv[0])
    out, dist = Path(argv[1]), setup.dist
    model = zero.build_partitioned_model(setup, zero.deepspeed_config(contract, 64))
    stored = load_file(str(setup.model_dir / "model.safetensors"))
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with deepspeed.zero.GatheredParameters([emb]):
        diff = (emb.detach().float() - stored["model.embed_tokens.weight"].float()).abs().max().item()
    if dist.rank == 0:
        result = {"tied": head is emb, "max_diff": diff, "lm_head_in_file": "lm_head.weight" in stored}
        out.write_text(json.dumps(result))
    gang.leave()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
