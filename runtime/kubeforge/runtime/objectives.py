"""What one micro-batch costs: the training objective, the one place the engines ask for a loss.

``for_contract(contract)`` returns a callable ``(module, batch) -> (loss, metrics)``:

- sft: ``module(**batch, use_cache=False).loss``, the model's own next-token loss over the labelled tokens
  (whatever keys data.collate puts in the batch); no metrics.
- dpo: one forward over the micro-batch's 2n rows (the n chosen responses, then the n rejected ones,
  preference.collate), the summed log-probs of each response, and dpo.losses against the reference
  log-probs the batch carries (``ref_logps``); metrics are TRL's (dpo.METRICS), means over the pairs.

The engines call it inside their own accumulation (common.accumulate for DDP and FSDP2, DeepSpeed's
engine in zero.py) and return a ``StepLoss``: the step's mean loss on this rank (a float, as before)
carrying the mean of each metric over the step's micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kubeforge.runtime import chunked_loss, dpo

Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


class StepLoss(float):
    """A step's mean loss on this rank, with the step's mean metrics (``.metrics``) riding along."""

    metrics: dict[str, float]

    def __new__(cls, value: float, metrics: dict[str, float] | None = None) -> StepLoss:
        out = super().__new__(cls, value)
        out.metrics = dict(metrics or {})
        return out


def sft(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The model's own loss; no KV cache in training (transformers keeps packed examples apart by their
    position ids only without one)."""
    return module(**{"use_cache": False, **batch}).loss, {}


class DPO:
    def __init__(self, beta: float, loss_type: str, label_smoothing: float = 0.0):
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def __call__(
        self, module: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logps, tokens = dpo.logps_of(module, batch)
        return self.from_logps(logps, tokens, batch["ref_logps"].to(logps.device))

    def from_logps(
        self, logps: torch.Tensor, tokens: torch.Tensor, ref_logps: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean loss and the metrics of 2n rows' summed log-probs (chosen first), their response
        token counts and their reference log-probs."""
        chosen, rejected = dpo.split_rows(logps)
        ref_chosen, ref_rejected = dpo.split_rows(ref_logps.float())
        chosen_tokens, rejected_tokens = dpo.split_rows(tokens)
        per_pair = dpo.losses(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_tokens=chosen_tokens,
            rejected_tokens=rejected_tokens,
        )
        return per_pair.mean(), dpo.metrics(chosen, rejected, ref_chosen, ref_rejected, self.beta)


class UlyssesSFT:
    """The next-token loss with the sequence split over a Ulysses group (ulysses.py): this rank's slice of
    every row (labels shifted before the split), its tokens' loss sum x degree / the whole micro-batch's
    targets, so that the engines' gradient averaging over all ranks gives the whole sequence's gradient;
    computed in chunks (chunked_loss.py) where the model's loss is."""

    def __init__(self, group: Any):
        self.group = group

    def __call__(
        self, module: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from kubeforge.runtime import ulysses

        part = ulysses.shard(batch, self.group)
        if chunked_loss.chunks_of(module):  # the same sum x degree / targets, the logits never whole
            items = part[ulysses.TOKENS].clamp(min=1) / self.group.degree
            out = module(**ulysses.inputs(part), shift_labels=part[ulysses.LABELS], num_items_in_batch=items)
            return out.loss, {}
        return ulysses.loss(module(**ulysses.inputs(part)), part, self.group), {}


def for_contract(contract: Any) -> Objective:
    t = contract.training
    if t.objective == "dpo":
        return DPO(t.dpo.beta, t.dpo.loss_type, t.dpo.label_smoothing)
    if contract.parallel.ulysses > 1:
        from kubeforge.runtime import ulysses

        group = ulysses.active()
        if group is None:
            raise RuntimeError("parallel.ulysses > 1 but no Ulysses group was set up (engines.build does it)")
        return UlyssesSFT(group)
    return sft


def mean_metrics(each: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over the micro-batches that report it (equal-sized micro-batches: over pairs)."""
    keys = [k for k in (each[0] if each else {}) if all(k in m for m in each)]
    return {k: sum(m[k] for m in each) / len(each) for k in keys}


def tokens(batch: dict[str, Any]) -> int:
    """Tokens the forward pass processes, for tokens/s: the count data.collate attaches (``.tokens``), else the
    ones of a 2-D attention mask (a DPO micro-batch: both rows of every pair, so each prompt counts twice, as the
    model reads it twice; padding left out), else every position."""
    count = getattr(batch, "tokens", None)
    if count is not None:
        return int(count)
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


def reduce_step(result: float, world: int, device: torch.device) -> tuple[float, dict[str, float]]:
    """A step's loss and metrics, each the mean over the ranks (every rank reports the same metric names
    over the same number of pairs): one all_reduce."""
    metrics = dict(getattr(result, "metrics", {}) or {})
    if world == 1:
        return float(result), metrics
    import torch.distributed as td

    names = sorted(metrics)
    values = torch.tensor([float(result), *(metrics[k] for k in names)], dtype=torch.float64, device=device)
    td.all_reduce(values)
    values = (values / world).tolist()
    return values[0], dict(zip(names, values[1:], strict=True))
