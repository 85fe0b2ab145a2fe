"""DeepSpeed-Ulysses sequence parallelism for the DDP, FSDP2 and ZeRO engines (``parallel.ulysses``).

As in Jacobs et al. 2023 ("DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme
Long Sequence Transformer Models") and ms-swift's ``sequence_parallel_size``: ``degree`` consecutive
ranks form a sequence-parallel group; they read the same samples and each holds one contiguous
slice of every sequence. Embeddings, norms, MLPs and the LM head run on the local slice. In every
attention layer q, k and v go all-to-all from [local slice, all heads] to [whole sequence,
heads / degree], attention runs over the whole sequence for those heads, and a second all-to-all
brings the output back to [local slice, all heads]. The all-to-alls are autograd functions whose
backward is the reverse all-to-all.

How train.py uses it (one group per process)::

    group = ulysses.setup(model, dist, degree)        # process groups + the attention swap
    part = ulysses.shard(collated_batch, group)         # this rank's slice, labels shifted first
    output = module(**ulysses.inputs(part))             # no labels: HF must not shift them again
    loss = ulysses.loss(output, part, group)            # backward this

Loss and gradients. ``shard`` shifts the labels over the whole (padded) sequence before slicing
(the target of the last token of a slice is the first token of the next rank's slice) and counts
the target tokens N of the whole micro-batch (every rank sees the whole collated batch, so the
count needs no communication). Rank r's loss is ``degree * sum(its tokens' cross-entropy) / N``.
Backpropagating it on every rank, the all-to-alls carry each rank's share back to the ranks that
computed the inputs, so rank r's gradient is the partial derivative of ``degree * L`` with respect
to its copy of the weights (L: the token-mean loss of the micro-batch), and the true gradient of
L is the mean of these partials over the group. Gradient averaging over the whole world (DDP's
all-reduce, FSDP2's reduce-scatter and DeepSpeed's gradient averaging when they span every rank,
their default) is therefore exactly the mean over data-parallel ranks of each one's true
gradient, as without sequence parallelism; and the mean of the ranks' loss values over the world
is the mean micro-batch loss.

Attention masks. The model's own mask machinery is bypassed (the attention is registered under a
name transformers has no mask function for, so the model passes no mask). Right-padded batches
without packing need none: causal attention over the whole sequence is exact for every real
token, and that is the fast path (sdpa ``is_causal``: its flash kernel, no S x S mask). Packed
sequences (position ids restarting within a row) and left or inner padding are described by
``shard`` as segments, contiguous runs of tokens that may attend to each other (causally): sdpa
then gets a [B, 1, S, S] boolean mask built in each layer, flash-attention its varlen form.

Heads: the query heads must divide by the degree (else ``setup`` refuses, naming the model's
heads and parallel.ulysses). Key/value heads that do not divide by it are repeated by the
smallest factor that makes them divide (at most up to the query head count): correct, at the
price of more all-to-all bytes for k and v.

Planner notes (memory and communication per GPU, sp = degree, S = sequence length, B = micro-batch,
h = hidden size, H / Hkv query / key-value heads, d = head dim, b = bytes per activation element):

- Every activation that lives on tokens (embeddings, each layer's norms, q/k/v/o projections, MLP
  intermediates, the residual stream, the logits [B, S/sp, V] and the cross-entropy's fp32 copy)
  is divided by sp: they exist for the S/sp local tokens only.
- Attention's own working set is divided by the heads instead of the sequence: q, k, v and the
  output exist for the whole sequence and H/sp (Hkv'/sp) heads, B*S*(H+2*Hkv')*d*b/sp bytes, the
  same as the local q/k/v (Hkv' = Hkv, or Hkv repeated up to a multiple of sp; on the masked sdpa
  path k and v are expanded to H/sp heads). Transient, freed within the layer: the all-to-all's
  send and receive buffers, two more copies of the local q/k/v (forward) or of the output (its
  backward exchanges the same sizes). An explicit mask (packing or left padding, sdpa path) costs
  B*S*S bytes per layer while it runs, NOT divided by sp: prefer flash-attention for packed long
  sequences. sdpa/flash keep only the softmax statistics, B*(H/sp)*S fp32, per layer.
- A small whole-sequence tensor on every rank: the segments (when present), B*S int64.
- Weights, gradients and optimizer states are not affected (sp ranks are data-parallel ranks to
  DDP/FSDP/ZeRO: ZeRO and FSDP shard over the whole world, dp x sp).
- Communication per attention layer, inside the sequence-parallel group (ideally one NVLink
  domain): forward one all-to-all of q, k, v together (B*(S/sp)*(H + 2*Hkv')*d*b bytes sent per
  rank, of which (sp-1)/sp leaves the GPU; Hkv' = Hkv, or Hkv repeated up to a multiple of sp)
  and one all-to-all of the attention output (B*(S/sp)*H*d*b); backward the same two in reverse
  (the gradient of the output, then the gradients of q, k, v): 4 all-to-alls per layer per
  micro-batch, 2 forward + 2 backward (4 + 4 in DeepSpeed's own layer, which sends q, k and v
  separately; same bytes). With gradient checkpointing the recomputation repeats the two forward
  ones. Bytes per GPU per all-to-all are proportional to S/sp (constant when S and sp grow
  together, the paper's point), whereas ring attention moves every other rank's k and v through
  each GPU (proportional to S). An all-to-all needs full bisection bandwidth: keep a sequence-
  parallel group inside one NVLink domain (consecutive ranks are on one node when sp divides the
  GPUs per node).
- Data parallel size is world / sp: the global batch is micro x accumulation x world / sp.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("kubeforge.train")

IGNORE = -100
LABELS = "ulysses_labels"  # this rank's slice of the labels, already shifted (targets of its tokens)
TOKENS = "ulysses_tokens"  # number of targets in the whole micro-batch (0-d)
SEGMENTS = "ulysses_segments"  # [B, S] whole-sequence run ids; present only when causal alone is not exact
LOSS_KEYS = (LABELS, TOKENS)
BATCH_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")
PREFIX = "ulysses_"
INNER = ("sdpa", "flash_attention_2", "flash_attention_3")  # eager runs as sdpa (same mathematics)


@dataclass(frozen=True)
class Layout:
    """Which sequence-parallel group a rank is in: ``degree`` consecutive ranks per group."""

    rank: int
    world: int
    degree: int

    def __post_init__(self) -> None:
        if self.degree < 1 or self.world % self.degree:
            raise ValueError(f"parallel.ulysses {self.degree} does not divide the {self.world} processes")

    @property
    def sp_rank(self) -> int:  # which slice of each sequence this rank holds
        return self.rank % self.degree

    @property
    def dp_rank(self) -> int:  # which samples this rank reads: its group's index
        return self.rank // self.degree

    @property
    def dp_size(self) -> int:
        return self.world // self.degree

    def members(self, group: int) -> tuple[int, ...]:
        return tuple(range(group * self.degree, (group + 1) * self.degree))


@dataclass(frozen=True)
class Group:
    """This process's sequence-parallel group (``process_group`` is None when degree is 1)."""

    degree: int
    rank: int  # within the group: which slice
    dp_rank: int
    dp_size: int
    ranks: tuple[int, ...]
    process_group: Any = None


