"""Fused T5 forward passes for the label scorer: the same arithmetic as transformers' modules, fewer kernels.

Used by :class:`loratune.scoring.T5LabelScorer` when every projection of the model is a plain ``nn.Linear`` (a
merged or stock model, any float dtype) or a dynamic int8 one (``--quantize int8``); PEFT's unmerged LoRA layers
and anything else keep the module path. Per batch of prompts it saves, against calling the model's modules:

* one projection per attention for q, k and v together, and one for the gated feed-forward's two inputs: the
  weights are concatenated along their output rows (int8: per-row scales that equal each part's own per-tensor
  scale, so the int8 arithmetic is the same as the separate layers'; the activations are quantized once per
  fused call instead of once per part);
* the cross-attention keys and values of all decoder layers in one projection of the encoder output;
* the encoder's position bias merged with its padding mask once, not in each layer;
* in float models, the gated tanh-GELU as ``x * sigmoid(2u) * gate`` in place (``0.5 (1 + tanh u) = sigmoid(2u)``),
  faster than torch's tanh-GELU kernel plus the gate's multiply on the CPU (the same values to fp32 rounding).

The fused weights are built once per model and kept until one of its weights changes (see :func:`fused_t5`).
Scores equal the module path's to float rounding, and int8 ones exactly (tests/test_scoring.py).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GELU_TANH = math.sqrt(2.0 / math.pi)


def _dynamic_linear_type():
    return getattr(getattr(getattr(getattr(torch.ao, "nn", None), "quantized", None), "dynamic", None), "Linear", None)


class Projection:
    """Several bias-free linear layers on the same input as one matmul (outputs concatenated)."""

    def __init__(self, modules):
        dynamic = _dynamic_linear_type()
        if all(type(m) is torch.nn.Linear and m.bias is None for m in modules):
            self.weight = torch.cat([m.weight.detach() for m in modules]) if len(modules) > 1 else modules[0].weight.detach()
            self.packed = None
        elif dynamic is not None and all(type(m) is dynamic for m in modules):
            self.weight, self.packed = None, _pack_int8(modules)
        else:
            raise TypeError("not fusable")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight)
        return torch.ops.quantized.linear_dynamic(x, self.packed, reduce_range=True).to(x.dtype)


def _pack_int8(modules):
    """One int8 weight with a scale per output row: each part's rows keep that part's own scale(s)."""
    from .quantize import int8_engine

    parts = [m._weight_bias() for m in modules]
    if any(b is not None for _, b in parts):
        raise TypeError("not fusable")
    if len(parts) == 1:
        return modules[0]._packed_params._packed_params
    ints, scales = [], []
    for w, _ in parts:
        ints.append(w.int_repr())
        if w.qscheme() in (torch.per_tensor_symmetric, torch.per_tensor_affine):
            if w.q_zero_point() != 0:
                raise TypeError("not fusable")
            scales.append(torch.full((w.shape[0],), w.q_scale(), dtype=torch.double))
        else:
            if bool((w.q_per_channel_zero_points() != 0).any()):
                raise TypeError("not fusable")
            scales.append(w.q_per_channel_scales().double())
    scale = torch.cat(scales)
    weight = torch._make_per_channel_quantized_tensor(torch.cat(ints), scale, torch.zeros(len(scale), dtype=torch.long), 0)
    engine = torch.backends.quantized.engine
    try:  # packed for the engine quantize_int8 packed the separate layers with
        torch.backends.quantized.engine = int8_engine()
        return torch.ops.quantized.linear_prepack(weight, None)
    finally:
        torch.backends.quantized.engine = engine


class FusedT5:
    """The fused projections of one T5 model (see the module docstring); raises TypeError when not applicable."""

    def __init__(self, model):
        encoder, decoder = model.get_encoder(), model.get_decoder()
        self.enc = [_layer(block, cross=False) for block in encoder.block]
        self.dec = [_layer(block, cross=True) for block in decoder.block]
        cross = [block.layer[1].EncDecAttention for block in decoder.block]
        self.cross_kv = Projection([m for a in cross for m in (a.k, a.v)])
        first = encoder.block[0].layer[0].SelfAttention
        self.n_heads, self.d_kv = first.n_heads, first.key_value_proj_dim
        # int8 keeps torch's GELU kernel: its rounding feeds the next layer's activation quantization, and with
        # the same kernel the fused int8 path is bit-identical to the module path.
        floats = self.cross_kv.packed is None
        self.act = _gated_gelu if floats and _is_tanh_gelu(encoder.block[0].layer[-1].DenseReluDense) else None
        # Float models: each cross-attention's key and value weights by head, (H, d, D), for absorbed attention.
        shape = (self.n_heads, self.d_kv, -1)
        self.cross_w = [(a.k.weight.detach().view(shape), a.v.weight.detach().view(shape)) for a in cross] if floats else None


def _layer(block, cross: bool) -> dict:
    attn = block.layer[0].SelfAttention
    ff = block.layer[-1].DenseReluDense
    if not hasattr(ff, "wi_0"):
        raise TypeError("not fusable")
    out = {"qkv": Projection([attn.q, attn.k, attn.v]), "o": Projection([attn.o])}
    out |= {"wi": Projection([ff.wi_0, ff.wi_1]), "wo": Projection([ff.wo]), "act": ff.act}
    if cross:
        out |= {"cq": Projection([block.layer[1].EncDecAttention.q]), "co": Projection([block.layer[1].EncDecAttention.o])}
    return out


def _is_tanh_gelu(ff) -> bool:
    act = ff.act
    if isinstance(act, torch.nn.GELU):
        return act.approximate == "tanh"
    return type(act).__name__ in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation")


def _gated_gelu(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x) * gate = x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) * gate, in place on a new buffer."""
    u = x * x
    u.mul_(2 * _GELU_TANH * 0.044715).add_(2 * _GELU_TANH).mul_(x).sigmoid_()
    return u.mul_(x).mul_(gate)


