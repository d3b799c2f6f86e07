"""int8 inference on the CPU: dynamic quantization of every ``nn.Linear`` of the (LoRA-merged) model.

Weights are converted to int8 once, per output channel's scale; activations are quantized on the fly per
batch, and the matmuls run in int8 (fbgemm/x86 kernels; qnnpack on ARM). Embeddings, layer norms and the
T5 relative position bias stay in fp32. Any family works: the model's own modules are swapped in place, so the
scorers (T5 label trie, causal prefix sharing, encoder head) and ``generate`` run unchanged.

Why ``torch.ao.quantization.quantize_dynamic``: torch marks it deprecated in favour of torchao's
``quantize_(model, Int8DynamicActivationInt8WeightConfig())``, but in eager mode on the CPU that path is
slower than fp32 (pytorch/ao issues 3157 and 4365), while ``quantize_dynamic`` is still shipped (torch 2.13) and
ran flan-t5-small's score mode 2.1x as fast as fp32 (docs/BENCHMARKS.md). It is called in one place,
:func:`quantize_int8`, so moving to another backend is one function.

``--quantize bf16`` instead casts the whole model to bfloat16 on the CPU (:func:`to_bf16`): CPUs with AMX-BF16
or AVX512-BF16 run its matmuls several times faster than fp32 (docs/BENCHMARKS.md). The scorers still sum
label log-probabilities in fp32.

``evaluate`` and ``compare`` with ``--quantize int8`` or ``bf16`` run the fp32 model and its reduced-precision
twin on the same examples and report how often they agree (:func:`int8_rows`; ``report["int8"]`` holds the rows
of either precision).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

from .errors import LoratuneError

INT8 = "int8"
BF16 = "bf16"
PRECISIONS = (INT8, BF16)
NOT_ON_GPU = "--quantize int8 runs on the CPU only (dynamic int8 kernels); drop --quantize on {device}, or use the CPU"
BF16_NOT_ON_GPU = (
    "--quantize bf16 is for the CPU (on a GPU, predictions use bf16 or fp16 where the card supports them); drop --quantize on {device}"
)


def int8_device(quantize: str, device: str | None) -> str | None:
    """The device to load on: the CPU for int8 and bf16 unless one was named (a GPU then is an error)."""
    if quantize not in ("none", *PRECISIONS):
        raise LoratuneError(f"predict.quantize (--quantize) must be none, {INT8} or {BF16}, got {quantize!r}")
    if quantize == "none":
        return device
    if device is not None and not str(device).startswith("cpu"):
        raise LoratuneError((NOT_ON_GPU if quantize == INT8 else BF16_NOT_ON_GPU).format(device=device))
    return "cpu"


def reduce_precision(model, precision: str):
    """``model`` in ``precision`` (int8 or bf16), in place (returned for chaining)."""
    return quantize_int8(model) if precision == INT8 else to_bf16(model)


def to_bf16(model):
    """``model`` cast to bfloat16 on the CPU, in place (returned for chaining)."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cpu":
        raise LoratuneError(BF16_NOT_ON_GPU.format(device=device))
    return model.to(torch.bfloat16)


def quantize_int8(model):
    """``model`` with every ``nn.Linear`` replaced by a dynamic int8 one, in place (returned for chaining).

    The model must be plain (LoRA merged first): PEFT's LoRA layers would be quantized piecewise."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cpu":
        raise LoratuneError(NOT_ON_GPU.format(device=device))
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):
        raise LoratuneError("--quantize int8 quantizes the merged model: load it with predict.merge true")
    quantize = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
    if quantize is None:
        raise LoratuneError(f"--quantize int8 needs torch.ao.quantization.quantize_dynamic, which torch {torch.__version__} no longer has")
    model.float()  # dynamic int8 Linear layers take fp32 activations (a bf16 checkpoint is widened first)
    engine = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        try:
            # The weights are packed for the engine chosen here and keep it; the global setting is restored.
            torch.backends.quantized.engine = int8_engine()
            return quantize(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        finally:
            torch.backends.quantized.engine = engine


INT8_DOT_PRODUCT_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def int8_engine() -> str:
    """oneDNN where the CPU has int8 dot-product instructions (VNNI, AMX), else torch's default (x86/fbgemm).

    On this project's Xeon (avx512_vnni, AMX) oneDNN-packed weights ran flan-t5-small's score mode 1.2x faster
    than the default engine, interleaved, and agreed more often with fp32 (docs/BENCHMARKS.md)."""
    import torch

    engines = torch.backends.quantized.supported_engines
    if "onednn" in engines and INT8_DOT_PRODUCT_FLAGS & _cpu_flags():
        return "onednn"
    return torch.backends.quantized.engine


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def is_int8(model) -> bool:
    """True when the model's Linear layers are dynamic int8 ones (and no float ``nn.Linear`` is left)."""
    import torch

    dynamic = torch.ao.nn.quantized.dynamic.Linear
    modules = list(model.modules())
    return any(isinstance(m, dynamic) for m in modules) and not any(type(m) is torch.nn.Linear for m in modules)


def int8_twin(classifier, precision: str = INT8):
    """A new Classifier over an int8 (or bf16) copy of ``classifier``'s model (same prompts and settings)."""
    from .predict import Classifier

    family = classifier.family
    model = reduce_precision(copy.deepcopy(family.model), precision)
    twin_family = type(family)(model, family.tokenizer, family.spec)
    return Classifier(twin_family, classifier.settings, meta=classifier.meta, name=f"{classifier.name} {precision}")


def agreement(fp32: Sequence, int8: Sequence) -> dict:
    """How often the int8 twin's predictions match the fp32 model's: same label (multi-label: the same set);
    score mode also the largest probability difference."""
    same = sum(a.label == b.label for a, b in zip(fp32, int8))
    out = {"n": len(fp32), "top1_agreement": same / max(len(fp32), 1)}
    diffs = [abs(a.scores[k] - b.scores[k]) for a, b in zip(fp32, int8) if a.scores and b.scores for k in a.scores]
    if diffs:
        out["max_prob_diff"] = max(diffs)
    return out


def int8_rows(fp32_results, int8_results, precision: str = INT8) -> list[dict]:
    """report["int8"]: per (model, mode), agreement with fp32 and the speed ratio measured in the same run."""
    rows = []
    for a, b in zip(fp32_results, int8_results):
        rows.append(
            {
                "model": a.name,
                "int8_model": b.name,
                "precision": precision,
                "mode": a.mode,
                **agreement(a.predictions, b.predictions),
                "speedup": b.metrics["examples_per_s"] / a.metrics["examples_per_s"] if a.metrics["examples_per_s"] else None,
            }
        )
    return rows


LOW_AGREEMENT = 0.9
"""Below this share of same predictions the report says int8 changes the model's answers."""


def describe(row: dict) -> str:
    """One line for the console and report.md."""
    speed = f"; {row['speedup']:.2f}x the fp32 examples/s" if row.get("speedup") else ""
    probs = f"; probabilities within {row['max_prob_diff']:.3f}" if "max_prob_diff" in row else ""
    precision = row.get("precision", INT8)
    warn = (
        f" (below {100 * LOW_AGREEMENT:.0f}%: {precision} changes this model's answers; check before deploying it)"
        if row["top1_agreement"] < LOW_AGREEMENT
        else ""
    )
    return (
        f"{precision} vs fp32 ({row['model']}, {row['mode']}): same prediction on {100 * row['top1_agreement']:.1f}% "
        f"of {row['n']} examples{probs}{speed}{warn}"
    )
