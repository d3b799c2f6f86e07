"""The Trainer's validation loss through the family's own training loss (causal: the shared prefix once per batch)."""

from __future__ import annotations

import torch


class FamilyValidationLoss:
    """Trainer mixin: loss-only evaluation (what ``loratune train`` runs) calls ``validator.family.training_loss``
    instead of the model's forward: the same value (the model's own, unweighted loss), at a fraction of the cost
    for causal LMs (no full-vocabulary logits, the shared prefix once per batch). Families without their own loss
    (None), several processes (DDP would not see the direct module calls) and prediction runs take the Trainer's.
    """

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if prediction_loss_only and self.args.world_size == 1:
            inputs = {k: v for k, v in self._prepare_inputs(inputs).items() if k != "weight"}  # unweighted, as before
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.validator.family.training_loss(model, inputs)
            if loss is not None:
                return loss.detach(), None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
