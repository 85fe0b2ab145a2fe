"""Direct Preference Optimization (Rafailov et al. 2023): the losses, their metrics, the reference.

The policy's and the reference's log-probability of a response is the sum, over the response's
tokens (labels other than -100: the response and its EOS), of log p(token | everything before it).
With c = log pi(chosen) - log ref(chosen) and r = the same for the rejected response, the losses
are TRL's (``DPOConfig.loss_type``, TRL 1.16, checked against it in tests/runtime/test_dpo.py), each
averaged over the pairs of a micro-batch:

    sigmoid    -log sigmoid(b (c - r))                              (DPO; label_smoothing unused, as TRL)
    hinge      relu(1 - b (c - r))                                  (SLiC)
    ipo        ((c / |chosen| - r / |rejected|) - 1 / (2 b))^2      (IPO, per-token averages as TRL)
    robust     (-(1-e) log sigmoid(b (c-r)) + e log sigmoid(-b (c-r))) / (1 - 2e)   (rDPO, e = label_smoothing)
    exo_pair   q log(q / (1-e)) + (1-q) log((1-q) / e), q = sigmoid(b (c - r))     (EXO, e > 0)
    nca_pair   -log sigmoid(b c) - log sigmoid(-b c) / 2 - log sigmoid(-b r) / 2
    apo_zero   1 - sigmoid(b c) + sigmoid(b r)
    apo_down   sigmoid(b c) + 1 - sigmoid(b (c - r))
    sppo_hard  (c - 1 / (2 b))^2 + (r + 1 / (2 b))^2

and the metrics TRL logs: rewards/chosen = b c, rewards/rejected = b r, rewards/margins = b (c - r),
rewards/accuracies = share of pairs with b c > b r, logps/chosen and logps/rejected (the policy's).

The reference model is the starting model. Its log-probs of every pair are computed once, before the
first step, with the engine's own (possibly sharded) module under no_grad and in eval mode; for LoRA
and QLoRA that is the base model with the adapters disabled, since the adapters start at zero. The
pairs are split over the data-parallel ranks in contiguous ranges, each padded to the same number of
micro-batches (so FSDP's and ZeRO-3's per-forward all-gathers match on every rank), and all_gather-ed:
every rank ends with the whole (pairs, 2) table, since any rank may read any pair. Rank 0 keeps it in
``<checkpoints>/reference-logps.pt`` and in every checkpoint taken, so a resumed run (also on a new pod
that restored its checkpoint from s3://) reads it back and never recomputes it from trained weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kubeforge.runtime.contract import STRATEGIES
from kubeforge.runtime.data import IGNORE
from kubeforge.runtime.entry import UserError

log = logging.getLogger("kubeforge.dpo")

REFERENCE = "reference-logps.pt"
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
SMOOTHED = ("robust", "exo_pair")  # the loss types that read label_smoothing


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of the labelled tokens (labels != -100, shifted by one: the
    logits at position t predict the token at t + 1) in fp32, and how many tokens that is."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:].to(logits.device)
    mask = labels != IGNORE
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_token = picked - torch.logsumexp(logits, dim=-1)
    return (per_token * mask).sum(dim=-1), mask.sum(dim=-1)


def logps_of(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps`` of the model's forward over a preference micro-batch: from the loss in chunks where the
    model has it (chunked_loss.py: the logits never whole), else from the model's logits."""
    from kubeforge.runtime import chunked_loss

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if not chunked_loss.chunks_of(module):
        return sequence_logps(module(**inputs).logits, batch["labels"])
    targets = chunked_loss.targets_of(batch["labels"])
    per_token = module(**inputs, shift_labels=targets, token_logps=True).token_logps
    mask = targets.to(per_token.device) != IGNORE
    return per_token.sum(dim=-1), mask.sum(dim=-1)


def losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-pair loss of ``loss_type`` (TRL's definitions) from the summed log-probs of each side."""
    c = chosen - ref_chosen
    r = rejected - ref_rejected
    z = beta * (c - r)
    e = label_smoothing
    if loss_type == "sigmoid":
        return -F.logsigmoid(z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo averages over the response tokens: pass chosen_tokens and rejected_tokens")
        delta = c / chosen_tokens.clamp(min=1) - r / rejected_tokens.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
    if loss_type == "exo_pair":
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(e)
        )
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(z)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


def metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> dict[str, float]:
    """TRL's DPO metrics over the pairs given (means)."""
    with torch.no_grad():
        reward_c = beta * (chosen - ref_chosen).detach().float()
        reward_r = beta * (rejected - ref_rejected).detach().float()
        values = torch.stack(
            [
                reward_c.mean(),
                reward_r.mean(),
                (reward_c - reward_r).mean(),
                (reward_c > reward_r).float().mean(),
                chosen.detach().float().mean(),
                rejected.detach().float().mean(),
            ]
        )
    return dict(zip(METRICS, values.tolist(), strict=True))


def split_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's 2n rows are the n chosen, then the n rejected."""
    n = values.shape[0] // 2
    return values[:n], values[n:]


def disable_dropout(model: torch.nn.Module) -> None:
    """As TRL's DPOTrainer (disable_dropout=True): the policy's log-probs are compared with the reference's,
    computed without dropout, so a LoRA adapter's dropout would only add noise to the margins."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ---------------------------------------------------------------------------------------------- the reference


def reference(
    module: torch.nn.Module,
    pairs: list[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    *,
    micro_batch: int,
    dp_rank: int,
    dp: int,
    device: torch.device,
    autocast: Callable[[], Any],
) -> torch.Tensor:
    """The (len(pairs), 2) table of the module's summed log-probs of each pair's chosen and rejected
    response, computed as the module is now (the starting model), on every rank."""
    import torch.distributed as td

    per_rank = -(-len(pairs) // dp)
    steps = max(1, -(-per_rank // micro_batch))
    mine = list(range(dp_rank * per_rank, min(len(pairs), (dp_rank + 1) * per_rank)))
    padded = mine + [0] * (steps * micro_batch - len(mine))  # the same number of forwards on every rank
    out = torch.zeros((steps * micro_batch, 2), dtype=torch.float32, device=device)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for s in range(steps):
                chunk = [pairs[i] for i in padded[s * micro_batch : (s + 1) * micro_batch]]
                batch = {k: v.to(device) for k, v in collate(chunk).items()}
                with autocast():
                    logps, _ = logps_of(module, batch)
                chosen, rejected = split_rows(logps)
                out[s * micro_batch : (s + 1) * micro_batch] = torch.stack([chosen, rejected], dim=1)
    finally:
        module.train(was_training)
    out = out[:per_rank]
    if dp > 1:
        gathered = [torch.zeros_like(out) for _ in range(dp)]
        td.all_gather(gathered, out)
        out = torch.cat(gathered)
    return out[: len(pairs)].cpu()


def reference_key(contract: Any, dataset_digest: str, pairs: int) -> dict[str, Any]:
    """What a saved reference table belongs to: read back only when all of it matches."""
    return {
        "model": contract.model.uri,
        "revision": contract.model.revision,
        "dataset": dataset_digest,
        "pairs": pairs,
        "maxSeqLength": contract.dataset.max_seq_length,
        "precision": contract.compute.precision,
    }


def save_reference(folder: Path, table: torch.Tensor, key: dict[str, Any]) -> Path:
    """Write ``folder/reference-logps.pt`` atomically (a temporary name, then a rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REFERENCE
    tmp = folder / f".{REFERENCE}.tmp"
    torch.save({"key": key, "logps": table.cpu()}, tmp)
    os.replace(tmp, path)
    return path


def load_reference(path: Path, key: dict[str, Any]) -> torch.Tensor | None:
    """The table saved at ``path`` when it exists and belongs to ``key``; else None."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file is as good as none
        log.warning("%s: unreadable (%s)", path, err)
        return None
    if saved.get("key") != key:
        log.warning("%s: computed for %s, not for this run (%s)", path, saved.get("key"), key)
        return None
    return saved["logps"]


def copy_into(checkpoint_dir: Path, root: Path) -> None:
    """Rank 0, after a checkpoint is complete: keep the reference table with it (it travels to s3:// with it)."""
    source = root / REFERENCE
    if checkpoint_dir.is_dir() and source.is_file():
        shutil.copyfile(source, checkpoint_dir / REFERENCE)


def prepare_reference(
    *,
    compute: Callable[[], torch.Tensor],
    root: Path,
    resumed_from: Path | None,
    key: dict[str, Any],
    main: bool,
    world: int,
    device: torch.device,
) -> torch.Tensor:
    """The reference table for this run, on every rank.

    Resuming: the one kept in the checkpoint resumed from (or in ``root``, written before the first step),
    never recomputed, since the weights are no longer the starting model's. Starting: the one in ``root``
    when a previous attempt left it for the same model and data, else ``compute()``, which rank 0 saves."""
    table = None
    if main:
        for folder in ([resumed_from] if resumed_from is not None else []) + [root]:
            table = load_reference(folder / REFERENCE, key)
            if table is not None:
                log.info("reference log-probs of %d pairs: read from %s", table.shape[0], folder / REFERENCE)
                if folder != root:  # root's copy goes into every later checkpoint (copy_into)
                    save_reference(root, table, key)
                break
    table = _broadcast_optional(table, key["pairs"], main, world, device)
    if table is not None:
        return table
    if resumed_from is not None:
        raise UserError(
            f"{resumed_from}: resuming objective dpo needs the reference log-probs kept with the checkpoints "
            f"({REFERENCE}, for this model and dataset), and none is there; they cannot be recomputed from trained "
            "weights. Remove the checkpoints to start over, or restore the file"
        )
    table = compute()
    if main:
        save_reference(root, table, key)
        log.info(
            "reference log-probs of %d pairs: computed from the starting model, kept in %s",
            table.shape[0],
            root / REFERENCE,
        )
    return table


def _broadcast_optional(table: torch.Tensor | None, rows: int, main: bool, world: int, device: torch.device):
    """Rank 0's table (or its absence) on every rank."""
    if world == 1:
        return table
    import torch.distributed as td

    flag = torch.tensor([1 if (main and table is not None) else 0], device=device)
    td.broadcast(flag, src=0)
    if not int(flag.item()):
        return None
    buffer = table.to(device) if (main and table is not None) else torch.zeros((rows, 2), device=device)
    td.broadcast(buffer, src=0)
    return buffer.cpu()


def start(
    engine: Any,
    pairs: list[Any],
    contract: Any,
    *,
    dist: Any,
    device: torch.device,
    pad_id: int,
    root: Path,
    resumed_from: Path | None,
    data_path: Path,
) -> Callable[[list[Any]], dict[str, Any]]:
    """Before the first step of a dpo run: dropout off, the reference table (computed, or read back when
    resuming), and the collate function that puts each row's reference log-prob in its micro-batch."""
    from kubeforge.runtime import preference
    from kubeforge.runtime.engines import common

    disable_dropout(engine.model)
    dp = contract.parallel.data_parallel
    if dp != dist.world:
        raise UserError(
            f"training.objective dpo: {dist.world} processes but {dp} data-parallel ranks; dpo splits "
            "the reference pass over data-parallel ranks only"
        )

    # the same matmul precision as the engine's training forward: DDP and FSDP2 under autocast, DeepSpeed's
    # module already in the compute dtype
    deepspeed = STRATEGIES[contract.parallel.strategy].engine == "deepspeed"

    def compute() -> torch.Tensor:
        return reference(
            engine.module,
            pairs,
            lambda chunk: preference.collate(chunk, pad_id),
            micro_batch=contract.training.micro_batch_size,
            dp_rank=engine.dp_rank,
            dp=dp,
            device=device,
            autocast=contextlib.nullcontext if deepspeed else lambda: common.autocast(contract, device),
        )

    digest = preference.digest(data_path) if dist.main else ""  # only rank 0 reads and writes the table
    table = prepare_reference(
        compute=compute,
        root=root,
        resumed_from=resumed_from,
        key=reference_key(contract, digest, len(pairs)),
        main=dist.main,
        world=dist.world,
        device=device,
    )
    return lambda chunk: preference.collate(chunk, pad_id, table)