_ACTIVE: Group | None = None  # the group setup() made; a process belongs to exactly one


def new_group(rank: int, world: int, degree: int) -> Group:
    """Every rank must call it (torch.distributed.new_group is collective over the world)."""
    layout = Layout(rank, world, degree)
    mine = None
    if degree > 1:
        import torch.distributed as td

        for index in range(layout.dp_size):  # every rank creates every group, in the same order
            pg = td.new_group(list(layout.members(index)))
            if index == layout.dp_rank:
                mine = pg
    return Group(degree, layout.sp_rank, layout.dp_rank, layout.dp_size, layout.members(layout.dp_rank), mine)


def heads(config: Any) -> tuple[int, int]:
    """(query heads, key/value heads) of a transformers config (the text config of a multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    q = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or q)
    return q, kv


def kv_repeat(q_heads: int, kv_heads: int, degree: int) -> int:
    """How many times each key/value head is repeated so that the kv heads divide by the degree."""
    groups = q_heads // kv_heads
    for r in range(1, groups + 1):
        if groups % r == 0 and (kv_heads * r) % degree == 0:
            return r
    raise ValueError(f"{q_heads} query heads do not divide by sequence-parallel degree {degree}")


def check_config(config: Any, degree: int) -> None:
    """UserError (before any weights load) when the model's heads cannot be split ``degree`` ways."""
    from kubeforge.runtime.entry import UserError

    q, kv = heads(config)
    if degree > 1 and q % degree:
        raise UserError(
            f"parallel.ulysses {degree}: the model has {q} attention heads ({kv} key/value heads), which do not "
            f"divide by {degree}; choose a degree that divides {q}"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if degree > 1 and getattr(text, "use_sliding_window", False) and getattr(text, "sliding_window", None):
        raise UserError(f"parallel.ulysses {degree}: sliding-window attention is not supported with Ulysses")


def setup(model: torch.nn.Module, dist: Any, degree: int) -> Group:
    """Make the process groups, check the heads, and switch the model's attention to the Ulysses
    wrapper around the attention it had (sdpa, flash_attention_2/3; eager becomes sdpa). ``model``
    may be wrapped (peft, DDP, FSDP2, DeepSpeed): the first transformers model inside is switched.
    ``dist`` has ``rank`` and ``world`` (engines.Dist). Every rank must call it."""
    global _ACTIVE
    base = _transformers_model(model)
    check_config(base.config, degree)
    group = new_group(dist.rank, dist.world, degree)
    inner = base.config._attn_implementation or "sdpa"
    inner = inner.removeprefix(PREFIX)
    if inner == "eager":
        inner = "sdpa"
    if inner not in INNER:
        from kubeforge.runtime.entry import UserError

        raise UserError(f"parallel.ulysses {degree}: attention {inner!r} is not supported (sdpa, flash_attention_2/3)")
    register()
    base.set_attn_implementation(PREFIX + inner)
    _ACTIVE = group
    q, kv = heads(base.config)
    log.info(
        "ulysses: degree %d, slice %d of group %s, data-parallel rank %d of %d; %d heads (%d kv, repeated x%d) per "
        "group, %s over the whole sequence",
        degree, group.rank, list(group.ranks), group.dp_rank, group.dp_size, q, kv,
        kv_repeat(q, kv, degree), inner,
    )  # fmt: skip
    return group


def active() -> Group | None:
    return _ACTIVE


def _transformers_model(model: torch.nn.Module):
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(f"{type(model).__name__}: no transformers model inside")


# ---------------------------------------------------------------- the batch


def shard(batch: dict[str, torch.Tensor], group: Group) -> dict[str, torch.Tensor]:
    """This rank's slice of a collated micro-batch (input_ids, labels, attention_mask, position_ids).

    The sequence is padded to a multiple of the degree (pad tokens: attention 0, label ignored,
    positions continuing); labels are shifted over the whole sequence, then sliced; position ids
    are the global ones (rotary embeddings); ``TOKENS`` is the target count of the whole batch;
    ``SEGMENTS`` (whole sequence) is added only when plain causal attention would not be exact.
    Call it before moving the batch to the GPU (it inspects the batch on the host)."""
    unknown = set(batch) - set(BATCH_KEYS)
    if unknown:
        raise ValueError(f"ulysses.shard: keys {sorted(unknown)} are not supported (only {', '.join(BATCH_KEYS)})")
    ids = batch["input_ids"]
    rows, length = ids.shape
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(ids.device).long()
    labels = batch.get("labels")
    labels = ids.masked_fill(mask == 0, IGNORE) if labels is None else labels
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=ids.device).expand(rows, length)
    positions = positions.expand(rows, length)

    padded = math.ceil(length / group.degree) * group.degree
    extra = padded - length
    if extra:
        ids = torch.nn.functional.pad(ids, (0, extra), value=0)
        mask = torch.nn.functional.pad(mask, (0, extra), value=0)
        labels = torch.nn.functional.pad(labels, (0, extra), value=IGNORE)
        more = positions[:, -1:] + torch.arange(1, extra + 1, device=ids.device)
        positions = torch.cat([positions, more], dim=1)
    targets = torch.cat([labels[:, 1:], labels.new_full((rows, 1), IGNORE)], dim=1)  # shift BEFORE splitting
    local = padded // group.degree
    lo, hi = group.rank * local, (group.rank + 1) * local
    out = {
        "input_ids": ids[:, lo:hi].contiguous(),
        "position_ids": positions[:, lo:hi].contiguous(),
        LABELS: targets[:, lo:hi].contiguous(),
        TOKENS: (targets != IGNORE).sum(),
    }
    segments = segments_of(mask, positions)
    if segments is not None:
        out[SEGMENTS] = segments
    return out


