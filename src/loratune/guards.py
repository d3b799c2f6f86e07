"""Stop a run whose loss or weights stop being finite, before anything of it is saved as a checkpoint, best or final.

The Trainer's own log cannot be trusted for this: ``logging_nan_inf_filter`` replaces a NaN step loss with the
running mean, so a run whose weights are all NaN logs ordinary-looking losses. The guard therefore looks at the
real per-step loss (:class:`FiniteLossStep`, a Trainer mixin) and at the trainable weights after every optimizer
step (:class:`NonFiniteGuard`, a callback). Both run before the Trainer's log/save/evaluate of that step, so no
NaN state is ever written.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from .errors import LoratuneError

FP16_HINT = " (T5 overflows in fp16: use --set train.precision=bf16 or fp32)"


class TrainingDiverged(LoratuneError):
    """Loss or weights became NaN/inf: the weights are garbage and nothing is saved. Exit code 1: not bad input."""

    exit_code = 1


def _diverged(what: str, step: int, fp16: bool) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged: {what} at step {step}{FP16_HINT if fp16 else ''}; nothing was saved as final or best")


def first_non_finite(model) -> str | None:
    """Name of the first trainable parameter holding a NaN/inf, else None (one device sync for all of them)."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        return None
    # One fused reduction per tensor, then a single host transfer: cheap next to a training step.
    flags = torch.stack([torch.isfinite(p.detach()).all() for _, p in params]).cpu()
    bad = (~flags).nonzero()
    return params[int(bad[0])][0] if len(bad) else None


class NonFiniteGuard(TrainerCallback):
    """After every optimizer step: raise TrainingDiverged if a trainable weight is NaN/inf."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        name = first_non_finite(model) if model is not None else None
        if name is not None:
            raise _diverged(f"trainable weight {name} is not finite", state.global_step, args.fp16)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise _diverged(f"loss is {loss}", state.global_step, args.fp16)


class FiniteLossStep:
    """Trainer mixin: raise TrainingDiverged on a NaN/inf micro-batch loss, before the Trainer's log filters it."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        # The Trainer syncs on this value anyway (its NaN filter), so the check adds no device sync.
        if not torch.isfinite(loss).all():
            raise _diverged(f"loss is {float(loss.detach().float().mean())}", self.state.global_step + 1, self.args.fp16)
        return loss
