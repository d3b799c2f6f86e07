"""The canonical instruction prompt. This is the only place a prompt is built.

Training, evaluation, prediction and serving all call :func:`format_example`, so a model is always asked
the same question it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_TASK = "You are a support ticket classifier."
DEFAULT_INPUT_NAME = "customer message"
DEFAULT_LABELS = ("billing", "technical", "account", "shipping", "other")
LABEL_SEPARATOR = ", "


def format_example(
    text: str,
    labels: Sequence[str] = DEFAULT_LABELS,
    task: str = DEFAULT_TASK,
    input_name: str = DEFAULT_INPUT_NAME,
    multi_label: bool = False,
) -> str:
    """Build the instruction prompt for one input text.

    ``task`` is the opening sentence, ``input_name`` names the input ("customer message"), and ``labels``
    is listed in order. ``multi_label`` asks for every label that applies instead of exactly one.
    """
    if not labels:
        raise ValueError("format_example needs at least one label")
    label_lines = "\n".join(f"- {label}" for label in labels)
    if multi_label:
        ask = (
            f"Given a {input_name}, output all of the following labels that apply, "
            f"comma-separated, in the order listed:"
        )
        only = "Output ONLY the labels."
    else:
        ask = f"Given a {input_name}, output exactly one of the following labels:"
        only = "Output ONLY the label."
    heading = input_name[:1].upper() + input_name[1:]
    return f"{task}\n\n{ask}\n{label_lines}\n\n{only}\n\n{heading}:\n{text.strip()}"


def format_target(label: str | Sequence[str], labels: Sequence[str] = DEFAULT_LABELS) -> str:
    """The text a model should output: the label, or for multi-label the labels in label-set order."""
    if isinstance(label, str):
        return label
    order = {name: i for i, name in enumerate(labels)}
    return LABEL_SEPARATOR.join(sorted(label, key=lambda name: order[name]))