def segments_of(mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """Run ids [B, S] (a token attends causally to earlier tokens of its own run): a new run starts where
    the position ids restart (packing) or the attention mask changes (padding). None when every row is
    one run of real tokens followed by padding, where causal attention alone is exact for real tokens."""
    valid = mask.bool()
    starts = torch.zeros_like(valid)
    starts[:, 1:] = (positions[:, 1:] != positions[:, :-1] + 1) | (valid[:, 1:] != valid[:, :-1])
    real_restart = (starts & valid).any(dim=1)  # a real token starting a new run (not the first token)
    right_padded = (valid[:, 1:] <= valid[:, :-1]).all(dim=1) if valid.shape[1] > 1 else torch.ones_like(real_restart)
    if bool((right_padded & ~real_restart).all()):
        return None
    starts[:, 0] = True
    return starts.long().cumsum(dim=1)


def inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the model takes from a shard: everything but the loss's keys (no labels), and
    ``use_cache=False`` (with a cache, a transformers model in training would keep every layer's
    local k/v in it, and its own mask code would ignore packing; ours does not use it anyway)."""
    return {**{k: v for k, v in batch.items() if k not in LOSS_KEYS}, "use_cache": False}


def loss(output: Any, batch: dict[str, torch.Tensor], group: Group) -> torch.Tensor:
    """This rank's loss to backpropagate: degree * sum of its tokens' cross-entropy / the whole batch's
    target count (module docstring: its mean over the world is the mean micro-batch loss, and DDP's
    world average of its gradients is the true gradient)."""
    logits = getattr(output, "logits", output)
    labels = batch[LABELS].to(logits.device)
    total = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total * group.degree / batch[TOKENS].to(logits.device).clamp(min=1)


# ---------------------------------------------------------------- the all-to-alls


def exchange(
    tensors: tuple[torch.Tensor, ...], process_group: Any, scatter_dim: int, gather_dim: int
) -> tuple[torch.Tensor, ...]:
    """One all-to-all for several tensors of one dtype: each is cut into ``size`` chunks along
    ``scatter_dim`` (chunk j goes to group rank j), and the chunks received are concatenated along
    ``gather_dim`` in group-rank order. Not differentiable by itself (see ``_Exchange``)."""
    import torch.distributed as td

    size = td.get_world_size(process_group) if process_group is not None else 1
    if size == 1:
        return tuple(tensors)
    chunks = [t.chunk(size, dim=scatter_dim) for t in tensors]
    for t in tensors:
        if t.shape[scatter_dim] % size:
            raise ValueError(f"ulysses: dimension {scatter_dim} of {tuple(t.shape)} does not divide by {size}")
    send = torch.cat([c[j].reshape(-1) for j in range(size) for c in chunks])
    recv = torch.empty_like(send)
    td.all_to_all_single(recv, send, group=process_group)
    sizes = [c[0].numel() for c in chunks]
    per_rank = recv.view(size, sum(sizes)).unbind(0)
    out = []
    for i, c in enumerate(chunks):
        at = sum(sizes[:i])
        pieces = [part[at : at + sizes[i]].view(c[0].shape) for part in per_rank]
        out.append(torch.cat(pieces, dim=gather_dim))
    return tuple(out)


class _Exchange(torch.autograd.Function):
    """All-to-all whose backward is the reverse all-to-all (scatter and gather dimensions swapped)."""

    @staticmethod
    def forward(ctx, process_group, scatter_dim, gather_dim, *tensors):  # type: ignore[override]
        ctx.args = (process_group, scatter_dim, gather_dim)
        return _exchange_by_dtype(tensors, process_group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        # autograd materialises the gradient of an unused output as zeros, so none is None here
        process_group, scatter_dim, gather_dim = ctx.args
        back = _exchange_by_dtype(tuple(g.contiguous() for g in grads), process_group, gather_dim, scatter_dim)
        return (None, None, None, *back)


def _exchange_by_dtype(tensors, process_group, scatter_dim, gather_dim) -> tuple[torch.Tensor, ...]:
    if len({t.dtype for t in tensors}) == 1:
        return exchange(tuple(tensors), process_group, scatter_dim, gather_dim)
    return tuple(exchange((t,), process_group, scatter_dim, gather_dim)[0] for t in tensors)


def seq_to_heads(group: Group, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[B, heads, S/sp, d] on each rank -> [B, heads/sp, S, d] (this rank's heads, whole sequence)."""
    return _Exchange.apply(group.process_group, 1, 2, *tensors)


def heads_to_seq(group: Group, tensor: torch.Tensor) -> torch.Tensor:
    """[B, heads/sp, S, d] -> [B, heads, S/sp, d]: the inverse of ``seq_to_heads``."""
    return _Exchange.apply(group.process_group, 2, 1, tensor)[0]


# ---------------------------------------------------------------- the attention function

UNSUPPORTED = ("softcap", "s_aux", "position_bias")


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: q [B, H, S/sp, d], k, v [B, Hkv, S/sp, d] in; [B, S/sp, H, d] out."""
    group = _ACTIVE
    if group is None:
        raise RuntimeError("ulysses attention without ulysses.setup (no sequence-parallel group)")
    for name in UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"ulysses attention: {name} is not supported")
    window = kwargs.get("sliding_window")
    if window is not None and window < query.shape[2] * group.degree:
        raise NotImplementedError(f"ulysses attention: a sliding window ({window}) shorter than the sequence")
    if is_causal is False or not getattr(module, "is_causal", True):
        raise NotImplementedError("ulysses attention: only causal (decoder) self-attention is supported")
    if attention_mask is not None:
        raise RuntimeError("ulysses attention got a mask from the model; masks come from ulysses.shard's segments")
    q_heads, kv_heads = query.shape[1], key.shape[1]
    r = kv_repeat(q_heads, kv_heads, group.degree)
    if r > 1:
        key, value = _repeat(key, r), _repeat(value, r)
    q, k, v = seq_to_heads(group, query, key, value)
    segments = kwargs.get(SEGMENTS)
    inner = module.config._attn_implementation.removeprefix(PREFIX)
    if inner == "sdpa":
        out = _sdpa(q, k, v, segments, dropout, scaling)
    else:
        out = _flash(module, inner, q, k, v, segments, dropout, scaling)
    return heads_to_seq(group, out).transpose(1, 2).contiguous(), None


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    """Each head n times in a row ([B, Hkv, S, d] -> [B, Hkv*n, S, d]), as transformers' repeat_kv."""
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] boolean: query i may attend key j when j <= i and both are in one run."""
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal)[:, None]


def _sdpa(q, k, v, segments, dropout, scaling) -> torch.Tensor:
    mask = None if segments is None else segment_mask(segments.to(q.device))
    extra: dict[str, Any] = {}
    if k.shape[1] != q.shape[1]:
        if mask is None:
            extra["enable_gqa"] = True
        else:
            k, v = _repeat(k, q.shape[1] // k.shape[1]), _repeat(v, q.shape[1] // v.shape[1])
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None, **extra
    )


def run_positions(segments: torch.Tensor) -> torch.Tensor:
    """Each token's index within its run, flattened over the batch ([1, B*S]): the position ids with
    which flash-attention's varlen path separates the runs (every row starts a run)."""
    flat = segments.reshape(-1)
    index = torch.arange(flat.numel(), device=flat.device)
    new = torch.ones_like(flat, dtype=torch.bool)
    new[1:] = flat[1:] != flat[:-1]
    new[:: segments.shape[1]] = True
    starts = torch.cummax(torch.where(new, index, torch.zeros_like(index)), dim=0).values
    return (index - starts)[None]


