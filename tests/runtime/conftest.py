"""A tiny random Llama model and the demo task's data, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubeforge.runtime.contract import (
    ComputeConfig,
    Contract,
    DataConfig,
    JobIdentity,
    Location,
    LoRAConfig,
    OutputConfig,
    ParallelConfig,
    ProgressConfig,
    TrainingConfig,
)
from kubeforge.runtime.demo import task, tiny


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny.make_model(tmp_path_factory.mktemp("model") / "tiny", task.words())


@pytest.fixture(scope="session")
def tiny_model_128(tmp_path_factory) -> Path:
    """Hidden size 128: int4 methods quantize in groups of 128."""
    return tiny.make_model(tmp_path_factory.mktemp("model128") / "tiny", task.words(), hidden=128)


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> tuple[Path, Path]:
    return task.write(tmp_path_factory.mktemp("data"))


def make_contract(model: Path, train: Path, out: Path, *, method: str = "lora", steps: int = 30, world: int = 1,
                  micro: int = 8, accumulation: int = 2, lr: float = 3e-3, every: int | None = None,
                  strategy: str = "ddp", fmt: str = "messages", scheduler: str = "cosine") -> Contract:  # fmt: skip
    return Contract(
        job=JobIdentity(name="test"),
        model=Location(uri=str(model), local_path=str(model)),
        dataset=DataConfig(location=Location(uri=str(train), local_path=str(train)), format=fmt, max_seq_length=64),
        training=TrainingConfig(
            method=method,
            lora=LoRAConfig(rank=16, alpha=32, dropout=0.0) if method != "full" else None,
            max_steps=steps,
            learning_rate=lr,
            global_batch_size=micro * accumulation * world,
            micro_batch_size=micro,
            gradient_accumulation_steps=accumulation,
            checkpoint_every=every,
            seed=7,
            lr_scheduler=scheduler,
        ),
        parallel=ParallelConfig(strategy=strategy, nodes=1, gpus_per_node=world),
        compute=ComputeConfig(device="cpu", precision="fp32", attention="sdpa"),
        output=OutputConfig(
            location=Location(uri=str(out), local_path=str(out)), checkpoint_dir=str(out / "checkpoints")
        ),
        progress=ProgressConfig(port=0),
    )
