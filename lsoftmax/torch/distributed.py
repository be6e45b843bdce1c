"""Class-sharded margin head over ``torch.distributed`` (gloo on CPU, NCCL on GPU), for every
kind of ``lsoftmax.margins`` (an int margin is L-Softmax's).

``ShardedMarginHead(in_features, num_classes, ...)`` keeps rows ``[class_begin, class_end)`` of
the (C x D) weight on each rank: about C / world rows. A training forward

1. all-gathers the features and labels of every rank (their batch sizes may differ);
2. streams over the shard's classes with the fused loss's kernels (``lsoftmax.torch.fused``;
   the kinds that normalize W use the shard's C/world inverse row norms): the target logit of a
   row gets its margin on the rank that owns the row's class, the others only fold that row's
   plain logits into its running log-sum-exp;
3. all-reduces the per-row max (MAX) and sum of exponentials (SUM) and the target logits (SUM:
   one owner per row), which gives every rank the exact cross-entropy of every row;
4. returns the loss of this rank's own rows (``reduction`` over them).

The backward all-gathers every rank's upstream gradient, recomputes the shard's blocks, sums
the feature gradients over ranks (all-reduce) and keeps this rank's rows. The weight shard's
gradient is that of the *average over ranks* of the returned losses: the average DDP applies
to the backbone's gradients, so ``DDP(backbone)`` + this head + ``loss.backward()`` gives, on
every parameter, the gradient of the mean loss over the global batch (equal batch sizes).

Partial FC (``sample_rate < 1``): each training step keeps every class of the global batch that
the shard owns plus random negatives up to ``ceil(sample_rate * shard size)`` classes; the loss
is the cross-entropy over the kept classes and only their weight rows get gradients.

Checkpoints: ``save_sharded(head, path)`` writes one file with the whole (C x D) weight (rank 0
receives the shards one by one, so it never holds more than the weight); ``load_sharded(head,
path)`` reads it into a head of any world size.

Lambda (lsoftmax, sphereface) follows ``lsoftmax.torch.scheduled.ScheduledStep`` like the
ordinary heads: the step counter is a buffer, the schedule and margin are in the ``state_dict``,
and after ``head.attach(optimizer)`` only optimizer steps advance it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lsoftmax.margins import LSoftmax, Margin, default_schedule, margin_from_dict
from lsoftmax.schedules import Schedule, schedule_from_dict
from lsoftmax.torch import fused
from lsoftmax.torch.functional import check_inputs, check_margin
from lsoftmax.torch.scheduled import ScheduledStep

__all__ = ["ShardedMarginHead", "load_sharded", "save_sharded", "shard_range"]


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[begin, end)`` of rank ``rank``: the first ``C % world`` ranks get one more."""
    base, extra = divmod(num_classes, world_size)
    begin = rank * base + min(rank, extra)
    return begin, begin + base + (1 if rank < extra else 0)


def _all_gather_rows(t: Tensor, sizes: list[int], group: Any) -> Tensor:
    """Concatenation over ranks of ``t`` (``sizes[r]`` rows on rank r; padded for gloo/NCCL)."""
    most = max(sizes)
    if t.shape[0] < most:
        t = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def _sample_classes(
    labels_local: Tensor, shard_size: int, sample_rate: float, gen: torch.Generator
) -> Tensor:
    """Sorted indices of the shard's kept classes: every positive, then random negatives."""
    owned = labels_local[(labels_local >= 0) & (labels_local < shard_size)]
    positive = torch.zeros(shard_size, dtype=torch.bool)
    positive[owned.cpu()] = True
    keep = max(int(positive.sum()), min(shard_size, math.ceil(sample_rate * shard_size)))
    # Positives first (score -1), the rest in a random order (scores in [0, 1)).
    score = torch.rand(shard_size, generator=gen)
    score[positive] = -1.0
    return torch.sort(torch.topk(score, keep, largest=False).indices).values


