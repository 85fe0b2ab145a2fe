"""Ulysses sequence parallelism: two processes (gloo) splitting every sequence in two compute the loss and
every gradient of one process on the whole sequence.

The two-process part runs once per module (``python -m tests.runtime.test_ulysses OUT`` twice, with
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set as torchrun would): each rank builds the same tiny
random Llama (fp32, 2 layers, 4 heads; 4, 2 and 1 key/value heads), runs the reference (one process,
whole sequence, transformers' sdpa and its own loss) and the Ulysses run (its half of each sequence,
the all-to-all attention, ulysses.loss, gradients averaged by DDP over both ranks), and writes the
relative differences. Two negative controls
run the same way with one ingredient removed (no all-to-all: each rank attends within its half; labels
shifted after splitting instead of before) and must differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kubeforge.runtime import ulysses
from kubeforge.runtime.entry import UserError

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5  # relative, fp32
CASES = {  # name: (key/value heads, batch)
    "mha-padded": (4, "padded"),
    "gqa-padded": (2, "padded"),
    "mqa-padded": (1, "padded"),  # 1 kv head, degree 2: kv heads repeated x2
    "gqa-packed": (2, "packed"),
    "gqa-left-padded": (2, "left"),
}


# ---------------------------------------------------------------- the two-process run (each rank)


def _config(kv_heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def batch(kind: str) -> dict[str, torch.Tensor]:
    """Collated micro-batches of odd length (13, padded to 14 for two ranks)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 97, (2, 13), generator=gen)
    labels = ids.clone()
    labels[0, :3] = ulysses.IGNORE  # a prompt
    if kind == "padded":  # right padding, as data.collate does
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels[1, 9:] = ulysses.IGNORE
        ids[1, 9:] = 0
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if kind == "left":
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        labels[1, :5] = ulysses.IGNORE  # the first real token has no real predecessor
        ids[1, :4] = 0
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    # packed: row 0 holds three examples (positions restart), row 1 one; no mask (as transformers packs)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1], list(range(13))])
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _compare(loss: torch.Tensor, grads: dict, ref_loss: torch.Tensor, ref_grads: dict) -> dict[str, float]:
    import torch.distributed as td

    value = loss.detach().clone()
    td.all_reduce(value)
    value /= td.get_world_size()  # train.py's _mean_across
    worst = max(ref_grads, key=lambda n: _rel(grads[n], ref_grads[n]))
    return {
        "loss": float(value),
        "reference_loss": float(ref_loss.detach()),
        "loss_rel": abs(float(value) - float(ref_loss.detach())) / abs(float(ref_loss.detach())),
        "grad_rel": _rel(grads[worst], ref_grads[worst]),
        "worst_parameter": worst,
    }


def _sp_run(model, part, group, attention: str) -> tuple[torch.Tensor, dict]:
    from torch.nn.parallel import DistributedDataParallel

    model.set_attn_implementation(attention)
    ddp = DistributedDataParallel(model)
    loss = ulysses.loss(ddp(**ulysses.inputs(part)), part, group)
    loss.backward()
    return loss, _grads(model)


def _shift_after_split(full: dict, part: dict, group) -> dict:
    """Negative control: each rank shifts its own slice (the last token of a slice loses its target)."""
    labels = torch.nn.functional.pad(full["labels"], (0, 1), value=ulysses.IGNORE)  # 13 -> 14, as shard pads
    local = labels.shape[1] // group.degree
    mine = labels[:, group.rank * local : (group.rank + 1) * local]
    shifted = torch.cat([mine[:, 1:], mine.new_full((mine.shape[0], 1), ulysses.IGNORE)], dim=1)
    counts = torch.tensor(int((shifted != ulysses.IGNORE).sum()))
    import torch.distributed as td

    td.all_reduce(counts)
    return {**part, ulysses.LABELS: shifted, ulysses.TOKENS: counts}