def _flash(module, inner, q, k, v, segments, dropout, scaling) -> torch.Tensor:
    """flash-attention through transformers (GQA native): plain causal, or varlen over the runs."""
    from transformers.integrations.flash_attention import _use_top_left_mask, get_target_dtype
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    b, h, s, d = q.shape
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, S, heads, d]
    common = {
        "is_causal": True,
        "dropout": dropout,
        "softmax_scale": scaling,
        "use_top_left_mask": _use_top_left_mask,
        "target_dtype": get_target_dtype(qt, module),
        "attn_implementation": inner,
    }
    if segments is None:
        out = _flash_attention_forward(qt, kt, vt, None, query_length=s, **common)
    else:
        flat = [t.reshape(1, b * s, t.shape[2], d) for t in (qt, kt, vt)]
        positions = run_positions(segments.to(q.device))
        out = _flash_attention_forward(*flat, None, query_length=b * s, position_ids=positions, **common)
        out = out.reshape(b, s, h, d)
    return out.transpose(1, 2)  # [B, heads, S, d]


_REGISTERED = False


def register() -> None:
    """Register ulysses_sdpa / ulysses_flash_attention_2 / _3 with transformers' AttentionInterface (and
    no mask function under those names, so that models pass no mask: shard's segments replace it)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    for inner in INNER:
        AttentionInterface.register(PREFIX + inner, attention)
    _REGISTERED = True
