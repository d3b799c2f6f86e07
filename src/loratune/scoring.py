"""Fast rank-classification scoring for T5-style encoder-decoders: every label's log-likelihood in one decoder pass.

The naive way (``predict.seq2seq_label_logprobs_reference``) copies each prompt's encoder output once per label,
runs the decoder on every (prompt, label) pair, projects every position onto the 32k vocabulary and recomputes
the cross-attention keys/values once per label. Here, per batch of prompts:

* the encoder runs once;
* the labels' token sequences are merged into a prefix tree (trie). Decoder inputs are the trie's *internal*
  nodes (the start token, then every proper prefix of a label), so the first decoder step and any shared
  label prefix are computed once per prompt, not once per label;
* all nodes of one prompt go through the decoder together with *tree attention*: a node attends to itself and
  its ancestors only, with T5's relative position bias taken from the node depths. That is exactly what the
  decoder sees when it reads one label left to right, so the scores match the naive ones (to float rounding);
* the cross-attention keys/values are therefore computed once per prompt and layer;
* the vocabulary projection and its logsumexp run only at trie nodes, and only the label tokens' logits are
  gathered from it.

The decoder blocks are the model's own modules (``T5Block``) called with an explicit mask and position bias, so
LoRA layers, merged or not, and the configured attention implementation are used as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .t5_fused import decode, encode, fused_t5


@dataclass(frozen=True)
class LabelTrie:
    """The labels' token sequences as a prefix tree, flattened into decoder positions (parents before children)."""

    tokens: torch.Tensor
    """(N,) decoder input token of each internal node: the start token for the root, else the prefix's last token."""
    depth: torch.Tensor
    """(N,) position of each node in its label's decoder input (root = 0)."""
    visible: torch.Tensor
    """(N, N) bool: node i may attend to node j (j is i or an ancestor of i)."""
    node: torch.Tensor
    """(L, W) the node whose output predicts step t of label l (padded with 0)."""
    target: torch.Tensor
    """(L, W) the token label l has at step t (padded with 0)."""
    mask: torch.Tensor
    """(L, W) float: 1 where step t exists for label l."""

    def to(self, device) -> LabelTrie:
        return LabelTrie(*(getattr(self, f.name).to(device) for f in fields(self)))


def build_label_trie(label_ids: Sequence[Sequence[int]], start_token_id: int) -> LabelTrie:
    """Merge label token sequences (each ending with EOS) into a trie of decoder inputs."""
    index: dict[tuple[int, ...], int] = {(): 0}
    tokens, depth, parent = [start_token_id], [0], [-1]
    width = max(len(ids) for ids in label_ids)
    node = torch.zeros(len(label_ids), width, dtype=torch.long)
    target = torch.zeros(len(label_ids), width, dtype=torch.long)
    mask = torch.zeros(len(label_ids), width)
    for j, ids in enumerate(label_ids):
        for t, token in enumerate(ids):
            prefix = tuple(ids[:t])
            if prefix not in index:  # its parent prefix ids[:t-1] was added at step t-1, so parents come first
                index[prefix] = len(tokens)
                tokens.append(prefix[-1])
                depth.append(t)
                parent.append(index[prefix[:-1]])
            node[j, t], target[j, t], mask[j, t] = index[prefix], token, 1.0
    n = len(tokens)
    visible = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if parent[i] >= 0:
            visible[i] = visible[parent[i]]
        visible[i, i] = True
    return LabelTrie(torch.tensor(tokens), torch.tensor(depth), visible, node, target, mask)


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, 12x faster than torch.logsumexp on a 32k vocabulary on CPU.

    Terms more than 80 below the max are raised to max - 80: that adds under V * e^-80 to a sum >= 1, below
    fp32 and fp64 resolution, and keeps exp out of denormals (random-weight logits span ~120).
    """
    top = logits.amax(-1, keepdim=True)
    return (logits - top).clamp_(min=-80.0).exp_().sum(-1).log_() + top.squeeze(-1)


def supports_fast_scoring(model) -> bool:
    """True for T5-family models (T5, mT5, flan-t5; with or without PEFT), whose decoder we can drive directly."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    blocks = getattr(decoder, "block", None)
    if not blocks or not getattr(model.config, "is_encoder_decoder", False):
        return False
    first = blocks[0].layer[0]
    return hasattr(first, "SelfAttention") and getattr(first.SelfAttention, "has_relative_attention_bias", False)