class _ShardedCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        target: Tensor,
        head: ShardedMarginHead,
        lam: float,
        classes: Tensor | None,
        apply_margin: bool,
    ) -> Tensor:
        group = head.process_group
        world = dist.get_world_size(group)
        sizes_t = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        size_parts = [torch.empty_like(sizes_t) for _ in range(world)]
        dist.all_gather(size_parts, sizes_t, group=group)
        sizes = [int(s) for s in size_parts]
        rank = dist.get_rank(group)
        offset = sum(sizes[:rank])
        x_all = _all_gather_rows(x.contiguous(), sizes, group)
        y_all = _all_gather_rows(target.to(torch.int64), sizes, group)

        local = y_all - head.class_begin
        shard_size = weight.shape[0]
        w = weight
        if classes is not None:  # partial FC: labels into the kept classes, -1 if not kept
            remap = torch.full((shard_size,), -1, dtype=torch.int64, device=x.device)
            remap[classes] = torch.arange(classes.numel(), device=x.device)
            inside = (local >= 0) & (local < shard_size)
            local = torch.where(inside, remap[local.clamp(0, shard_size - 1)], -1)
            w = weight.index_select(0, classes)
        w = w.contiguous()
        owned = ((local >= 0) & (local < w.shape[0])).nonzero().view(-1)
        p = fused.prepare(x_all, w, local, head.margin, lam, rows=owned, apply_margin=apply_margin)
        chunk = fused.check_chunk_size(head.chunk_size, x_all.shape[0], max(w.shape[0], 1))
        row_max, row_sum = fused.stream_lse(p.xe, w, p.inv, local, p.target, chunk)
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        # exp(-inf - -inf) for a rank whose (sampled) shard is empty: nothing to carry.
        carried = torch.where(
            row_max == global_max, row_sum, row_sum * torch.exp(row_max - global_max)
        )
        dist.all_reduce(carried, group=group)
        target_logits = p.target.clone()
        dist.all_reduce(target_logits, group=group)  # one owner per row: the others add 0
        lse = global_max + torch.log(carried)
        losses = (lse - target_logits.to(torch.float64)).to(x.dtype)[offset : offset + x.shape[0]]

        ctx.save_for_backward(w, local, lse, target_logits)
        ctx.p, ctx.head, ctx.chunk = p, head, chunk
        ctx.sizes, ctx.offset, ctx.classes, ctx.shard_size = sizes, offset, classes, shard_size
        return fused.reduce_losses(losses, head.reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        w, local, lse, target_logits = ctx.saved_tensors
        p: fused.Prepared = ctx.p
        head: ShardedMarginHead = ctx.head
        group = head.process_group
        world = dist.get_world_size(group)
        n_local = ctx.sizes[dist.get_rank(group)]
        scale = fused.row_scale(grad_out, head.reduction, n_local, p.xe.dtype)
        scale_all = _all_gather_rows(scale, ctx.sizes, group)
        # Non-owned rows never read their target logit here: p.target is 0 there, and the
        # kernels see no target in range for them.
        grad_xe_all, grad_w = fused.stream_grad(
            p.xe, w, p.inv, local, p.target, lse, scale_all, ctx.chunk
        )
        # Linear in the incoming gradients, so summing over ranks after it is the same as before.
        grad_x_all = p.backward(
            grad_xe_all, fused.target_grad(target_logits, lse, scale_all), grad_w
        )
        dist.all_reduce(grad_x_all, group=group)
        grad_x = grad_x_all[ctx.offset : ctx.offset + n_local]
        grad_w /= world
        if ctx.classes is not None:
            full = grad_w.new_zeros((ctx.shard_size, grad_w.shape[1]))
            full.index_copy_(0, ctx.classes, grad_w)
            grad_w = full
        return grad_x, grad_w, None, None, None, None, None


class ShardedMarginHead(ScheduledStep):
    """Margin cross-entropy with the classes split over the ranks of a process group.

    ``margin``: a ``lsoftmax.margins`` spec or an int m (``LSoftmax(m)``). ``forward(x,
    target)`` (this rank's batch) returns the loss of this rank's rows, computed over all
    ``num_classes`` classes (or the partial-FC sample of them). Every rank must call it (it runs
    collectives). In eval mode the loss is the cross-entropy of the kind's plain logits over all
    classes. The step counter and lambda follow ``ScheduledStep``'s rules (as
    ``LSoftmaxLinear``'s); every rank steps together because every rank runs every forward, or,
    after ``attach(optimizer)``, every optimizer step.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        margin: int | Margin = 4,
        schedule: Schedule | None = None,
        *,
        process_group: Any = None,
        sample_rate: float = 1.0,
        reduction: str = "mean",
        chunk_size: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedMarginHead needs torch.distributed to be initialized")
        for name, v in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (0.0 < float(sample_rate) <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        if num_classes < self.world_size:
            raise ValueError(
                f"num_classes ({num_classes}) must be >= the world size ({self.world_size})"
            )
        self.in_features, self.num_classes = in_features, num_classes
        self.class_begin, self.class_end = shard_range(num_classes, self.world_size, self.rank)
        self.margin: Margin = fused.resolve_margin(margin)
        self._init_scheduled(
            schedule if schedule is not None else default_schedule(self.margin), device
        )
        self.sample_rate = float(sample_rate)
        self.reduction = fused.check_reduction(reduction)
        fused.check_chunk_size(chunk_size, 1, num_classes)
        self.chunk_size = chunk_size
        # Same negatives on a rank for the same (seed, rank, step), whatever ran before.
        self._gen = torch.Generator()
        self.seed = seed
        self.weight = nn.Parameter(
            torch.empty(self.class_end - self.class_begin, in_features, device=device, dtype=dtype)
        )
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / in_features))

    schedule = property(ScheduledStep._get_schedule, ScheduledStep._set_schedule)

    def _warn_if_distributed(self) -> None:
        # Every rank runs every forward of this head (they are collective), so ranks count the
        # same forwards: nothing to warn about.
        self._warned_distributed = True

    def _state_fields(self) -> dict[str, Any]:
        return {**super()._state_fields(), "margin": _margin_field(self.margin)}

    def _load_state_fields(self, fields: dict[str, Any]) -> None:
        margin = _margin_of(fields.get("margin", _margin_field(self.margin)))
        super()._load_state_fields(fields)
        self.margin = margin

    @property
    def current_lambda(self) -> float:
        """Lambda of the latest counted step (before any: the one the first will use)."""
        return self._latest_value()

    def sampled_classes(self, target_all_local: Tensor, step: int) -> Tensor:
        """The partial-FC classes (shard indices) for labels relative to the shard, at ``step``."""
        self._gen.manual_seed(hash((self.seed, self.rank, step)) & 0x7FFFFFFF)
        return _sample_classes(target_all_local, self.weight.shape[0], self.sample_rate, self._gen)

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        check_inputs(x, self.weight, target)
        if not self.training:
            return _ShardedCE.apply(x, self.weight, target, self, 0.0, None, False)
        step = int(self.step)
        lam = self._scheduled_value(True)
        classes = None
        if self.sample_rate < 1.0:
            # The kept classes depend on the whole batch's labels: gather them first.
            sizes = [0] * self.world_size
            n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
            parts = [torch.empty_like(n) for _ in sizes]
            dist.all_gather(parts, n, group=self.process_group)
            sizes = [int(p) for p in parts]
            y_all = _all_gather_rows(target.to(torch.int64), sizes, self.process_group)
            classes = self.sampled_classes(y_all - self.class_begin, step).to(x.device)
        return _ShardedCE.apply(x, self.weight, target, self, lam, classes, True)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Arg-max class (global index) of the kind's plain logits of this rank's rows (collective).

        Streams over the shard in blocks, then picks the best of the ranks' best: no rank ever
        holds more than a block of logits.
        """
        check_inputs(x, self.weight, None)
        group = self.process_group
        n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        parts = [torch.empty_like(n) for _ in range(self.world_size)]
        dist.all_gather(parts, n, group=group)
        sizes = [int(p) for p in parts]
        x_all = _all_gather_rows(x.contiguous(), sizes, group)
        best = torch.full((x_all.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
        arg = torch.zeros(x_all.shape[0], dtype=torch.int64, device=x.device)
        chunk = fused.check_chunk_size(self.chunk_size, x_all.shape[0], self.weight.shape[0])
        # The kinds that normalize W rank classes by cosine: scale the columns. (Scaling a row by
        # a positive number, as normalizing x does, does not change its arg-max.)
        inv = fused.inverse_norms(self.weight, self.margin)
        for c0 in range(0, self.weight.shape[0], chunk):
            block = x_all @ self.weight[c0 : c0 + chunk].t()
            if inv is not None:
                block.mul_(inv[c0 : c0 + chunk])
            v, i = block.max(dim=1)
            better = v > best
            best = torch.where(better, v, best)
            arg = torch.where(better, i + c0 + self.class_begin, arg)
        vals = [torch.empty_like(best) for _ in range(self.world_size)]
        args = [torch.empty_like(arg) for _ in range(self.world_size)]
        dist.all_gather(vals, best, group=group)
        dist.all_gather(args, arg, group=group)
        # Ties go to the lowest rank, i.e. the lowest class index, as torch.argmax does.
        pick = torch.stack(vals).argmax(dim=0)
        out = torch.stack(args).gather(0, pick.unsqueeze(0)).squeeze(0)
        offset = sum(sizes[: self.rank])
        return out[offset : offset + x.shape[0]]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"shard=[{self.class_begin}, {self.class_end}), margin={self.margin}, "
            f"sample_rate={self.sample_rate}, schedule={self.schedule}"
        )


def _margin_field(margin: Margin) -> Any:
    # An int for L-Softmax (the form LSoftmaxLinear and earlier checkpoints use), else the dict.
    return int(margin.m) if isinstance(margin, LSoftmax) else margin.to_dict()


def _margin_of(field: Any) -> Margin:
    return margin_from_dict(field) if isinstance(field, dict) else LSoftmax(check_margin(field))


def save_sharded(head: ShardedMarginHead, path: str) -> None:
    """Writes the whole weight, the step and the settings to ``path`` (one file, from rank 0)."""
    group = head.process_group
    w = head.weight.detach()
    if head.rank == 0:
        full = torch.empty(head.num_classes, head.in_features, dtype=w.dtype)
        full[head.class_begin : head.class_end] = w.cpu()
        for r in range(1, head.world_size):
            b, e = shard_range(head.num_classes, head.world_size, r)
            part = full[b:e] if w.device.type == "cpu" else torch.empty(e - b, w.shape[1],
                                                                        dtype=w.dtype,
                                                                        device=w.device)
            dist.recv(part, src=dist.get_global_rank(group, r) if group else r, group=group)
            if part.data_ptr() != full[b:e].data_ptr():
                full[b:e] = part.cpu()
        torch.save(
            {
                "weight": full,
                "step": head.step.detach().cpu(),
                "num_classes": head.num_classes,
                "in_features": head.in_features,
                "margin": _margin_field(head.margin),
                "schedule": head.schedule.to_dict(),
            },
            path,
        )
    else:
        dist.send(w.contiguous(), dst=dist.get_global_rank(group, 0) if group else 0, group=group)
    dist.barrier(group=group)


def load_sharded(head: ShardedMarginHead, path: str) -> dict[str, Any]:
    """Reads ``save_sharded``'s file into ``head`` (any world size); returns the file's dict."""
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    full = state["weight"]
    if tuple(full.shape) != (head.num_classes, head.in_features):
        raise ValueError(
            f"{path} holds a weight of shape {tuple(full.shape)}, but the head is "
            f"({head.num_classes}, {head.in_features})"
        )
    with torch.no_grad():
        head.weight.copy_(full[head.class_begin : head.class_end])
        head.step.copy_(state["step"])
    return state


def schedule_of(state: dict[str, Any]) -> Schedule:
    """The schedule saved by ``save_sharded``."""
    return schedule_from_dict(state["schedule"])


def margin_of(state: dict[str, Any]) -> Margin:
    """The margin spec saved by ``save_sharded``."""
    return _margin_of(state["margin"])