def worker(out: Path) -> None:
    import copy

    import torch.distributed as td
    from torch.nn.parallel import DistributedDataParallel
    from transformers import LlamaForCausalLM

    from kubeforge.runtime import chunked_loss, objectives

    td.init_process_group("gloo")
    rank, world = td.get_rank(), td.get_world_size()
    torch.set_num_threads(1)
    dist = SimpleNamespace(rank=rank, world=world)
    results: dict[str, dict] = {}
    started = time.monotonic()
    for name, (kv_heads, kind) in CASES.items():
        torch.manual_seed(0)
        reference = LlamaForCausalLM(_config(kv_heads))
        model = copy.deepcopy(reference)
        full = batch(kind)
        ref_loss = reference(**full, use_cache=False).loss  # with a cache, transformers ignores packing
        ref_loss.backward()
        ref_grads = _grads(reference)

        group = ulysses.setup(model, dist, world)
        part = ulysses.shard(full, group)
        loss, grads = _sp_run(model, part, group, "ulysses_sdpa")
        results[name] = _compare(loss, grads, ref_loss, ref_grads)
        results[name]["segments"] = ulysses.SEGMENTS in part

        # the loss in chunks (chunked_loss.py), as objectives.UlyssesSFT runs it: 3 chunks of this rank's 14 tokens
        chunked = copy.deepcopy(reference)
        chunked.zero_grad(set_to_none=True)
        chunked_group = ulysses.setup(chunked, dist, world)
        assert chunked_loss.install(chunked, 5, 14)
        ddp = DistributedDataParallel(chunked)  # kept alive through backward: its hooks average the gradients
        assert chunked_loss.chunks_of(ddp) == 3  # ceil(14 / 5): the chunked path, through DDP's wrapper
        loss, _ = objectives.UlyssesSFT(chunked_group)(ddp, full)
        loss.backward()
        results[f"chunked-{name}"] = _compare(loss, _grads(chunked), ref_loss, ref_grads)

        if name == "mha-padded":  # the negative controls
            plain = copy.deepcopy(reference)
            plain.zero_grad(set_to_none=True)
            loss, grads = _sp_run(plain, part, group, "sdpa")  # no all-to-all: attention within the half
            results["control-no-all-to-all"] = _compare(loss, grads, ref_loss, ref_grads)
            late = copy.deepcopy(reference)
            late.zero_grad(set_to_none=True)
            loss, grads = _sp_run(late, _shift_after_split(full, part, group), group, "ulysses_sdpa")
            results["control-shift-after-split"] = _compare(loss, grads, ref_loss, ref_grads)
    results["seconds"] = {"value": time.monotonic() - started}  # type: ignore[dict-item]
    if rank == 0:
        out.write_text(json.dumps(results, indent=1))
    td.barrier()
    td.destroy_process_group()


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, dict]:
    """Both ranks started directly (torchrun's launcher would import torch once more: seconds on 2 cores)."""
    import socket

    out = tmp_path_factory.mktemp("ulysses") / "results.json"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    cmd = [sys.executable, "-m", "tests.runtime.test_ulysses", str(out)]
    procs = []
    for rank in range(2):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs) and out.exists(), "\n".join(log[-3000:] for log in logs)
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_on_halves_equal_one_process_on_the_whole_sequence(measured, case):
    got = measured[case]
    assert got["loss_rel"] < TOLERANCE, got
    assert got["grad_rel"] < TOLERANCE, got
    assert got["segments"] == case.endswith(("packed", "left-padded"))  # the fast path elsewhere


@pytest.mark.parametrize("case", list(CASES))
def test_the_loss_in_chunks_over_a_rank_s_slice_equals_the_whole_sequence_s(measured, case):
    """objectives.UlyssesSFT with the chunked loss (chunked_loss.py: targets shifted before the split, the sum x
    degree / the micro-batch's targets) gives the one-process loss and gradients, without the whole logits."""
    got = measured[f"chunked-{case}"]
    assert got["loss_rel"] < TOLERANCE, got
    assert got["grad_rel"] < TOLERANCE, got


@pytest.mark.parametrize("control", ["control-no-all-to-all", "control-shift-after-split"])
def test_the_comparison_fails_without_each_ingredient(measured, control):
    got = measured[control]
    assert got["loss_rel"] > 1e-3 or got["grad_rel"] > 1e-3, got
    assert got["grad_rel"] > 100 * TOLERANCE, got


# ---------------------------------------------------------------- one process


