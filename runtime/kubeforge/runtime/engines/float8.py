"""fp8 plans: torchao's float8 training for the engines built on torch (DDP, FSDP2).

Every eligible ``nn.Linear`` becomes a ``Float8Linear``: its matmuls run in float8 (e4m3
forward, e5m2 for gradients, dynamic tensor-wise scales) while the master weights stay fp32
and everything else runs in the compute dtype (bf16). Under FSDP2 the weights are also
all-gathered in float8 (``enable_fsdp_float8_all_gather``), half the bytes of bf16.
The output head stays in bf16 (its logits feed the loss, as in torchtitan), and so do layers
whose dimensions are not multiples of 16 (float8 GEMMs need them).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("kubeforge.train")


class Float8Unavailable(RuntimeError):
    pass


def available() -> bool:
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return False
    return True


def _eligible(module: torch.nn.Module, fqn: str) -> bool:
    if not isinstance(module, torch.nn.Linear) or fqn.endswith("lm_head"):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert(model: torch.nn.Module, *, fsdp: bool) -> int:
    """Swap eligible linear layers for Float8Linear in place; the number swapped."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise Float8Unavailable("precision fp8 needs torchao (pip install torchao)") from err
    config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp)
    convert_to_float8_training(model, config=config, module_filter_fn=_eligible)
    count = sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear")
    log.info("fp8: %d linear layers train with float8 matmuls (torchao)", count)
    return count
