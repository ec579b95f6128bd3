"""The divergence guard on its own: cadence, pending checks, the first divergence kept, its state."""

from __future__ import annotations

import math

import pytest
import torch

from optimlab.divergence import LOSS_OR_GRADIENT, DivergenceGuard, all_finite, finite_rows, norm_rows, total_norm, total_sum

OK, BAD = torch.tensor(1.0), torch.tensor(math.nan)


def test_every_step_catches_the_bad_step_itself() -> None:
    guard = DivergenceGuard(1)
    assert [guard.check(v, s) for s, v in enumerate([OK, OK, BAD, OK])] == [False, False, True, True]
    assert (guard.step, guard.reason) == (2, "non-finite loss or gradient")


def test_values_wait_for_the_cadence_and_are_read_together() -> None:
    guard = DivergenceGuard(4)
    assert not guard.check(BAD, 0) and not guard.check(OK, 1) and not guard.check(OK, 2)
    assert not guard.diverged  # nothing read yet: no host sync on steps 0-2
    assert guard.check(OK, 3) and guard.step == 3


def test_now_reads_early_and_flush_reads_the_rest() -> None:
    guard = DivergenceGuard(10)
    assert not guard.check(OK, 0)
    assert guard.check(torch.tensor(math.inf), 1, now=True) and guard.step == 1
    other = DivergenceGuard(10)
    other.check(BAD, 0)
    assert other.flush(5) and (other.step, other.reason) == (5, LOSS_OR_GRADIENT)


def test_the_first_divergence_is_kept() -> None:
    guard = DivergenceGuard(1)
    guard.record(7, "first")
    guard.record(9, "second")
    assert (guard.step, guard.reason) == (7, "first")


@pytest.mark.parametrize("device, every", [("cpu", 1), ("cuda", 10), ("mps", 10)])
def test_default_cadence_depends_on_the_device(device: str, every: int) -> None:
    guard = DivergenceGuard()
    guard.resolve(torch.device(device))
    assert guard.every == every
    given = DivergenceGuard(3)
    given.resolve(torch.device(device))
    assert given.every == 3


def test_state_round_trip() -> None:
    guard = DivergenceGuard(1)
    guard.check(BAD, 4)
    fresh = DivergenceGuard(1)
    fresh.load_state_dict(guard.state_dict())
    assert (fresh.step, fresh.reason) == (4, guard.reason)


@pytest.mark.parametrize("every", [0, -1, 2.5, "1", True])
def test_bad_cadence_is_refused(every: object) -> None:
    with pytest.raises(ValueError, match="every"):
        DivergenceGuard(every)  # type: ignore[arg-type]


def test_sums_and_norms() -> None:
    big = [torch.full((3,), 1e20), torch.ones(2)]
    assert math.isfinite(total_norm(big).item())  # float32's squared norm would overflow
    assert total_norm([torch.tensor([3.0]), torch.tensor([4.0])]).item() == 5.0
    assert not math.isfinite(total_sum([torch.ones(2), torch.tensor([math.nan])]).item())


def test_row_norms_are_each_rows_total_norm() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 2, 2, generator=g)
    a[1] *= 1e20  # float32's squared norm would overflow
    rows = norm_rows(a, b)
    assert rows.dtype == torch.float64 and rows.shape == (3,)
    for i in range(3):
        assert rows[i].item() == pytest.approx(total_norm([a[i], b[i]]).item(), rel=1e-15)
    assert norm_rows(torch.tensor([[3.0], [0.0]]), torch.tensor([[4.0], [1.0]])).tolist() == [5.0, 1.0]


def test_huge_finite_weights_are_finite() -> None:
    """Weights near 1e307 are finite, though their norm (and float32's near 1e19) overflows."""
    huge = [torch.full((4,), 1e307, dtype=torch.float64), torch.full((2,), 3e38)]
    assert all_finite(huge) and not math.isfinite(torch.linalg.vector_norm(huge[0]).item())
    for bad in (math.inf, -math.inf, math.nan):
        assert not all_finite([torch.ones(3), torch.tensor([1.0, bad])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("size", [1, 7, 1000, 100_003])
def test_finite_rows_finds_any_non_finite_element(dtype: torch.dtype, size: int) -> None:
    generator = torch.Generator().manual_seed(size)
    for bad in (math.nan, math.inf, -math.inf):
        for position in (0, size // 2, size - 1):
            rows = torch.randn(3, size, generator=generator).to(dtype) * 1e30
            rows[1, position] = bad
            assert finite_rows(rows).tolist() == [True, False, True] == rows.isfinite().all(1).tolist()
            assert finite_rows(rows.view(3, 1, size)).tolist() == [True, False, True]
    assert finite_rows(torch.empty(2, 0)).tolist() == [True, True]
    assert finite_rows(torch.ones(3, 2), torch.tensor([[1.0], [math.nan], [2.0]])).tolist() == [True, False, True]
