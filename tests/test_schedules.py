"""Lambda schedules against their closed forms, and the module's lambda sequence across a
``state_dict`` save/restore."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import pytest
import torch
from reference import lsoftmax_reference, max_rel_err, segment_case

import lsoftmax.torch  # noqa: F401  (registers torch.ops.lsoftmax)
from lsoftmax.schedules import (
    Constant,
    Exponential,
    Onset,
    Scaled,
    Schedule,
    schedule_from_dict,
)
from lsoftmax.torch import LSoftmaxLinear

STEPS = (0, 1, 2, 7, 100, 1000, 12345, 10**5, 10**6)


def exponential_closed(
    it: int, base: float, gamma: float, power: float, lambda_min: float, iteration: int
) -> float:
    return max(lambda_min, base * (1.0 + gamma * (iteration + it + 1)) ** (-power))


def scaled_closed(it: int, beta: float, scale: float, beta_min: float) -> float:
    return max(beta_min, beta * scale**it)


EXPONENTIALS = [
    {},  # the paper's MNIST setting
    {"base": 1000.0, "gamma": 0.12, "power": 1.0, "lambda_min": 5.0},
    {"base": 100.0, "gamma": 1e-3, "power": 2.0, "lambda_min": 0.0, "iteration": 500},
    {"base": 1500.0, "gamma": 1e-4, "power": 0.0, "lambda_min": 0.0},
]
SCALEDS = [
    {},
    {"beta": 1000.0, "scale": 0.5, "beta_min": 3.0},
    {"beta": 2.0, "scale": 1.0, "beta_min": 0.0},
]


def _closed(schedule: Schedule, it: int) -> float:
    if isinstance(schedule, Exponential):
        return exponential_closed(
            it,
            schedule.base,
            schedule.gamma,
            schedule.power,
            schedule.lambda_min,
            schedule.iteration,
        )
    if isinstance(schedule, Scaled):
        return scaled_closed(it, schedule.beta, schedule.scale, schedule.beta_min)
    assert isinstance(schedule, Constant)
    return schedule.value_


def _all_schedules() -> list[Schedule]:
    return [
        *(Exponential(**kw) for kw in EXPONENTIALS),
        *(Scaled(**kw) for kw in SCALEDS),
        Constant(0.0),
        Constant(2.5),
    ]


@pytest.mark.parametrize("schedule", _all_schedules(), ids=repr)
def test_values_match_closed_form(schedule: Schedule) -> None:
    for it in STEPS:
        expected = _closed(schedule, it)
        got = schedule.value(it)
        assert isinstance(got, float)
        assert got == pytest.approx(expected, rel=1e-13, abs=0.0), it
        op = torch.ops.lsoftmax.schedule_lambda(torch.tensor(it), schedule.kind, schedule.params())
        assert op.dtype == torch.float64 and op.dim() == 0
        assert op.item() == got


def test_defaults_are_the_papers() -> None:
    s = Exponential()
    assert (s.base, s.gamma, s.power, s.lambda_min, s.iteration) == (1000.0, 2.5e-5, 35.0, 0.0, 0)
    assert s.value(0) == pytest.approx(1000.0 * (1.0 + 2.5e-5) ** -35.0, rel=1e-14)
    assert (Scaled().beta, Scaled().scale, Scaled().beta_min) == (100.0, 0.99, 0.0)


def test_floors_and_resume_offset() -> None:
    s = Exponential(base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0)
    assert s.value(10**6) == 5.0
    assert Scaled(beta=1000.0, scale=0.5, beta_min=3.0).value(100) == 3.0
    resumed = Exponential(iteration=300)
    for it in (0, 1, 50):
        assert resumed.value(it) == Exponential().value(300 + it)


@pytest.mark.parametrize("schedule", _all_schedules(), ids=repr)
def test_dict_round_trip(schedule: Schedule) -> None:
    d = schedule.to_dict()
    assert d["kind"] == schedule.kind
    again = schedule_from_dict(d)
    assert again == schedule
    assert [again.value(it) for it in STEPS] == [schedule.value(it) for it in STEPS]


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: Exponential(base=-1.0), ValueError, "base"),
        (lambda: Exponential(gamma=math.nan), ValueError, "gamma"),
        (lambda: Exponential(power=math.inf), ValueError, "power"),
        (lambda: Exponential(lambda_min=-0.1), ValueError, "lambda_min"),
        (lambda: Exponential(iteration=-1), ValueError, "iteration"),
        (lambda: Exponential(iteration=1.5), TypeError, "iteration"),
        (lambda: Exponential().value(-1), ValueError, "step"),
        (lambda: Scaled(beta=-1.0), ValueError, "beta"),
        (lambda: Scaled(scale=math.nan), ValueError, "scale"),
        (lambda: Scaled(beta_min=-2.0), ValueError, "beta_min"),
        (lambda: Scaled().value(-3), ValueError, "step"),
        (lambda: Constant(-1.0), ValueError, "value"),
        (lambda: Constant(math.nan), ValueError, "value"),
        (lambda: schedule_from_dict({"kind": "cosine"}), ValueError, "cosine"),
        (lambda: schedule_from_dict({"beta": 1.0}), ValueError, "kind"),
        (
            lambda: torch.ops.lsoftmax.schedule_lambda(torch.tensor(0), "cosine", []),
            ValueError,
            "cosine",
        ),
    ],
)
def test_bad_parameters_raise(make: Callable[[], object], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


# --- the module's lambda sequence ---------------------------------------------------------------


def _layer(schedule: Schedule, seed: int = 0) -> LSoftmaxLinear:
    torch.manual_seed(seed)
    return LSoftmaxLinear(5, 4, margin=3, schedule=schedule, dtype=torch.float64)


@pytest.mark.parametrize(
    "schedule",
    [Exponential(base=1000.0, gamma=0.5, power=2.0), Scaled(beta=50.0, scale=0.5, beta_min=0.5)],
    ids=["exponential", "scaled"],
)
def test_module_uses_the_schedule_sequence(schedule: Schedule) -> None:
    layer = _layer(schedule)
    x, _, y, _ = segment_case(3, per_segment=2, num_classes=4, features=5)
    assert layer.current_lambda == _closed(schedule, 0)
    for it in range(6):
        out = layer(x, y).detach()
        lam = _closed(schedule, it)
        ref = lsoftmax_reference(x, layer.weight.detach(), y, 3, lam)
        assert max_rel_err(out, ref) <= 1e-10, it
        # The neighbouring lambdas give measurably different logits, so this pins the step.
        other = lsoftmax_reference(x, layer.weight.detach(), y, 3, _closed(schedule, it + 1))
        assert max_rel_err(out, other) > 1e-6
        assert int(layer.step) == it + 1
        assert layer.current_lambda == pytest.approx(lam, rel=1e-13)


def test_state_dict_restores_the_lambda_sequence() -> None:
    schedule = Scaled(beta=50.0, scale=0.5, beta_min=0.0)
    x, _, y, _ = segment_case(4, per_segment=2, num_classes=4, features=5)
    original = _layer(schedule)
    for _ in range(3):
        original(x, y)
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)
    buf.seek(0)
    restored = _layer(schedule, seed=1)
    assert int(restored.step) == 0
    restored.load_state_dict(torch.load(buf))
    assert int(restored.step) == 3
    assert restored.current_lambda == original.current_lambda == schedule.value(2)
    for _ in range(3):
        torch.testing.assert_close(restored(x, y), original(x, y), rtol=0, atol=0)
    assert int(restored.step) == int(original.step) == 6
    assert restored.current_lambda == schedule.value(5)


# --- Onset: a schedule stated relative to the run's length -------------------------------------


def onset_closed(
    it: int, total: int, reach: float, at: float, warmup: float, base: float, lambda_min: float
) -> float:
    """Written from the definition: flat at base, then log-linear through (at * total, reach)."""
    if it < warmup * total:
        return base
    frac = (it - warmup * total) / ((at - warmup) * total)
    return max(lambda_min, math.exp(math.log(base) + frac * (math.log(reach) - math.log(base))))


ONSETS = [
    {"total_steps": 3752, "reach": 1.0, "at": 0.3, "warmup": 0.125},
    {"total_steps": 100, "reach": 5.0, "at": 0.5, "warmup": 0.0, "base": 100.0, "lambda_min": 2.0},
    {"total_steps": 7, "reach": 0.1, "at": 1.0, "warmup": 0.5},
]


@pytest.mark.parametrize("kw", ONSETS, ids=repr)
def test_onset_matches_its_definition(kw: dict) -> None:
    s = Onset(**kw)
    defaults = Onset().to_dict()
    p = {"base": defaults["base"], "lambda_min": defaults["lambda_min"], **kw}
    total, at, warmup = p["total_steps"], p["at"], p["warmup"]
    for it in (*range(total + 3), 10 * total):
        expected = onset_closed(it, total, p["reach"], at, warmup, p["base"], p["lambda_min"])
        assert s.value(it) == pytest.approx(expected, rel=1e-12, abs=0.0), it
        op = torch.ops.lsoftmax.schedule_lambda(torch.tensor(it), s.kind, s.params())
        assert op.item() == s.value(it)
    # The landmarks the parameters name: softmax through the warm-up, `reach` at `at`.
    first_after = math.ceil(warmup * total)
    assert all(s.value(it) == p["base"] for it in range(first_after))
    if (at * total).is_integer():
        assert s.value(int(at * total)) == pytest.approx(max(p["reach"], p["lambda_min"]))
    assert schedule_from_dict(s.to_dict()) == s


def test_onset_is_relative_to_the_run() -> None:
    # The same parameters put the margin at the same point of a short and a long run.
    short, long = (
        Onset(400, reach=1.0, at=0.3, warmup=0.1),
        Onset(40_000, reach=1.0, at=0.3, warmup=0.1),
    )
    for frac in (0.05, 0.2, 0.3, 0.5, 0.9):
        assert short.value(int(frac * 400)) == pytest.approx(
            long.value(int(frac * 40_000)), rel=1e-12
        )


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"total_steps": 0}, "total_steps must be >= 1"),
        ({"total_steps": 10, "reach": 0.0}, "reach must be > 0"),
        ({"total_steps": 10, "reach": 2000.0}, "reach must be > 0 and <= base"),
        ({"total_steps": 10, "at": 0.2, "warmup": 0.2}, "at must be a fraction"),
        ({"total_steps": 10, "at": 1.5}, "at must be a fraction"),
        ({"total_steps": 10, "warmup": -0.1}, "warmup must be a finite number >= 0"),
        ({"total_steps": 10, "base": math.inf}, "base must be a finite number > 0"),
        ({"total_steps": 10, "lambda_min": math.nan}, "lambda_min"),
    ],
)
def test_onset_bad_parameters_name_them(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Onset(**kw)


def test_onset_total_steps_must_be_an_int() -> None:
    with pytest.raises(TypeError, match="total_steps must be an int"):
        Onset(total_steps=10.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step"):
        Onset(10).value(-1)
