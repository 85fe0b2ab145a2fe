"""A tiny random Llama model and the demo task's data, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubeforge.runtime import fetch
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
    chunked_loss_runs,
)
from kubeforge.runtime.demo import task, tiny
from tests.harness import s3server


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


@pytest.fixture(scope="module")
def s3_endpoint():
    """A fresh moto S3 server per test module (skips with the reason where .venv-s3 is missing)."""
    if not s3server.available():
        pytest.skip(s3server.MISSING)
    with s3server.moto_server() as endpoint:
        yield endpoint


@pytest.fixture()
def s3_env(s3_endpoint, monkeypatch, tmp_path):
    """A client of moto's server, with the AWS_* variables the runtime reads pointing at it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("KUBEFORGE_CACHE_DIR", str(tmp_path / "cache"))
    return fetch.s3_client("s3://x")[0]


def make_contract(model: Path, train: Path, out: Path, *, method: str = "lora", steps: int = 30, world: int = 1,
                  micro: int = 8, accumulation: int = 2, lr: float = 3e-3, every: int | None = None,
                  strategy: str = "ddp", fmt: str = "messages", scheduler: str = "cosine",
                  loss_chunk: int = 16) -> Contract:  # fmt: skip
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
        # the loss in chunks where the planner asks for it (contract.chunked_loss_runs); 16 tokens: many chunks
        compute=ComputeConfig(
            device="cpu",
            precision="fp32",
            attention="sdpa",
            loss_chunk_tokens=loss_chunk if chunked_loss_runs(strategy) else 0,
        ),
        output=OutputConfig(
            location=Location(uri=str(out), local_path=str(out)), checkpoint_dir=str(out / "checkpoints")
        ),
        progress=ProgressConfig(port=0),
    )
