"""The audit side's quadrature over one segment θ_s → θ_{s+1}: h, the audited quantity's gradient
averaged over the straight segment (paper section 5.1, Remark 5.1, A.2.7), by euler, the composite
trapezoid, or adaptive halving until the segment's measured completeness error is small enough.
Pure tensor maths: ``audit_side(θ)`` evaluates (values, gradients) at a point of the segment."""

from __future__ import annotations

import torch

# The estimate of h's error (the nested rules' difference; Richardson would take a third of it)
# times this factor is what the per-entry error bound propagates: chosen so that the bound held
# for >= 99% of (example, audit point) entries against supersample:64 on the runs measured
# (docs/results.md: ≥ 99.95% on 14 runs); the median entry's bound is then 28-91x its actual error.
ERROR_BOUND_SAFETY = 10.0


def _mean(x: torch.Tensor) -> float:
    return float(x.mean())


def adaptive_quadrature(rule, a_start, a_end, theta_start, theta_end, q_change, tolerance, audit_side,
                         out=None, coarse_out=None, mean=_mean):
    """h over a segment by the composite trapezoid, halved (the new midpoints only: nothing is
    evaluated twice) until the columns' mean measured error |Δθ·h − Δq| is within ``tolerance``
    (``mean``: of every column, where a torchrun rank holds some of them: distributed.column_mean),
    or rule.sub_intervals pieces (DESIGN.md v2: both ends of q are known, so a segment's
    completeness error is measured, not estimated). Returns (h, pieces) and
    writes h − h_coarser, the difference of the last two nested rules (euler, the left end, for a
    segment the trapezoid already meets, scaled), times ERROR_BOUND_SAFETY, into ``coarse_out``:
    what bounds the error of h."""
    delta = theta_end - theta_start
    h = torch.lerp(a_start, a_end, 0.5, out=out if out is not None else torch.empty_like(a_start))
    coarse_out.copy_(h).sub_(a_start)
    pieces, interior = 1, None
    while pieces < rule.sub_intervals and not mean((delta @ h - q_change).abs()) <= tolerance:
        if interior is None:
            interior = torch.zeros_like(a_start)
        for j in range(pieces):  # the midpoints of the current pieces
            interior.add_(audit_side(theta_start + ((2 * j + 1) / (2 * pieces)) * delta)[1])
        pieces *= 2
        coarse_out.copy_(h)
        torch.add(a_start, a_end, out=h).mul_(0.5).add_(interior).div_(pieces)
        coarse_out.sub_(h).neg_()
    if pieces == 1:
        # The nested difference of a segment the trapezoid met is euler's, far larger than the
        # trapezoid's own error: scale each column to the size measured exactly along the path,
        # |Δθ·h − Δq| / |Δθ·(h − h_euler)| (at most 1), keeping the difference's direction.
        measured = (delta @ h - q_change).abs()
        along = (delta @ coarse_out).abs()
        coarse_out.mul_(torch.where(along > 0, (measured / along).clamp(max=1.0), torch.ones_like(along)))
    coarse_out.mul_(ERROR_BOUND_SAFETY)
    return h, pieces


def quadrature(sub_intervals: int, a_start, a_end, theta_start, theta_end, audit_side, out=None):
    """h over the segment: euler (0), or the composite trapezoid on `sub_intervals` pieces;
    written into ``out`` (a tensor distinct from a_start and a_end) if given."""
    if sub_intervals == 0:
        return a_start
    if out is None:
        out = torch.empty_like(a_start)
    if sub_intervals == 1:  # the trapezoid rule, in one pass over P x N*Q
        return torch.lerp(a_start, a_end, 0.5, out=out)
    h = torch.add(a_start, a_end, out=out).mul_(0.5)
    for j in range(1, sub_intervals):
        theta = theta_start + (j / sub_intervals) * (theta_end - theta_start)
        h.add_(audit_side(theta)[1])
    return h.div_(sub_intervals)
