"""loratune: teach a small language model to classify text by instruction tuning with LoRA."""

__version__ = "0.1.0"

from .errors import LoratuneError
from .prompt import format_example

__all__ = ["Classifier", "LoratuneError", "__version__", "evaluate", "format_example", "load_dataset", "train"]


def __getattr__(name: str):
    # Heavy imports (torch, transformers) wait until first use, so `import loratune` and `loratune -h` stay fast.
    if name == "Classifier":
        from .predict import Classifier

        return Classifier
    if name == "train":
        from .train import train

        return train
    if name == "load_dataset":
        from .data import load_splits

        return load_splits
    if name == "evaluate":
        from .evaluate import evaluate

        return evaluate
    raise AttributeError(f"module 'loratune' has no attribute {name!r}")
