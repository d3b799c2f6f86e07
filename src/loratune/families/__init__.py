"""The model families and their registry: the only place a family name is compared.

Adding a family is one module with a :class:`~loratune.families.common.Family` subclass plus one line in
``FAMILIES`` (and, if its architectures are not told apart by the config, one rule in :func:`detect_family`).
"""

from __future__ import annotations

from ..errors import LoratuneError
from .causal import CausalFamily
from .common import Encoded, Family
from .encoder import EncoderFamily
from .seq2seq import Seq2SeqFamily

FAMILIES: dict[str, type[Family]] = {f.name: f for f in (Seq2SeqFamily, CausalFamily, EncoderFamily)}


def family_class(name: str) -> type[Family]:
    """The Family class registered as ``name``."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise LoratuneError(f"model.family must be one of {', '.join(FAMILIES)}, got {name!r}") from None


def detect_family(config, override: str = "auto") -> str:
    """seq2seq for encoder-decoders, causal for decoder-only LMs, encoder otherwise (unless overridden)."""
    if override and override != "auto":
        return family_class(override).name
    if getattr(config, "is_encoder_decoder", False):
        return Seq2SeqFamily.name
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return CausalFamily.name
    if architectures:
        return EncoderFamily.name
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return CausalFamily.name
    return EncoderFamily.name


__all__ = ["FAMILIES", "CausalFamily", "Encoded", "EncoderFamily", "Family", "Seq2SeqFamily", "detect_family", "family_class"]
