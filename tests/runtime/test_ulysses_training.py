"""Ulysses sequence parallelism end to end in the trainer: two processes that split every sequence
train the same model as one process that sees whole sequences (same data, same steps)."""

from __future__ import annotations

import pytest

from tests.runtime.conftest import make_contract
from tests.runtime.test_train import losses, run_inline, run_torchrun


def single_and_split(tiny_model, task_data, tmp_path, strategy: str, steps: int, **compute):
    """The losses of one process seeing whole sequences (no checkpointing) and of two ranks splitting each
    sequence (Ulysses degree 2, ``compute`` changes on their contract), same data and steps; the split gang's
    log."""
    single_dir, split_dir = tmp_path / "single", tmp_path / "split"
    single_dir.mkdir()
    split_dir.mkdir()
    one = make_contract(tiny_model, task_data[0], single_dir / "out", method="full", steps=steps, lr=1e-3, micro=4,
                        accumulation=2)  # fmt: skip
    assert run_inline(one, single_dir)[0] == 0
    two = make_contract(tiny_model, task_data[0], split_dir / "out", method="full", steps=steps, lr=1e-3, micro=4,
                        accumulation=2, world=2, strategy=strategy)  # fmt: skip
    two = two.model_copy(
        update={
            "parallel": two.parallel.model_copy(update={"ulysses": 2}),
            "training": two.training.model_copy(update={"global_batch_size": 8}),  # data parallel 1: the peers share it
            "compute": two.compute.model_copy(update=compute),
        }
    )
    assert two.parallel.data_parallel == 1
    logs: list[str] = []
    code, _ = run_torchrun(two, split_dir, 2, logs)
    assert code == 0, logs[0][-3000:]
    return losses(single_dir / "out"), losses(split_dir / "out"), logs[0]


@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
def test_two_ranks_splitting_each_sequence_train_like_one_process(tiny_model, task_data, tmp_path, strategy):
    single, split, log = single_and_split(tiny_model, task_data, tmp_path, strategy, steps=6)
    assert "ulysses: degree 2" in log, log[-2000:]
    assert split == pytest.approx(single, abs=2e-3)


def test_a_degree_that_does_not_divide_the_processes_is_refused(tiny_model, task_data, tmp_path):
    from kubeforge.runtime import engines
    from kubeforge.runtime.entry import UserError

    contract = make_contract(tiny_model, task_data[0], tmp_path / "out", method="full", steps=2, world=2)
    contract = contract.model_copy(update={"parallel": contract.parallel.model_copy(update={"ulysses": 4})})
    with pytest.raises(UserError, match=r"parallel\.ulysses 4 must divide the 2 processes"):
        engines.check(contract, cuda=False)
