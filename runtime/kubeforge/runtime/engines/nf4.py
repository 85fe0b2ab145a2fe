"""QLoRA under FSDP2: the frozen base's linear weights as torchao NF4Tensors, sharded by fully_shard.

DDP and ZeRO take their NF4 base from bitsandbytes (loading.load_whole). FSDP2 shards a parameter by
splitting it along dim 0 and all-gathers it before each use; torchao's NF4Tensor implements both (its
aten.split and ``fsdp_pre_all_gather``/``fsdp_post_all_gather`` move the packed 4-bit codes, the int8
block scales and the per-scaler-block factors), so the base stays in 4 bits at rest and on the wire,
as in torchtune. ``F.linear`` on an NF4Tensor dispatches to torchao's ``linear_nf4`` (dequantize to the
input's dtype, multiply; no gradient for the weight), so peft's LoRA layers wrap it unchanged.

Format (QLoRA's, Dettmers et al. 2023): 64 weights share one absmax scale; the scales, less their mean,
are double-quantized to int8 in blocks of 256 with one factor per block. Per weight: 4 bits + 1/64 byte
+ one factor per 16,384 weights, 0.516 byte (the planner's NF4_BYTES); bf16 is 2 bytes.

Sharded load: every rank reads only its rows from the safetensors files (as for any FSDP2 weight) and
quantizes them itself. An eligible weight's per-rank share is a whole number of scaler blocks, so every
block and scaler block lies in one rank's rows and the one whole-tensor statistic, the mean of the
block scales, is all-reduced (a scalar per weight): each rank's shard is what quantizing the whole
weight and splitting it would give, without any rank holding it whole, even for a moment.

Eligible: a frozen ``nn.Linear`` weight outside the output head and LoRA's own layers (bitsandbytes'
choice), 2-D, its rows split evenly over the ranks and each rank's share a multiple of 64 x 256
weights. The others (embeddings, norms, the head, odd shapes) stay in the compute dtype.
"""

from __future__ import annotations

import logging
import sys

import torch

log = logging.getLogger("kubeforge.train")

BLOCK = 64  # weights per absmax scale
SCALER_BLOCK = 256  # scales per double-quantization factor
NF4_VALUES = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
              0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0)  # fmt: skip


def available() -> bool:
    try:
        from torchao.quantization import NF4Tensor  # noqa: F401
    except ImportError:
        return False
    return True


def is_nf4(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an NF4Tensor (without importing torchao where nothing has)."""
    ao = sys.modules.get("torchao.quantization")
    return ao is not None and isinstance(tensor, getattr(ao, "NF4Tensor", ()))


def eligible(shape: torch.Size | tuple[int, ...], world: int) -> bool:
    """Whether a weight of ``shape`` can be stored as NF4 and split over ``world`` ranks."""
    if len(shape) != 2 or shape[0] % world:
        return False
    return (shape[0] // world) * shape[1] % (BLOCK * SCALER_BLOCK) == 0


def quantize_base(model: torch.nn.Module, world: int) -> tuple[int, int]:
    """Make each eligible frozen linear weight of the (meta) model an NF4Tensor, before fully_shard:
    (weights in NF4, frozen linear weights left in the compute dtype)."""
    from torchao.quantization import to_nf4

    done = kept = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or _skipped(name) or module.weight.requires_grad:
            continue
        weight = module.weight
        if not eligible(weight.shape, world):
            kept += 1
            continue
        module.weight = torch.nn.Parameter(to_nf4(weight.detach(), BLOCK, SCALER_BLOCK), requires_grad=False)
        done += 1
    log.info("qlora: %d linear weights in NF4 (torchao), sharded by FSDP2", done)
    if kept:
        log.warning(
            "qlora: %d frozen linear weights stay in the compute dtype: a rank's share of each is not a whole "
            "number of NF4 scaler blocks (%d x %d weights) over %d ranks",
            kept,
            BLOCK,
            SCALER_BLOCK,
            world,
        )
    return done, kept


def _skipped(name: str) -> bool:
    return name.endswith("lm_head") or ".lora_" in name or name.split(".")[-1].startswith("lora_")


def load_rows(local: torch.Tensor, rows: torch.Tensor, group=None, comm_device: torch.device | None = None) -> None:
    """Quantize this rank's ``rows`` of a weight into its NF4 shard ``local`` (allocated by to_empty).
    Every rank of ``group`` calls it for the same weight: the mean of the block scales is all-reduced, on
    ``comm_device`` (the GPU where NCCL runs the collective while the shard itself is offloaded to the host)."""
    import torch.distributed as td
    from torchao.quantization import NF4Tensor

    rows = rows.to(device=local.quantized_data.device, dtype=local.dtype).contiguous()
    flat = rows.reshape(-1)
    scales = flat.view(-1, BLOCK).abs().amax(dim=1)  # one absmax per block of 64
    total = torch.stack([scales.float().sum(), torch.tensor(float(scales.numel()), device=scales.device)])
    if td.is_initialized():
        on_wire = total.to(comm_device) if comm_device is not None else total
        td.all_reduce(on_wire, group=group)
        total = on_wire.to(scales.device)
    mean = (total[0] / total[1]).to(rows.dtype)
    centred = (scales - mean).view(-1, SCALER_BLOCK)
    factor = 256 / (2 * centred.abs().amax(dim=1))  # one per scaler block
    quantized_scales = (centred * factor.unsqueeze(1)).round().clamp(-128, 127).to(torch.int8)
    lut = _lut(rows.dtype, rows.device)
    codes = NF4Tensor.convert_to_norm_float_weight(rows, flat.numel() // BLOCK, BLOCK, lut)
    local.quantized_data.copy_(codes)
    local.quantized_scalers.copy_(quantized_scales.reshape(-1))
    local.quantization_factor.copy_(factor)
    # not split by FSDP2 (one per weight) and left on the meta device by to_empty: set, not copied
    local.scaler_mean = mean
    local.nf4 = lut


def _lut(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 16 NF4 code values, as torchao's NF4Tensor.from_tensor writes them (QLoRA's table)."""
    return torch.tensor(NF4_VALUES, dtype=dtype, device=device)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The weight in its dtype (an NF4Tensor dequantized; anything else as it is)."""
    return weight.get_original_weight() if is_nf4(weight) else weight


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (local) tensor really holds: an NF4Tensor's packed codes, scales, factors, mean and table."""
    if is_nf4(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(getattr(tensor, n).untyped_storage().nbytes() for n in names)
    return tensor.untyped_storage().nbytes()