def _fingerprint(model) -> tuple:
    """Changes when any weight the fused copies were made from changes (in place or replaced)."""
    out, dynamic = [], _dynamic_linear_type()
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            w = m.weight  # a .to(dtype/device) or a .data swap keeps the id and version: the storage tells
            out.append((id(w), w._version, w.data_ptr(), w.dtype, w.device))
        elif dynamic is not None and type(m) is dynamic:
            out.append(id(m._packed_params._packed_params))
    return tuple(out)


def fused_t5(model) -> FusedT5 | None:
    """The model's fused projections (built once, rebuilt after a weight change), or None if not applicable."""
    key = _fingerprint(model)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        with torch.inference_mode():
            fused = FusedT5(model)
    except (TypeError, AttributeError, IndexError):
        fused = None
    _CACHE[model] = (key, fused)
    return fused


def _split_heads(x: torch.Tensor, n_heads: int, d_kv: int) -> torch.Tensor:
    return x.view(*x.shape[:-1], n_heads, d_kv).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-3, -2).flatten(-2)


def _gated(layer: dict, act, x: torch.Tensor) -> torch.Tensor:
    gate_in = layer["wi"](x)
    half = gate_in.shape[-1] // 2
    if act is not None:
        return layer["wo"](act(gate_in[..., :half], gate_in[..., half:]))
    return layer["wo"](layer["act"](gate_in[..., :half]) * gate_in[..., half:])


def _unpack(x: torch.Tensor, keep: torch.Tensor | None, b: int, t: int) -> torch.Tensor:
    """(B, T, C) from the real tokens' rows ``x`` (M, C), zeros at padding; ``keep`` None: ``x`` is (B, T, C)."""
    if keep is None:
        return x
    return x.new_zeros(b * t, x.shape[-1]).index_copy_(0, keep, x).view(b, t, -1)