class T5LabelScorer:
    """Summed log-probability of each label given each prompt, for a T5-style model (see the module docstring)."""

    def __init__(self, model, label_ids: Sequence[Sequence[int]]):
        self.encoder = model.get_encoder()
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        config = model.config
        self.scale = config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", False) else None
        self.trie = build_label_trie(label_ids, config.decoder_start_token_id).to(next(model.parameters()).device)
        # Plain or int8 Linear layers in eval mode: the fused kernels of t5_fused (same scores, less time). fp16
        # keeps transformers' modules, whose T5 clamps fp16 activations that would overflow (fp32/bf16 need not).
        fp16 = model.get_input_embeddings().weight.dtype == torch.float16
        self.fused = None if model.training or fp16 else fused_t5(model)
        self._masks: dict = {}

    @property
    def n_nodes(self) -> int:
        return len(self.trie.tokens)

    def _self_attention_bias(self, dtype) -> torch.Tensor:
        """(1, H, N, N): T5's relative position bias between node depths (as if each label were read alone)."""
        attn = self.decoder.block[0].layer[0].SelfAttention
        relative = self.trie.depth[None, :] - self.trie.depth[:, None]  # key depth - query depth, as T5 counts
        buckets = attn._relative_position_bucket(
            relative,
            bidirectional=False,
            num_buckets=attn.relative_attention_num_buckets,
            max_distance=attn.relative_attention_max_distance,
        )
        return attn.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0).to(dtype)

    def _tree_mask(self, dtype) -> torch.Tensor:
        """(1, 1, N, N) additive mask: 0 where a node sees an ancestor or itself, else the dtype's minimum."""
        zeros = torch.zeros(self.trie.visible.shape, dtype=dtype, device=self.trie.visible.device)
        return zeros.masked_fill(~self.trie.visible, torch.finfo(dtype).min)[None, None]

    def _self_mask(self, dtype) -> torch.Tensor:
        """Tree mask plus position bias, built once per scorer and dtype (the fused path adds them itself)."""
        if dtype not in self._masks:
            self._masks[dtype] = self._self_attention_bias(dtype) + self._tree_mask(dtype)
        return self._masks[dtype]

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) label log-likelihoods (fp32, or fp64 for an fp64 model) for a padded batch of prompts."""
        if self.fused is not None:
            encoded = encode(self.fused, self.encoder, input_ids, attention_mask)
            dtype = encoded[0].dtype
            cross_mask = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
            hidden = decode(self.fused, self.decoder, self.trie.tokens, self._self_mask(dtype), encoded, cross_mask)
            return self._label_scores(hidden)
        encoded = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        dtype, b = encoded.dtype, encoded.shape[0]
        n_heads = self.decoder.block[0].layer[0].SelfAttention.n_heads
        self_bias = self._self_attention_bias(dtype)
        tree_mask = self._tree_mask(dtype)
        cross_mask = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        # Cross-attention has no position bias; passing zeros stops every layer from allocating its own.
        cross_bias = torch.zeros(1, n_heads, 1, 1, dtype=dtype, device=encoded.device)

        # Every prompt's decoder input is the same node sequence; only the cross-attention differs.
        hidden = self.decoder.dropout(self.decoder.embed_tokens(self.trie.tokens)).expand(b, -1, -1)
        for block in self.decoder.block:
            hidden = block(hidden, tree_mask, self_bias, encoded, cross_mask, cross_bias)[0]
        return self._label_scores(self.decoder.dropout(self.decoder.final_layer_norm(hidden)))

    def _label_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L) from the decoder's final hidden state at the trie nodes: vocabulary projection, logsumexp."""
        if self.scale is not None:
            hidden = hidden * self.scale
        # (B, N, V): only the trie's nodes are projected. bf16/fp16 logits are summed in fp32 (fp64 stays fp64).
        logits = self.lm_head(hidden)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        t = self.trie
        log_z = _logsumexp(logits)  # (B, N)
        picked = logits[:, t.node, t.target] - log_z[:, t.node]  # (B, L, W)
        return (picked * t.mask).sum(-1)
