"""The models a server answers with: one base model in memory, one or more named adapters over it."""

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

from ..adapter import AdapterMeta, check_shared_base, load_adapters
from ..config import Config, PredictConfig
from ..errors import LoratuneError
from ..families import family_class
from ..predict import Classifier, Prediction, classifier_from_config, inference_dtype, pick_device

DEFAULT_NAME = "default"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """``--adapter DIR`` (named "default") or ``--adapter NAME=DIR``, repeatable, into {name: dir}."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        # A directory whose name holds "=" (runs/lr=1e-3/final) is a path, not NAME=DIR.
        if not sep or Path(spec).exists() or "/" in name or "\\" in name:
            name, path = DEFAULT_NAME, spec
        if not NAME_PATTERN.match(name):
            raise LoratuneError(
                f"--adapter {spec!r}: the name must be letters, digits, '.', '_' or '-' "
                f"(at most 64), e.g. --adapter billing=outputs/lora/final"
            )
        if name in adapters:
            raise LoratuneError(f"--adapter: the name {name!r} is given twice; name each adapter: --adapter NAME=DIR")
        adapters[name] = Path(path)
    if not adapters:
        raise LoratuneError("nothing to serve: pass --adapter DIR (or NAME=DIR, repeatable)")
    return adapters


def check_adapters(adapters: Mapping[str, Path], base_model: str | None = None, quantize: str = "none") -> dict[str, AdapterMeta]:
    """Read every adapter's metadata and check they can be served together, without loading any weights."""
    if quantize != "none" and len(adapters) > 1:
        raise LoratuneError(f"--quantize {quantize} quantizes a merged model, so it serves one adapter; start one server per adapter")
    metas = {name: AdapterMeta.read(path) for name, path in adapters.items()}
    check_shared_base(metas, base_model)
    return metas


class ModelPool:
    """Named classifiers over ONE base model. Only the batcher's worker thread calls :meth:`predict`."""

    def __init__(self, classifiers: Mapping[str, Classifier], peft_model=None):
        self.classifiers = dict(classifiers)
        self.default = next(iter(self.classifiers))
        """The model a request gets when it names none: the first adapter given."""
        self._peft_model = peft_model

    @property
    def batch_size(self) -> int:
        return min(c.batch_size for c in self.classifiers.values())

    def warm_up(self, mode: str) -> None:
        """One tiny forward pass per adapter: the first pass of a fresh process is slow (lazy imports, allocator
        warm-up), and it should not land on the first client's request."""
        for name in self.classifiers:
            self.predict(name, ["warm-up"], mode)

    def close(self) -> None:
        """Nothing to release in-process (a WorkerPool stops its process here)."""

    def predict(self, name: str, texts: list[str], mode: str, progress=None) -> list[Prediction]:
        if self._peft_model is not None:
            self._peft_model.set_adapter(name)  # a batch holds one adapter's requests only
        return self.classifiers[name].predict(texts, mode=mode, progress=progress)


def load_pool(
    adapters: Mapping[str, Path],
    settings: PredictConfig | None = None,
    *,
    base_model: str | None = None,
    device: str | None = None,
    **overrides,
) -> ModelPool:
    """Load the adapters over one base model with the ``predict`` settings (``overrides`` replace single fields).
    A single adapter is merged into the base (same scores, faster), and quantized with ``quantize=int8`` (or cast with ``bf16``)."""
    settings = dataclasses.replace(settings or PredictConfig(), **overrides)
    check_adapters(adapters, base_model, settings.quantize)
    if len(adapters) == 1:
        ((name, path),) = adapters.items()
        return ModelPool({name: classifier_from_config(Config(predict=settings), path, base_override=base_model, device=device)})
    dev = pick_device(device)
    model, loaded = load_adapters(adapters, base_model=base_model, dtype=inference_dtype(dev))
    model.to(dev).eval()
    classifiers = {
        name: Classifier(family_class(meta.family)(model, tokenizer, meta.spec), settings, meta=meta, name=str(adapters[name]))
        for name, (tokenizer, meta) in loaded.items()
    }
    return ModelPool(classifiers, peft_model=model)