def encode(fused: FusedT5, encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The encoder's last hidden state, as ``encoder(input_ids, attention_mask).last_hidden_state``, packed:
    ``(hidden, keep)`` with ``hidden`` (M, D) at the real tokens ``keep`` (indices into B x T), or (B, T, D)
    with ``keep`` None. Float models skip the padding in every projection and norm (attention still sees
    (B, T)); int8 ones keep it, as the module path does, since padding rows take part in the per-tensor
    activation scales."""
    b, t = input_ids.shape
    keep = None
    if fused.act is not None and not bool(attention_mask.all()):
        keep = attention_mask.reshape(-1).nonzero().squeeze(1)
        hidden = encoder.embed_tokens(input_ids.reshape(-1)[keep])
    else:
        hidden = encoder.embed_tokens(input_ids)
    attn0 = encoder.block[0].layer[0].SelfAttention
    bias = attn0.compute_bias(t, t, device=hidden.device).to(hidden.dtype)  # (1, H, T, T)
    mask = torch.where(attention_mask[:, None, None, :].bool(), bias, torch.finfo(hidden.dtype).min)
    h, d = fused.n_heads, fused.d_kv
    for block, layer in zip(encoder.block, fused.enc):
        x = block.layer[0].layer_norm(hidden)
        q, k, v = _split_heads(_unpack(layer["qkv"](x), keep, b, t), 3 * h, d).split(h, dim=-3)
        a = _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0))
        hidden = hidden + layer["o"](a if keep is None else a.reshape(b * t, -1).index_select(0, keep))
        hidden = hidden + _gated(layer, fused.act, block.layer[1].layer_norm(hidden))
    return encoder.final_layer_norm(hidden), keep


def decode(fused: FusedT5, decoder, tokens, self_mask, encoded, cross_mask) -> torch.Tensor:
    """The decoder's final hidden state (before the LM head) at the trie nodes ``tokens`` for every prompt.

    ``self_mask`` (1, H, N, N): tree mask plus position bias; ``encoded``: :func:`encode`'s (hidden, keep);
    ``cross_mask`` (B, 1, 1, T): the padding mask."""
    h, d = fused.n_heads, fused.d_kv
    b, t = cross_mask.shape[0], cross_mask.shape[-1]
    n = tokens.shape[0]
    # Few trie nodes against a long prompt: attend through the key/value weights (absorbed) instead of projecting
    # every encoder position into every layer's keys and values: H*N*(d+T)*D multiply-adds per layer, not T*D*2D.
    absorb = fused.cross_w is not None and absorbs(n, t, d)
    if absorb:
        enc = _unpack(encoded[0], encoded[1], b, t)  # (B, T, D), zeros at padding (masked out)
        enc_t, mask = enc.transpose(1, 2).contiguous(), cross_mask.view(b, 1, t)  # once for every layer
    else:
        kv = _unpack(fused.cross_kv(encoded[0]), encoded[1], b, t)  # padding keys are zeros, masked out
        kv = _split_heads(kv, 2 * len(fused.dec) * h, d).split(h, dim=-3)  # (B, H, T, d) each
    hidden = decoder.embed_tokens(tokens)[None]  # (1, N, D): every prompt's nodes are the same until cross-attn
    for i, (block, layer) in enumerate(zip(decoder.block, fused.dec)):
        x = block.layer[0].layer_norm(hidden)
        q, k, v = _split_heads(layer["qkv"](x), 3 * h, d).split(h, dim=-3)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self_mask, scale=1.0)
        hidden = hidden + layer["o"](_merge_heads(a))
        q = _split_heads(layer["cq"](block.layer[1].layer_norm(hidden)), h, d)
        if absorb:
            a = _absorbed_cross_attention(q, *fused.cross_w[i], enc, enc_t, mask)
        else:
            a = F.scaled_dot_product_attention(q.expand(b, h, n, d), kv[2 * i], kv[2 * i + 1], attn_mask=cross_mask, scale=1.0)
        hidden = hidden + layer["co"](_merge_heads(a))
        hidden = hidden + _gated(layer, fused.act, block.layer[2].layer_norm(hidden))
    return decoder.final_layer_norm(hidden)


def absorbs(nodes: int, length: int, d_kv: int) -> bool:
    """Absorbed cross-attention costs less than projecting the keys and values when N (d + T) < T d."""
    return nodes * (d_kv + length) < length * d_kv


def _absorbed_cross_attention(q, wk, wv, enc, enc_t, mask):
    """T5 cross-attention (no scaling, no bias) with the key and value projections moved onto the queries:
    ``softmax(q (Wk e)^T) (Wv e) = (softmax((q Wk) e^T) e) Wv^T`` per head, exact up to float rounding.

    ``q`` (1 or B, H, N, d); ``wk``/``wv`` (H, d, D); ``enc`` (B, T, D) and ``enc_t``, its contiguous transpose;
    ``mask`` (B, 1, T) additive. -> (B, H, N, d)
    """
    bq, h, n, d = q.shape
    b, _, dim = enc.shape
    qk = torch.bmm(q.permute(1, 0, 2, 3).reshape(h, bq * n, d), wk)  # (H, Bq*N, D)
    qk = qk.view(h, bq, n, dim).permute(1, 0, 2, 3).reshape(bq, h * n, dim).expand(b, h * n, dim)
    scores = torch.baddbmm(mask, qk, enc_t) if bq == b else torch.bmm(qk, enc_t).add_(mask)
    exact = torch.promote_types(enc.dtype, torch.float32)  # bf16 scores are normalised in fp32, fp64 in fp64
    ctx = torch.bmm(scores.softmax(-1, dtype=exact).to(enc.dtype), enc)  # (B, H*N, D)
    ctx = ctx.view(b, h, n, dim).permute(1, 0, 2, 3).reshape(h, b * n, dim)
    return torch.bmm(ctx, wv.transpose(1, 2)).view(h, b, n, d).permute(1, 0, 2, 3)  # (B, H, N, d)
