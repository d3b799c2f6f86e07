"""Shared-prefix label scoring and label-only losses for decoder-only (causal) LMs, over token ids.

Every causal prompt is ``prefix + suffix``: the prefix (chat header, instruction, label list) is the same for
every example and grows with the label set; the suffix (the text and the answer cue) is short. The naive scorer
re-encodes the whole prompt per example, projects every prompt position onto the vocabulary and copies the
prompt's KV cache once per label. :class:`CausalLabelScorer` instead:

* runs the prefix once and keeps its KV cache (keyed by the prefix ids; :meth:`CausalLabelScorer.invalidate`
  after the weights or adapter change). Per batch the cache is *expanded* (a view, no copy per label);
* runs each batch of suffixes and every label's tokens in **one** decoder pass: the labels are merged into a
  trie (``scoring.build_label_trie``) and the trie's internal nodes are appended after each suffix with *tree
  attention* (a node sees the prefix, its example's suffix, its ancestors and itself), at the positions the
  tokens would have if that label followed the suffix alone. Shared label prefixes are computed once;
* applies the LM head only at the positions that predict a label token (the suffix's last token and the trie
  nodes), in row chunks, keeping only the logsumexp (computed in the chunk's own storage) and the label tokens'
  logits;
* on CPU with SDPA, lets grouped-query heads attend to their shared KV heads instead of copying the (batch x
  prefix) keys and values once per query head (:func:`_grouped_query_sdpa`).

What is left grows with the label set by construction: every trie node is a proper prefix of a label whose
hidden state depends on the example, and each needs its full-vocabulary normaliser (docs/BENCHMARKS.md counts
the work per example; ``python -m benchmarks.causal_profile``).

Only the model's own modules run (``get_decoder()`` and ``get_output_embeddings()``), so LoRA layers (PEFT,
merged or not) and the configured attention implementation are used as they are. Supported: models whose
decoder accepts a 4D float attention mask, explicit ``position_ids`` and a ``DynamicCache`` of full-attention
layers; tested with Llama (the tiny fixture and SmolLM2's shape). Results equal the naive scorer's
(:func:`naive_label_logprobs`) to float rounding (tests/test_causal_scoring.py).

Training: :func:`causal_lm_loss` is the model's own causal-LM loss with the LM head applied only at label
positions; :func:`shared_prefix_lm_loss` also runs the shared prefix once per batch (graph kept). Both call the
decoder body directly, not the model's ``forward``: under DistributedDataParallel call them inside the wrapped
module's forward (DDP prepares its gradient reduction there), never on the unwrapped module.
:func:`split_shared_prefix` splits token-id prompts into that prefix and the suffixes;
:func:`shared_prefix_batch_loss` takes a collated batch of whole sequences (what training uses).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np
import torch

from .scoring import build_label_trie

IGNORE_INDEX = -100
LOGIT_CHUNK_ELEMENTS = 1 << 24
"""Rows of vocabulary logits are materialised this many floats at a time (64 MB in fp32), whatever the batch."""


def _base(model):
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_argument(decoder) -> str:
    """``cache`` in recent transformers 5 releases, ``past_key_values`` before (now a deprecated alias)."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class _SharedPrefixLayer:
    """A cache layer holding a prefix's keys/values expanded to the batch (views: no copy per row or label).

    ``update`` returns prefix + new keys/values for attention but does not keep them: each layer's concatenation
    is freed once that layer's attention ran, instead of 30 layers of (batch x prompt) KV staying alive. With
    autograd on, gradients flow back through the expansion into the one prefix computation.
    """

    is_sliding = False
    is_compileable = False
    is_initialized = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, b: int):
        self.keys, self.values = keys.expand(b, -1, -1, -1), values.expand(b, -1, -1, -1)
        self.device = keys.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