def test_groups_are_consecutive_ranks_and_imply_the_data_parallel_rank():
    layouts = [ulysses.Layout(rank, 8, 4) for rank in range(8)]
    assert [(x.dp_rank, x.sp_rank) for x in layouts] == [(r // 4, r % 4) for r in range(8)]
    assert layouts[5].members(layouts[5].dp_rank) == (4, 5, 6, 7) and layouts[0].dp_size == 2
    with pytest.raises(ValueError, match=r"parallel\.ulysses 3 does not divide the 8 processes"):
        ulysses.Layout(0, 8, 3)


def test_kv_heads_are_repeated_only_as_far_as_the_degree_needs():
    assert ulysses.kv_repeat(32, 8, 4) == 1
    assert ulysses.kv_repeat(32, 8, 16) == 2
    assert ulysses.kv_repeat(28, 4, 7) == 7  # Qwen2.5-7B-like: 28 heads, 4 kv heads
    assert ulysses.kv_repeat(4, 1, 2) == 2


def test_a_degree_the_heads_cannot_split_is_refused_naming_heads_and_field():
    config = _config(2)
    config.num_attention_heads, config.num_key_value_heads = 6, 2
    with pytest.raises(UserError, match=r"parallel.ulysses 4: the model has 6 attention heads \(2 key/value heads\)"):
        ulysses.check_config(config, 4)
    ulysses.check_config(config, 2)  # 2 divides 6 (kv heads 2 too)


def _group(rank: int, degree: int = 2) -> ulysses.Group:
    return ulysses.Group(degree=degree, rank=rank, dp_rank=0, dp_size=1, ranks=tuple(range(degree)))


def test_shard_pads_shifts_before_splitting_and_keeps_global_positions():
    full = batch("padded")
    parts = [ulysses.shard(full, _group(r)) for r in range(2)]
    assert [p["input_ids"].shape for p in parts] == [torch.Size([2, 7])] * 2
    assert torch.equal(parts[1]["position_ids"][0], torch.arange(7, 14))
    # the target of rank 0's last token is rank 1's first token
    assert torch.equal(parts[0][ulysses.LABELS][:, -1], full["labels"][:, 7])
    assert torch.equal(parts[0][ulysses.LABELS][:, :-1], full["labels"][:, 1:7])
    assert (parts[1][ulysses.LABELS][:, -2:] == ulysses.IGNORE).all()  # the last token, the pad
    targets = int((full["labels"][:, 1:] != ulysses.IGNORE).sum())
    assert all(int(p[ulysses.TOKENS]) == targets for p in parts)
    assert ulysses.SEGMENTS not in parts[0] and "labels" not in ulysses.inputs(parts[0])


def test_segments_separate_packed_examples_and_padding():
    positions = torch.tensor([[0, 1, 2, 0, 1, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    assert torch.equal(ulysses.segments_of(mask, positions), torch.tensor([[1, 1, 1, 2, 2, 3, 3]]))
    assert ulysses.segments_of(mask, torch.arange(7)[None]) is None  # right padding alone: causal is exact
    left = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    assert torch.equal(ulysses.segments_of(left, torch.arange(7)[None]), torch.tensor([[1, 1, 2, 2, 2, 2, 2]]))
    allowed = ulysses.segment_mask(torch.tensor([[1, 1, 2, 2]]))[0, 0]
    assert allowed.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert ulysses.run_positions(torch.tensor([[1, 1, 2], [1, 2, 2]])).tolist() == [[0, 1, 0, 0, 0, 1]]


def test_the_flash_attention_glue_flattens_runs_into_varlen_positions(monkeypatch):
    """No flash-attn here: a stand-in for transformers' _flash_attention_forward with its contract ([B, S,
    heads, d] in and out; position ids restarting at 0 start a new sequence) checks the glue around it
    (flattening the batch into runs, GQA shapes, transposes) against the sdpa path."""
    import transformers.modeling_flash_attention_utils as fa

    def stand_in(q, k, v, mask, query_length, is_causal, position_ids=None, **_):
        assert mask is None and is_causal and query_length == q.shape[1]
        runs = None if position_ids is None else (position_ids == 0).long().cumsum(-1)
        n = q.shape[2] // k.shape[2]
        k, v = (ulysses._repeat(t.transpose(1, 2), n) for t in (k, v))
        return ulysses._sdpa(q.transpose(1, 2), k, v, runs, 0.0, None).transpose(1, 2)

    monkeypatch.setattr(fa, "_flash_attention_forward", stand_in)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 7, 8, generator=gen) for h in (4, 2, 2))
    module = torch.nn.Linear(2, 2)
    module.config = SimpleNamespace()  # what get_target_dtype reads
    segments = torch.tensor([[1, 1, 1, 2, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1]])
    for runs in (None, segments):
        got = ulysses._flash(module, "flash_attention_2", q, k, v, runs, 0.0, None)
        want = ulysses._sdpa(q, k, v, runs, 0.0, None)
        assert got.shape == want.shape == (2, 4, 7, 8)
        torch.testing.assert_close(got, want)


def test_one_rank_through_peft_equals_the_model_s_own_loss(tiny_model):
    """Degree 1 (no communication) through a LoRA-wrapped model: the shard's extra keys pass through peft
    and the model to the attention, and ulysses.loss equals transformers' own."""
    from transformers import AutoModelForCausalLM

    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    full = batch("packed")
    full["input_ids"] = full["input_ids"] % model.config.vocab_size
    full["labels"] = full["labels"].where(full["labels"] == ulysses.IGNORE, full["input_ids"])
    expected = lora(**full, use_cache=False).loss
    group = ulysses.setup(lora, SimpleNamespace(rank=0, world=1), 1)
    assert model.config._attn_implementation == "ulysses_sdpa"
    part = ulysses.shard(full, group)
    assert ulysses.SEGMENTS in part
    got = ulysses.loss(lora(**ulysses.inputs(part)), part, group)
    got, expected = float(got.detach()), float(expected.detach())
    assert abs(got - expected) < 1e-5 * expected, (got, expected)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
