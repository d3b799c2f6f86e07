"""The canonical instruction prompt and :class:`PromptSpec`, the one owner of what a model reads.

Training, evaluation, prediction, serving and ``inspect`` all go through a ``PromptSpec``: the instruction, the
label list, the chat template or answer cue, and the token budget. So a model is always asked the same question
it was trained on, and ``inspect`` measures exactly what the model is fed.

The budget never cuts the instruction, the label list or the answer cue: only the input text is cut, in its
middle (head and tail kept around a visible marker), and every cut is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from .errors import LoratuneError

DEFAULT_TASK = "You are a support ticket classifier."
DEFAULT_INPUT_NAME = "customer message"
DEFAULT_LABELS = ("billing", "technical", "account", "shipping", "other")
LABEL_SEPARATOR = ", "
ANSWER_CUE = "\n\nLabel:\n"
"""Appended to the prompt of a causal LM without a chat template, so the model knows where its answer starts.
It ends in a newline: byte-level BPEs never merge across one, so a label tokenized alone gets the same ids as in
running text."""
CUT_MARKER = " [...] "
"""Stands where the middle of an over-long input text was cut."""
MIN_TEXT_TOKENS = 16
"""Below this many tokens left for the text, a prompt is refused instead of cut to nothing."""
MAX_SCORED_LABELS = 10
"""Multi-label score mode scores 2^L - 1 label sets per text: 1,023 at this limit."""
DEFAULT_MAX_LENGTH = 512
"""The prompt budget for models without a position table (T5's relative positions)."""


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
        ask = f"Given a {input_name}, output all of the following labels that apply, comma-separated, in the order listed:"
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


def label_sets(n_labels: int) -> list[tuple[int, ...]]:
    """Every non-empty set of label indices, each in label-set order: the answers a multi-label model can give."""
    if n_labels > MAX_SCORED_LABELS:
        raise LoratuneError(
            f"multi-label score mode scores all 2^L - 1 label sets and allows at most {MAX_SCORED_LABELS} labels "
            f"(this model has {n_labels}); use --mode generate"
        )
    return [tuple(i for i in range(n_labels) if mask >> i & 1) for mask in range(1, 2**n_labels)]


@dataclass(frozen=True)
class Budgeted:
    """Token ids of rendered prompts after the budget, and how many text tokens each row lost (0: uncut)."""

    ids: list[list[int]]
    cut: list[int]

    @property
    def n_cut(self) -> int:
        return sum(c > 0 for c in self.cut)


@dataclass(frozen=True)
class PromptSpec:
    """Everything a model reads besides the input text, and the token budget. Frozen: shared safely."""

    labels: tuple[str, ...]
    task: str = DEFAULT_TASK
    input_name: str = DEFAULT_INPUT_NAME
    multi_label: bool = False
    max_length: int = DEFAULT_MAX_LENGTH
    """Most tokens of the whole rendered prompt (special tokens included)."""
    chat_template: bool = False
    """Causal LMs: the prompt is the user turn of the tokenizer's chat template (with the assistant header)."""
    answer_cue: str = ""
    """Appended after the prompt (causal LMs without a chat template: :data:`ANSWER_CUE`)."""
    input_only: bool = False
    """The model reads the input text alone (encoders: the classification head carries the labels)."""
    max_target_length: int = 32
    pooling: str | None = None
    """Encoders: ``mean`` when the head reads the L2-normalised mean of the last hidden states; None: the
    model's own head. Older adapters have none: they were trained with their model's head."""
    fields: dict = field(default_factory=dict, compare=False, hash=False)
    """Data field names the adapter was trained with (text_field, label_field, id_field), for reuse."""

    def __post_init__(self):
        object.__setattr__(self, "labels", tuple(self.labels))
        if not self.labels:
            raise LoratuneError("the label set is empty")
        if self.max_length < 1:
            raise LoratuneError(f"data.max_length must be positive, got {self.max_length}")

    def format(self, text: str) -> str:
        """The canonical prompt for ``text`` (the text alone for ``input_only``), before any chat template."""
        if self.input_only:
            return text.strip()
        return format_example(text, self.labels, self.task, self.input_name, self.multi_label)

    def render(self, text: str, tokenizer=None) -> str:
        """The whole string the model reads: the prompt in its chat template (needs ``tokenizer``), or + cue."""
        prompt = self.format(text)
        if self.chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return prompt + self.answer_cue

    def target(self, label: str | Sequence[str]) -> str:
        """What the model should answer for ``label`` (multi-label: the labels in label-set order)."""
        return format_target(label, self.labels)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["labels"] = list(self.labels)
        out["template_example"] = self.format("{text}")
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PromptSpec:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def encode(self, tokenizer, texts: Sequence[str], add_special_tokens: bool = True) -> Budgeted:
        """Token ids of each rendered prompt, within ``max_length``; only the input text is ever cut.

        Prompts that fit are tokenized as one string (exactly what the model always read). A longer one keeps
        every token outside its text (instruction, labels, cue, special tokens) and the head and tail of the
        text around :data:`CUT_MARKER`.
        """
        rendered = [self.render(t, tokenizer) for t in texts]
        ids = tokenizer(rendered, add_special_tokens=add_special_tokens)["input_ids"]
        cut = [0] * len(ids)
        long_rows = [i for i, x in enumerate(ids) if len(x) > self.max_length]
        if long_rows:
            marker = tokenizer(CUT_MARKER, add_special_tokens=False)["input_ids"]
            enc = tokenizer([rendered[i] for i in long_rows], add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            for row, i in enumerate(long_rows):
                start, end = self._text_span(rendered[i], texts[i], tokenizer)
                ids[i], cut[i] = self._cut(enc["input_ids"][row], enc["offset_mapping"][row], start, end, marker)
        return Budgeted(ids, cut)

    def _text_span(self, rendered: str, text: str, tokenizer) -> tuple[int, int]:
        """Character span of the input text inside the rendered prompt (the text is the prompt's last part)."""
        stripped = text.strip()
        prompt = self.format(text)
        offset = rendered.find(prompt) if self.chat_template else 0
        if offset < 0:
            offset = rendered.rfind(stripped) - (len(prompt) - len(stripped))
        start = offset + len(prompt) - len(stripped)
        return start, start + len(stripped)

    def _cut(self, ids: list[int], offsets, start: int, end: int, marker: list[int]) -> tuple[list[int], int]:
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        fixed = len(ids) - len(inside)
        room = self.max_length - fixed - len(marker)
        if room < MIN_TEXT_TOKENS or not inside:
            raise self.too_long(fixed)
        first, last = inside[0], inside[-1]
        head = room - room // 2
        text_ids = ids[first : last + 1]
        kept = text_ids[:head] + marker + text_ids[len(text_ids) - (room - head) :]
        return ids[:first] + kept + ids[last + 1 :], len(text_ids) - room

    def too_long(self, fixed: int) -> LoratuneError:
        """The error for a prompt whose fixed part (all but the text) leaves no room for the text."""
        what = "the input text's framing" if self.input_only else f"the instruction and the {len(self.labels)} label names"
        return LoratuneError(
            f"{what} take {fixed} tokens, leaving fewer than {MIN_TEXT_TOKENS} of data.max_length="
            f"{self.max_length} for the text; raise it where the model allows (--set data.max_length="
            f"{fixed + 256}; T5 has no fixed limit), use shorter label names, or the encoder family (--model with an "
            f"encoder such as MiniLM reads the text alone)"
        )

    def fixed_length(self, tokenizer, add_special_tokens: bool = True) -> int:
        """Tokens of the prompt without its text: the part every example pays for."""
        return len(tokenizer([self.render("", tokenizer)], add_special_tokens=add_special_tokens)["input_ids"][0])
