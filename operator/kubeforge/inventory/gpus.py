"""Facts about GPU products, keyed by a canonical product name.

Throughput is dense (no 2:4 sparsity) tensor-core peak in TFLOP/s; memory is what the
device reports in MiB (GFD's nvidia.com/gpu.memory) where known. Sources: NVIDIA's
datasheets (T4, V100, A10, A100, L4, L40S, H100, H200, HGX B200), NVIDIA's CUDA
compute-capability table, and for the A10G (an AWS-only part with no NVIDIA datasheet)
the figures AWS publishes for G5 instances. NVLink bandwidth is per GPU, both
directions; ``nvswitch`` means every GPU of a board talks to every other over NVLink
(HGX/DGX SXM boards); ``nvlink_pairs`` means NVLink bridges join GPUs in pairs. Memory bandwidth
is the datasheets' peak GB/s of the GPU's own memory (HBM or GDDR); the A10G's is the A10's (the
same GA102 with 24 GB GDDR6; AWS publishes none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class GPUFacts:
    name: str  # canonical, e.g. H100-SXM-80GB
    family: str  # T4, V100, A10, A100, L4, L40S, H100, H200, B200
    memory_mib: int
    compute_capability: tuple[int, int]
    bf16_tflops: float  # 0 where the GPU has no bf16 tensor cores
    fp16_tflops: float
    fp8_tflops: float  # 0 where the GPU has no fp8 tensor cores
    nvlink_gbps: float  # GB/s per GPU, 0 without NVLink
    nvswitch: bool
    nvlink_pairs: bool
    pcie_gbps: float  # GB/s per direction of the host link
    memory_gbps: float = 300.0  # GB/s peak of the GPU's own memory
    known: bool = True

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability >= (8, 0)

    @property
    def supports_fp8(self) -> bool:
        return self.compute_capability >= (8, 9) and self.fp8_tflops > 0

    def peak_tflops(self, precision: str) -> float:
        return {"bf16": self.bf16_tflops, "fp16": self.fp16_tflops, "fp8": self.fp8_tflops}[precision]


def _g(name, family, mib, cc, bf16, fp16, fp8, nvlink=0.0, nvswitch=False, pairs=False, pcie=32.0, hbm=300.0):
    return GPUFacts(name, family, mib, cc, bf16, fp16, fp8, nvlink, nvswitch, pairs, pcie, hbm)


GPU_FACTS: dict[str, GPUFacts] = {
    f.name: f
    for f in (
        _g("T4", "T4", 15360, (7, 5), 0, 65, 0, pcie=16, hbm=320),
        _g("V100-SXM2-16GB", "V100", 16384, (7, 0), 0, 125, 0, nvlink=300, nvswitch=False, pcie=16, hbm=900),
        _g("V100-SXM2-32GB", "V100", 32768, (7, 0), 0, 125, 0, nvlink=300, nvswitch=False, pcie=16, hbm=900),
        _g("A10", "A10", 24564, (8, 6), 125, 125, 0, pcie=32, hbm=600),
        _g("A10G", "A10", 23028, (8, 6), 70, 70, 0, pcie=32, hbm=600),
        _g("L4", "L4", 23034, (8, 9), 121, 121, 242, pcie=32, hbm=300),
        _g("L40S", "L40S", 46068, (8, 9), 362, 362, 733, pcie=32, hbm=864),
        _g("A100-SXM4-40GB", "A100", 40960, (8, 0), 312, 312, 0, nvlink=600, nvswitch=True, pcie=32, hbm=1555),
        _g("A100-SXM4-80GB", "A100", 81920, (8, 0), 312, 312, 0, nvlink=600, nvswitch=True, pcie=32, hbm=2039),
        _g("A100-PCIE-40GB", "A100", 40960, (8, 0), 312, 312, 0, pcie=32, hbm=1555),
        _g("A100-PCIE-80GB", "A100", 81920, (8, 0), 312, 312, 0, pcie=32, hbm=1935),
        _g("H100-SXM-80GB", "H100", 81559, (9, 0), 989, 989, 1979, nvlink=900, nvswitch=True, pcie=64, hbm=3350),
        _g("H100-PCIE-80GB", "H100", 81559, (9, 0), 756, 756, 1513, pcie=64, hbm=2000),
        _g("H100-NVL-94GB", "H100", 95830, (9, 0), 835, 835, 1671, nvlink=600, pairs=True, pcie=64, hbm=3900),
        _g("H200-SXM-141GB", "H200", 143771, (9, 0), 989, 989, 1979, nvlink=900, nvswitch=True, pcie=64, hbm=4800),
        _g("B200-180GB", "B200", 183359, (10, 0), 2250, 2250, 4500, nvlink=1800, nvswitch=True, pcie=64, hbm=8000),
    )
}

# (pattern on the normalised product name, memory hint -> canonical name); first match wins.
_PATTERNS: tuple[tuple[str, str | dict[str, str]], ...] = (
    (r"B200", "B200-180GB"),
    (r"H200", "H200-SXM-141GB"),
    (r"H100.*NVL", "H100-NVL-94GB"),
    (r"H100.*PCIE", "H100-PCIE-80GB"),
    (r"H100", "H100-SXM-80GB"),
    (r"A100.*PCIE", {"40": "A100-PCIE-40GB", "80": "A100-PCIE-80GB"}),
    (r"A100", {"40": "A100-SXM4-40GB", "80": "A100-SXM4-80GB"}),
    (r"L40S", "L40S"),
    (r"\bL4\b", "L4"),
    (r"A10G", "A10G"),
    (r"\bA10\b", "A10"),
    (r"V100", {"16": "V100-SXM2-16GB", "32": "V100-SXM2-32GB"}),
    (r"\bT4\b", "T4"),
)


def normalise(product: str) -> str:
    text = product.upper().replace("_", "-")
    text = re.sub(r"^(NVIDIA|TESLA)[- ]+", "", text)
    text = re.sub(r"^(NVIDIA|TESLA)[- ]+", "", text)
    return text.replace("-", " ")


def lookup_gpu(product: str, memory_mib: int | None = None) -> GPUFacts | None:
    """The facts for a product string as labels spell it (NVIDIA-H100-80GB-HBM3, nvidia-tesla-t4, a10g...)."""
    text = normalise(product)
    for pattern, target in _PATTERNS:
        if re.search(pattern, text):
            if isinstance(target, str):
                return GPU_FACTS[target]
            size = _memory_class(text, memory_mib, tuple(target))
            return GPU_FACTS[target[size]]
    return None


def _memory_class(text: str, memory_mib: int | None, sizes: tuple[str, ...]) -> str:
    for size in sizes:
        if re.search(rf"{size}\s*GB", text):
            return size
    if memory_mib:
        return min(sizes, key=lambda s: abs(int(s) * 1024 - memory_mib))
    return sizes[0]  # the smaller part: conservative


def unknown_gpu(product: str, memory_mib: int, compute_capability: tuple[int, int] | None) -> GPUFacts:
    """A product missing from the table: memory from the label, conservative everything else."""
    cc = compute_capability or (7, 0)
    guess = 50.0  # TFLOP/s: conservative, so step-time estimates err on the slow side
    return GPUFacts(
        name=product,
        family="unknown",
        memory_mib=memory_mib,
        compute_capability=cc,
        bf16_tflops=guess if cc >= (8, 0) else 0.0,
        fp16_tflops=guess,
        fp8_tflops=0.0,  # never assumed
        nvlink_gbps=0.0,
        nvswitch=False,
        nvlink_pairs=False,
        pcie_gbps=16.0,
        memory_gbps=300.0,  # the slowest of the table's (L4)
        known=False,
    )