def _prefix_cache(config, prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]], b: int):
    """A DynamicCache whose layers serve the prefix KV to ``b`` rows (see :class:`_SharedPrefixLayer`)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    for i, (layer, (k, v)) in enumerate(zip(cache.layers, prefix_kv)):
        if type(layer) is not DynamicLayer:  # sliding-window layers would drop prefix tokens
            raise NotImplementedError(f"shared-prefix scoring needs full-attention cache layers, got {type(layer).__name__}")
        cache.layers[i] = _SharedPrefixLayer(k, v, b)
    return cache


def _prefix_forward(decoder, cache_name: str, config, prefix_ids: Sequence[int], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of one prefix (batch 1), with autograd history when grad is enabled."""
    from transformers import DynamicCache

    ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
    cache = DynamicCache(config=config)
    decoder(input_ids=ids, position_ids=torch.arange(len(prefix_ids), device=device)[None], use_cache=True, **{cache_name: cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def _tree_mask(lengths: torch.Tensor, width: int, node_visible: torch.Tensor | None, n_prefix: int, dtype) -> torch.Tensor:
    """(b, 1, Q, n_prefix + Q) additive mask over [prefix | right-padded suffix | trie nodes].

    Every query sees the whole prefix. Suffix tokens are causal over their row's real tokens; padding is seen by
    nothing but itself (so no query row is empty); a trie node sees its row's real suffix and ``node_visible``
    (its ancestors and itself).
    """
    dev, b = lengths.device, len(lengths)
    n_nodes = 0 if node_visible is None else len(node_visible)
    n_q = width + n_nodes
    steps = torch.arange(width, device=dev)
    real = steps[None, :] < lengths[:, None]  # (b, width)
    visible = torch.zeros(b, n_q, n_q, dtype=torch.bool, device=dev)
    causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
    visible[:, :width, :width] = (causal & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=dev)
    if n_nodes:
        visible[:, width:, :width] = real[:, None, :]
        visible[:, width:, width:] = node_visible
    mask = torch.zeros(b, 1, n_q, n_prefix + n_q, dtype=dtype, device=dev)
    mask[:, 0, :, n_prefix:].masked_fill_(~visible, torch.finfo(dtype).min)
    return mask


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """``scoring._logsumexp`` (the same operations, so the same result) computed in ``logits``' own storage: no
    second (rows x vocabulary) buffer per chunk, whose page faults cost as much as the arithmetic on a loaded CPU."""
    top = logits.amax(-1, keepdim=True)
    return logits.sub_(top).clamp_(min=-80.0).exp_().sum(-1).log_() + top.squeeze(-1)


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def _grouped_query_sdpa(config, device):
    """On CPU, let SDPA attend grouped-query heads to their shared KV heads (``enable_gqa``) instead of copying.

    transformers' SDPA path repeats each KV head for its query heads when a mask is given (``repeat_kv``): with the
    prefix KV that is a copy of (batch x prefix) keys and values per layer, ~10% of a 151-label batch on SmolLM2's
    shape. PyTorch's CPU kernel takes a mask together with ``enable_gqa`` and computes the same attention; the
    switch is transformers' own (read per call). Only a speed choice: a concurrent call that misses it copies.
    """
    kv_heads = getattr(config, "num_key_value_heads", None)
    groups = kv_heads is not None and kv_heads < getattr(config, "num_attention_heads", kv_heads)
    if device.type != "cpu" or not groups or getattr(config, "_attn_implementation", None) != "sdpa" or _FORCE_GQA in os.environ:
        yield
        return
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(_FORCE_GQA, None)


class CausalLabelScorer:
    """Summed log-probability of each label's tokens after ``prefix + suffix_i``, for a causal LM.

    ``label_ids`` are the labels' token ids as they follow the prompt, each ending with EOS (see
    ``families.causal.causal_label_ids``), so that a label is told apart from a longer label it prefixes.
    """

    def __init__(self, model, label_ids: Sequence[Sequence[int]]):
        if not label_ids or any(len(ids) == 0 for ids in label_ids):
            raise ValueError("every label needs at least one token")
        if len({tuple(ids) for ids in label_ids}) != len(label_ids):
            raise ValueError("two labels have the same token ids")
        base = _base(model)
        self.decoder = base.get_decoder()
        self.lm_head = base.get_output_embeddings()
        self.config = base.config
        self.device = next(model.parameters()).device
        self.n_labels = len(label_ids)
        # The root's token is never fed (the suffix's last token plays the root); 0 is a placeholder.
        self.trie = build_label_trie(label_ids, 0).to(self.device)
        # The vocabulary columns a score reads (label tokens), and each (label, step)'s column among them.
        self._wanted, where = torch.unique(self.trie.target[self.trie.mask.bool()], return_inverse=True)
        self._column = torch.zeros_like(self.trie.target)
        self._column[self.trie.mask.bool()] = where
        self._cache_name = _cache_argument(self.decoder)
        self._prefix: tuple[int, ...] | None = None
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def n_nodes(self) -> int:
        """Trie nodes (the root included): the positions per example whose next-token distribution is needed."""
        return len(self.trie.tokens)

    def invalidate(self) -> None:
        """Forget the cached prefix KV; call after the model's weights or active adapter change."""
        self._prefix, self._prefix_kv = None, []

    @torch.inference_mode()
    def prefix_kv(self, prefix_ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of the prefix, batch 1; computed once per distinct prefix and model state."""
        key = tuple(int(x) for x in prefix_ids)
        if key != self._prefix:
            self.invalidate()
            if key:
                self._prefix_kv = _prefix_forward(self.decoder, self._cache_name, self.config, key, self.device)
            self._prefix = key
        return self._prefix_kv

    @torch.inference_mode()
    def score_batch(self, prefix_ids: Sequence[int], suffix_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """(b, n_labels) summed label log-probs (fp32, fp64 for an fp64 model) for one batch of suffixes."""
        kv = self.prefix_kv(prefix_ids)
        n_prefix, b, dev, t = len(self._prefix), len(suffix_ids), self.device, self.trie
        lengths = torch.tensor([len(s) for s in suffix_ids], device=dev)
        if int(lengths.min()) == 0:
            raise ValueError("every suffix needs at least one token (the answer cue)")
        width = int(lengths.max())
        nodes = t.tokens[1:]  # non-root trie nodes, fed after each suffix
        n_q = width + len(nodes)

        # Inputs: [suffix (right-padded) | trie nodes]. Padding is never visible to another query.
        ids = torch.zeros(b, n_q, dtype=torch.long, device=dev)
        for i, s in enumerate(suffix_ids):
            ids[i, : len(s)] = torch.as_tensor(s, device=dev)
        ids[:, width:] = nodes
        steps = torch.arange(width, device=dev)
        # A node at depth d stands where a label's d-th token sits after this example's suffix.
        positions = torch.cat([steps.expand(b, -1), (lengths - 1)[:, None] + t.depth[1:][None]], 1) + n_prefix

        dtype = self.decoder.get_input_embeddings().weight.dtype
        mask = _tree_mask(lengths, width, t.visible[1:, 1:], n_prefix, dtype)

        extra = {self._cache_name: _prefix_cache(self.config, kv, b), "use_cache": True} if n_prefix else {"use_cache": False}
        with _grouped_query_sdpa(self.config, dev):
            hidden = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, **extra).last_hidden_state
        # Row n of each example: the hidden state that predicts the children of trie node n (root = last suffix token).
        root = hidden[torch.arange(b, device=dev), lengths - 1]
        node_hidden = torch.cat([root[:, None], hidden[:, width:]], 1)  # (b, N, H)
        return self._label_sums(node_hidden)

    def _label_sums(self, node_hidden: torch.Tensor) -> torch.Tensor:
        """Sum over each label's steps of log p(token | node), from the nodes' hidden states."""
        t = self.trie
        b, n, h = node_hidden.shape
        flat = node_hidden.reshape(b * n, h)
        rows = max(1, LOGIT_CHUNK_ELEMENTS // self.lm_head.out_features)
        log_z, picked = [], []
        for start in range(0, b * n, rows):
            logits = self.lm_head(flat[start : start + rows])
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            picked.append(logits[:, self._wanted])  # a copy: the logsumexp below overwrites the logits
            log_z.append(_logsumexp_(logits))
        log_z = torch.cat(log_z).view(b, n)
        picked = torch.cat(picked).view(b, n, len(self._wanted))
        steps = picked[:, t.node, self._column] - log_z[:, t.node]  # (b, L, W)
        return (steps * t.mask.to(steps.dtype)).sum(-1)

    def score(self, prefix_ids: Sequence[int], suffix_ids: Sequence[Sequence[int]], batch_size: int = 32, progress=None) -> np.ndarray:
        """(n, n_labels) float64 summed label log-probs for every prompt ``prefix_ids + suffix_ids[i]``.

        Suffixes are batched by length (less padding); rows come back in input order.
        """
        out = np.zeros((len(suffix_ids), self.n_labels), dtype=np.float64)
        order = sorted(range(len(suffix_ids)), key=lambda i: len(suffix_ids[i]))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            out[batch] = self.score_batch(prefix_ids, [suffix_ids[i] for i in batch]).double().cpu().numpy()
            if progress is not None:
                progress(len(batch))
        return out


def naive_label_logprobs(
    model, prompt_ids: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]], batch_size: int = 64
) -> np.ndarray:
    """Reference scorer: the full ``prompt + label`` sequence through the model for every (prompt, label) pair,
    full-vocabulary logits at every position (right-padded batches of prompts, one label at a time).

    Slow by design (tests and benchmarks only): the definition the fast scorer must match.
    """
    device = next(model.parameters()).device
    out = np.zeros((len(prompt_ids), len(label_ids)), dtype=np.float64)
    with torch.inference_mode():
        for j, label in enumerate(label_ids):
            for start in range(0, len(prompt_ids), batch_size):
                seqs = [list(p) + list(label) for p in prompt_ids[start : start + batch_size]]
                width = max(len(x) for x in seqs)
                ids = torch.tensor([x + [0] * (width - len(x)) for x in seqs], device=device)
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=device)
                logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
                for r, x in enumerate(seqs):
                    n = len(x) - len(label)  # positions n-1 .. len-2 predict the label's tokens
                    steps = logp[r, n - 1 : len(x) - 1].gather(-1, ids[r, n : len(x), None])
                    out[start + r, j] = float(steps.sum())
    return out


def causal_lm_loss(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The model's own causal-LM loss (mean cross-entropy of next-token predictions where the shifted ``labels``
    are not -100), with the LM head applied only at those positions instead of at every token.

    Calls the decoder body directly (see the module docstring about DDP).
    """
    base = _base(model)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    if weights is not None:  # class weights: per-example means, weighted (families.common.weighted_loss)
        from .families.common import weighted_token_mean

        return weighted_token_mean(torch.nn.functional.cross_entropy(logits, targets[keep], reduction="none"), keep, weights)
    return torch.nn.functional.cross_entropy(logits, targets[keep], reduction="mean")


def split_shared_prefix(prompt_ids: Sequence[Sequence[int]], min_suffix: int = 1) -> tuple[list[int], list[list[int]]]:
    """Split token-id prompts into their longest common prefix and per-prompt suffixes (each >= ``min_suffix``).

    Splitting ids (not text) keeps every prompt's tokens exactly as the tokenizer produced them.
    """
    if not prompt_ids:
        return [], []
    limit = min(len(x) for x in prompt_ids) - min_suffix
    first, n = prompt_ids[0], 0
    while n < limit and all(x[n] == first[n] for x in prompt_ids):
        n += 1
    return list(first[:n]), [list(x[n:]) for x in prompt_ids]


def shared_prefix_lm_loss(
    model,
    prefix_ids: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`causal_lm_loss` of ``prefix_ids + row`` for every row, with the prefix run once per batch.

    ``input_ids`` hold only each example's suffix (text, answer cue, target, EOS), right-padded; ``labels`` mask
    everything but the target with -100 and may not label the first suffix token. The prefix forward keeps its
    graph, so LoRA gradients flow through it once per batch instead of once per example. (Dropout inside the
    prefix, if any, is drawn once for the whole batch.)
    """
    if (labels[:, 0] != IGNORE_INDEX).any():
        raise ValueError("the first suffix token cannot be a label: the prefix's last position would predict it")
    base = _base(model)
    if prefix_ids and _checkpointing(base):
        raise ValueError("gradient checkpointing drops the prefix cache; use causal_lm_loss")
    decoder, config = base.get_decoder(), base.config
    device, (b, width) = input_ids.device, input_ids.shape
    cache_name = _cache_argument(decoder)
    n_prefix = len(prefix_ids)
    extra = {"use_cache": False}
    if n_prefix:
        kv = _prefix_forward(decoder, cache_name, config, prefix_ids, device)
        extra = {cache_name: _prefix_cache(config, kv, b), "use_cache": True}
    dtype = decoder.get_input_embeddings().weight.dtype
    if torch.is_autocast_enabled(device.type):  # bf16/fp16 training: SDPA wants the mask in the queries' dtype
        dtype = torch.get_autocast_dtype(device.type)
    mask = _tree_mask(attention_mask.sum(1), width, None, n_prefix, dtype)
    positions = (torch.arange(width, device=device) + n_prefix).expand(b, -1)
    hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions, **extra).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    if weights is not None:  # class weights: per-example means, weighted (as causal_lm_loss)
        from .families.common import weighted_token_mean

        return weighted_token_mean(torch.nn.functional.cross_entropy(logits, targets[keep], reduction="none"), keep, weights)
    return torch.nn.functional.cross_entropy(logits, targets[keep], reduction="mean")


def _checkpointing(base) -> bool:
    """Whether a forward now would run under gradient checkpointing, which drops any cache passed to a layer
    (transformers' ``GradientCheckpointingLayer``): the prefix KV would silently vanish from the suffix pass."""
    if not (base.training and torch.is_grad_enabled()):
        return False
    return any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())


def shared_prefix_batch_loss(
    model,
    prefix_ids: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`causal_lm_loss` of a right-padded batch of whole sequences (prompt + target), with ``prefix_ids`` run
    once for every row that starts with it.

    A row takes the shared path when its first ``len(prefix_ids)`` ids are the prefix and the token after them is
    still unlabelled prompt; any other row (left padding, a text whose first token merged into the prefix's last
    one) goes through :func:`causal_lm_loss` whole. The two parts' means are weighted by their label tokens, so the
    result is the mean over all the batch's label tokens, the model's own loss. Under gradient checkpointing
    (which drops caches) every row takes the plain path. With class ``weights`` (one per row) the loss is
    :func:`causal_lm_loss`'s weighted one, mean over rows of weight x row mean, and the parts are weighted by rows.
    """
    n, width = len(prefix_ids), input_ids.shape[1]
    base = _base(model)
    if n == 0 or width <= n or _checkpointing(base):
        return causal_lm_loss(model, input_ids, attention_mask, labels, weights)
    prefix = torch.as_tensor(list(prefix_ids), dtype=input_ids.dtype, device=input_ids.device)
    shared = (input_ids[:, :n] == prefix).all(1) & attention_mask[:, : n + 1].bool().all(1) & (labels[:, : n + 1] == IGNORE_INDEX).all(1)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    parts = []
    for rows, is_shared in ((shared, True), (~shared, False)):
        size = int(counts[rows].sum()) if weights is None else int(rows.sum())  # what each part's mean is over
        if size == 0:
            continue
        cut = n if is_shared else 0
        ids, mask, lab = input_ids[rows, cut:], attention_mask[rows, cut:], labels[rows, cut:]
        used = int(mask.sum(1).max())  # drop columns that are padding in every row of this part
        ids, mask, lab = ids[:, :used], mask[:, :used], lab[:, :used]
        w = None if weights is None else weights[rows]
        if is_shared:
            loss = shared_prefix_lm_loss(model, prefix_ids, ids, mask, lab, w)
        else:
            loss = causal_lm_loss(model, ids, mask, lab, w)
        parts.append((loss, size))
    if not parts:  # no label token at all: the model's own loss (NaN) rather than a made-up value
        return causal_lm_loss(model, input_ids, attention_mask, labels, weights)
    if len(parts) == 1:
        return parts[0][0]
    total = sum(t for _, t in parts)
    return sum(loss * (t / total) for loss, t in parts)
