"""``train.class_weights=auto``: each training example's loss is weighted by the inverse frequency of its label.

The weight rides with the example's features through :class:`WeightedCollator` to the family's loss
(:meth:`loratune.families.common.Family.training_loss`), which then averages weight x the example's own loss.
"""

from __future__ import annotations

import torch

from .data import Splits, label_counts
from .errors import LoratuneError


def class_weights(setting: str, splits: Splits) -> dict[str, float]:
    """``train.class_weights``: for auto, n / (labels x count) per label, so each label's examples weigh the same
    in total and the weights average 1 over the training data (the loss keeps its scale); {} for none."""
    if setting != "auto":
        return {}
    if splits.multi_label:
        raise LoratuneError(
            "train.class_weights=auto needs single-label data: a multi-label example carries several labels, so no one "
            "label's frequency can weight it; set train.class_weights=none"
        )
    counts = label_counts(splits.train)
    return {label: len(splits.train) / (len(counts) * n) for label, n in sorted(counts.items())}


class WeightedCollator:
    """The family's collator, with each example's class weight (if any) carried beside the padded batch."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, features):
        if "weight" not in features[0]:
            return self.collate(features)
        batch = self.collate([{k: v for k, v in f.items() if k != "weight"} for f in features])
        batch["weight"] = torch.tensor([f["weight"] for f in features], dtype=torch.float32)
        return batch
