"""Silence the library messages that loading a loratune model makes although nothing is wrong, and only those.

- transformers' "LOAD REPORT" listing an encoder's classification head as MISSING ("newly initialized"): loratune
  gives the base a new head on purpose (seeded), and an adapter restores its trained head right after. A report
  that names anything else (a missing pooler, mismatched shapes, unexpected keys) still shows.
- transformers' "The tied weights mapping ... specifies to tie shared.weight to lm_head.weight, but both are
  present in the checkpoints with different values": T5 v1.1 checkpoints (flan-t5) have their own LM head, which
  transformers 5 still maps as tied to the embeddings; it then keeps the two apart, which is right, and warns.
- PEFT reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning on every
  adapter load; that one warning, by its message.

The CLI additionally lowers library verbosity (console.quiet_libraries); the Python API keeps the caller's settings.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence

HEAD_MODULES = ("classifier", "score")
"""Where a sequence-classification head lives; PEFT's SEQ_CLS adapters train and save these modules in full."""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOADER_LOGGER = "transformers.modeling_utils"


def head_only_report(message: str, head: Sequence[str] = HEAD_MODULES) -> bool:
    """Whether ``message`` is a transformers load report whose only entries are MISSING keys of the ``head``."""
    if "LOAD REPORT" not in message:
        return False
    table = _ANSI.sub("", message).split("Notes:")[0].splitlines()[1:]
    rows = [[cell.strip() for cell in line.split("|")] for line in table if "|" in line]
    rows = [row for row in rows if len(row) >= 2 and row[0] and row[0] != "Key"]
    return bool(rows) and all(status == "MISSING" and key.split(".")[0] in head for key, status, *_ in rows)


UNTIED_T5_HEAD = "specifies to tie shared.weight to lm_head.weight, but both are present in the checkpoints with different values"


class _Drop(logging.Filter):
    def __init__(self, expected: Callable[[str], bool]):
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.expected(record.getMessage())


@contextlib.contextmanager
def _dropping(expected: Callable[[str], bool]) -> Iterator[None]:
    log = logging.getLogger(_LOADER_LOGGER)
    dropper = _Drop(expected)
    log.addFilter(dropper)
    try:
        yield
    finally:
        log.removeFilter(dropper)


def expected_new_head(head: Sequence[str] = HEAD_MODULES):
    """While loading a base model that gets a new classification head: no report about that head."""
    return _dropping(lambda message: head_only_report(message, head))


def expected_untied_t5_head():
    """While loading a T5-family model: no warning that its own LM head is not tied to the embeddings."""
    return _dropping(lambda message: UNTIED_T5_HEAD in message)


@contextlib.contextmanager
def peft_wrap() -> Iterator[None]:
    """While PEFT wraps or loads into a model: no FutureWarning about ``is_gradient_checkpointing``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        yield
