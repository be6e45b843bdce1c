"""The step counter and schedule state of the scheduled heads (``LSoftmaxLinear``, ``LGMLoss``).

What counts as a step, the way Caffe counts one per solver iteration:

- by default, a training-mode forward with a target **and gradients enabled** advances the
  counter (a forward under ``torch.no_grad()`` or ``torch.inference_mode()`` uses the current
  lambda and leaves the counter alone);
- after ``head.attach(optimizer)``, only ``optimizer.step()`` advances it, so k micro-batches of
  gradient accumulation followed by one optimizer step are one step, activation checkpointing's
  recomputed forward sees the same lambda, and under DDP every rank counts the same steps
  whatever ``broadcast_buffers`` is.

The schedule (and the head's other training hyper-parameters, e.g. the margin) is saved in the
``state_dict`` as ``_extra_state``: UTF-8 JSON in a uint8 tensor, so the ``state_dict`` stays
tensors-only (safetensors, ``.to(device)`` loops and ``torch.equal`` comparisons keep working).
Loading it into a default-constructed head restores the schedule exactly; a ``state_dict`` saved
before this entry existed still loads and keeps the head's own schedule.
"""

from __future__ import annotations

import json
import warnings
import weakref
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lsoftmax.schedules import Schedule, schedule_from_dict

__all__ = ["ScheduledStep"]

_EXTRA_STATE = "_extra_state"


class _AttachHandle:
    """Removes an ``attach``: the optimizer hook goes, and the head counts forwards again."""

    def __init__(self, hook: Any, head: ScheduledStep) -> None:
        self._hook = hook
        self._head = weakref.ref(head)

    def remove(self) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        head = self._head()
        if head is not None:
            head._attached_optimizers -= 1

    def __enter__(self) -> _AttachHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class ScheduledStep(nn.Module):
    """Base for modules with a ``schedule`` evaluated at a ``step`` buffer (see module docs).

    Subclasses call ``_init_scheduled(schedule)`` in ``__init__`` (after ``super().__init__()``)
    and ``_scheduled_value(eager)`` in a training forward; they may extend
    ``_state_fields``/``_load_state_fields`` with hyper-parameters that belong in the checkpoint.
    """

    step: Tensor
    #: The name under which the schedule is exposed (``schedule``, ``alpha_schedule``).
    schedule_name: ClassVar[str] = "schedule"

    def _init_scheduled(self, schedule: Schedule, device: torch.device | str | None = None) -> None:
        self._attached_optimizers = 0
        self._warned_distributed = False
        self._set_schedule(schedule)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))

    # -- the schedule -----------------------------------------------------------------------

    def _get_schedule(self) -> Schedule:
        return self._schedule

    def _set_schedule(self, schedule: Schedule) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(
                f"{self.schedule_name} must be a lsoftmax.schedules.Schedule, got {schedule!r}"
            )
        self._schedule = schedule
        # The flat parameters the lsoftmax::schedule_lambda op takes (kept in step with it).
        self._schedule_params = schedule.params()

    # -- counting ---------------------------------------------------------------------------

    @property
    def counts_optimizer_steps(self) -> bool:
        """True while ``attach``ed to an optimizer: only its ``step()`` advances the counter."""
        return self._attached_optimizers > 0

    def attach(self, optimizer: torch.optim.Optimizer) -> _AttachHandle:
        """Count ``optimizer.step()`` calls as this head's steps instead of training forwards.

        Returns a handle whose ``remove()`` (or ``with`` block exit) undoes it. Attach the one
        optimizer that steps the model (attaching two counts both).
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        ref = weakref.ref(self)

        def advance(*_: object) -> None:
            head = ref()
            if head is not None:
                with torch.no_grad():
                    head.step.add_(1)

        hook = optimizer.register_step_post_hook(advance)
        self._attached_optimizers += 1
        return _AttachHandle(hook, self)

    def _scheduled_value(self, eager: bool) -> float | Tensor:
        """The schedule's value at the current step, advancing the counter if this forward counts.

        ``eager``: evaluate on the host (a float). Otherwise a tensor op, so torch.compile needs
        no graph break and a GPU step no host sync.
        """
        value: float | Tensor
        if eager:
            value = self._schedule.value(int(self.step))
        else:
            value = torch.ops.lsoftmax.schedule_lambda(
                self.step, self._schedule.kind, self._schedule_params
            )
        if self._counts_this_forward():
            self.step.add_(1)
        return value

    def _counts_this_forward(self) -> bool:
        """Whether a training forward now advances the counter (warning once under DDP if so)."""
        count = torch.is_grad_enabled() and not self.counts_optimizer_steps
        if count and not self._warned_distributed and not torch.compiler.is_compiling():
            self._warn_if_distributed()
        return count

    def _warn_if_distributed(self) -> None:
        self._warned_distributed = True
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            warnings.warn(
                f"{type(self).__name__} counts grad-enabled training forwards, which ranks can "
                "disagree on; under torch.distributed call head.attach(optimizer) so that every "
                "rank counts the same optimizer steps (docs/training.md, DDP)",
                stacklevel=4,
            )

    def _latest_value(self) -> float:
        # The value of the latest counted step (before any: the one the first will use).
        return self._schedule.value(max(int(self.step) - 1, 0))

    # -- state_dict -------------------------------------------------------------------------

    def _state_fields(self) -> dict[str, Any]:
        return {self.schedule_name: self._schedule.to_dict()}

    def _load_state_fields(self, fields: dict[str, Any]) -> None:
        d = fields.get(self.schedule_name)
        if not isinstance(d, dict):
            raise ValueError(f"{self.schedule_name}: expected a schedule dict, got {d!r}")
        self._set_schedule(schedule_from_dict(d))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # A state_dict from before the schedule was saved: keep this head's own schedule, as
        # loading did then, instead of failing a strict load on the missing key. (The dict is
        # load_state_dict's own copy, so the caller's is not modified.)
        state_dict.setdefault(prefix + _EXTRA_STATE, self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickle) has no optimizer hook: it counts forwards.
        state = dict(self.__dict__)
        state["_attached_optimizers"] = 0
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        # Pickled (e.g. a converted net's torch.save) before the schedule became a property.
        if "_schedule" not in state and self.schedule_name in state:
            state["_schedule"] = state.pop(self.schedule_name)
        state.setdefault("_attached_optimizers", 0)
        state.setdefault("_warned_distributed", False)
        super().__setstate__(state)

    def get_extra_state(self) -> Tensor:
        blob = json.dumps(self._state_fields(), sort_keys=True).encode()
        return torch.tensor(list(blob), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
            raise ValueError(
                f"{type(self).__name__} extra state must be the 1-D uint8 tensor that "
                f"get_extra_state() returns, got {state!r}"
            )
        try:
            fields = json.loads(bytes(state.cpu().tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{type(self).__name__} extra state is not valid JSON: {e}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{type(self).__name__} extra state must hold a JSON object")
        self._load_state_fields(fields)
