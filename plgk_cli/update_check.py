"""The update check of a replay: each recorded update θ_t → θ_{t+1} re-derived from the per-example
gradients and the optimizer's decomposition must match the record (paper Remark 5.3: the audit
describes this run only if it does), and when it does not, the likely cause in words (a loss that
is not the task's, randomness torch does not own, a buffer changed outside the forward)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from plgk_cli.errors import UpdateCheckError
from plgk_cli.gradients import restored_rng

if TYPE_CHECKING:  # the plan is replay's; this module only reads it
    from plgk_cli.replay import ReplayPlan

ROUNDINGS_PER_UPDATE = 2
# The replayed batch loss against the recorded one, for the diagnosis (whatever the gate): the
# same sum in the same dtype agrees to a few units of its last place.
LOSS_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def relative_error(predicted: torch.Tensor, recorded: torch.Tensor, recorded_values: torch.Tensor,
                    dtype: torch.dtype) -> float:
    """‖predicted − recorded‖ / ‖recorded‖, not counting what the record's own rounding explains.

    torch's in-place update in the training dtype rounds twice per element (the scaled operand and
    the result; AdamW's factor 1 − lr·λ is itself rounded), so the recorded difference is only known
    to about two units in the last place (ulp) of the stored values. A float32 run that steps by a
    few ulp(θ) (the tail of a cosine schedule) would otherwise show its rounding, not a modelling
    error. In float64 the allowance is ~4e-16 relative to θ and changes nothing measurable.
    """
    stored = recorded_values.to(dtype).abs()
    ulp = (torch.nextafter(stored, torch.full_like(stored, torch.inf)) - stored).to(torch.float64)
    allowance = ROUNDINGS_PER_UPDATE * ulp
    excess = ((predicted - recorded).abs() - allowance).clamp_min(0).norm()
    scale = recorded.norm()
    return float(excess / scale) if scale > 0 else float(excess)


def worst_parameter(plan: ReplayPlan, predicted: torch.Tensor, recorded: torch.Tensor,
                     theta_next: torch.Tensor) -> str:
    """'<name> (1.2e-01)': the recorded parameter whose update is re-derived worst."""
    layout, dtype = plan.layout, plan.run.dtype
    errors = {name: relative_error(*parts, dtype) for name, *parts in zip(
        layout.names, *(layout.unflatten(x).values() for x in (predicted, recorded, theta_next)))}
    name = max(errors, key=lambda n: math.inf if math.isnan(errors[n]) else errors[n])
    return f"{name} ({errors[name]:.1e})"


def check_sum(plan: ReplayPlan, t: int, rounding: torch.Tensor, batch_grad: torch.Tensor) -> None:
    """The per-example gradients must add up to the batch gradient of the same forward."""
    error = float(rounding.norm() / batch_grad.norm().clamp_min(1e-300))
    if not error <= plan.max_update_error:
        raise UpdateCheckError(
            f"{plan.run.path}: update {t} -> {t + 1}: the per-example loss-term gradients, weighted as the "
            f"task says, miss the batch gradient by {error:.1e} (gate {plan.max_update_error:g}): the "
            f"training loss is not the task's Σ_m w_m ℓ_m ({plan.run.task.name}), or the task's loss "
            "terms couple the examples")


def check_forward(plan: ReplayPlan, t: int, replayed, record) -> None:
    """The replayed training forward against the record: its loss (the task's Σ w_m ℓ_m) and the
    buffers it leaves (those of step t+1)."""
    tolerance = plan.max_update_error
    if loss_differs(plan, replayed.loss, record.loss, tolerance):
        raise UpdateCheckError(
            f"{plan.run.path}: update {t} -> {t + 1}: the replayed training forward's loss {replayed.loss:.6g} "
            f"differs from the recorded {record.loss:.6g}: {loss_or_randomness(plan, t)}")
    for name, recorded in plan.buffers(t + 1).items():
        got, recorded = replayed.buffers[name], recorded.to(replayed.buffers[name].device)
        scale = float(recorded.abs().max()) if recorded.is_floating_point() and recorded.numel() else 1.0
        if got.shape != recorded.shape or (recorded.numel() and float(
                (got.to(recorded.dtype) - recorded).abs().max()) > tolerance * max(scale, 1e-12)):
            raise UpdateCheckError(
                f"{plan.run.path}: buffer {name!r} of step {t + 1} is not what the replayed training forward "
                f"of update {t} -> {t + 1} makes of step {t}'s: the buffer changed outside the model's "
                "forward; change it inside forward() or make it a parameter, and re-train")


def loss_or_randomness(plan: ReplayPlan, t: int) -> str:
    """Why a replayed training forward misses the record: randomness torch does not own, or a loss
    that is not the task's weighted sum of per-example terms."""
    flat, record = plan.trajectory.flat(t), plan.trajectory.flat(t + 1).checkpoint
    batch = record.batch.to(plan.device)
    model, theta = plan.gradients.model, flat.theta.to(plan.compute)
    outputs, was_training = [], model.training
    model.train()
    for _ in range(2):
        state = {**plan.layout.unflatten(theta), **{n: b.clone() for n, b in plan.buffers(t).items()}}
        with torch.no_grad(), restored_rng(record.rng, plan.device):
            outputs.append(torch.func.functional_call(model, state, (plan.x_train[batch],)))
    model.train(was_training)
    if not torch.equal(outputs[0], outputs[1]):
        return ("the model's forward does not repeat from torch's generator states: it draws random "
                "numbers elsewhere (numpy, Python's random); draw them with torch")
    loss = float(plan.run.task.batch_loss(outputs[0], plan.y_train[batch]))
    if loss_differs(plan, loss, record.loss, LOSS_TOLERANCE[plan.compute]):
        return (f"the recorded loss {record.loss:.6g} is not the task's weighted sum of per-example loss "
                f"terms Σ w_m ℓ_m = {loss:.6g} ({plan.run.task.name}); train with the task's loss")
    return ""


def loss_differs(plan: ReplayPlan, replayed: float, recorded: float | None, tolerance: float) -> bool:
    return recorded is not None and abs(replayed - recorded) > tolerance * max(abs(recorded), 1e-12)


def diagnose(plan: ReplayPlan, t: int) -> str:
    """The likely cause of a failed update check at update t -> t+1, in words."""
    reason = loss_or_randomness(plan, t)
    return reason or ("the loss and the forward match the record, so the gradients the optimizer used "
                      "were not the loss's (gradients not zeroed, changed by hand, or the optimizer's "
                      "state or options changed)")
