"""Model cards as the Hugging Face Hub reads them (huggingface_hub's ModelCard parses them back, model-index
included): generation 0's, a trained generation's; and an export whose config.json says nothing odd."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from huggingface_hub import ModelCard

from selftune.daemon.context import Context
from selftune.daemon.lineage import foundation_card, lineage_card
from selftune.daemon.reports.render import write_reports

from .conftest import init_state
from .test_report import manifest, suites

GGUF_NAME = "Smollm2 135M 8k Lc100K Mix1 Ep2"
"""What transformers' GGUF loader leaves in the embedded model's config as ``_model_name_or_path``."""


def test_generation_zero_has_a_card_with_the_foundations_license_and_its_export_a_clean_config(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    foundation = tmp_path / "foundation"  # the tiny model, as a GGUF-loaded model was saved, with a card of its own
    shutil.copytree(tiny_model_dir, foundation)
    config = json.loads((foundation / "config.json").read_text())
    (foundation / "config.json").write_text(json.dumps({**config, "_model_name_or_path": GGUF_NAME}))
    (foundation / "README.md").write_text("---\nlicense: mit\nlanguage:\n- en\n- fr\n---\n\n# A tiny model\n")
    context = Context.open(str(init_state(tmp_path / "state", foundation)))

    readme = context.artifacts.path(0) / "README.md"
    assert readme.is_file(), "generation 0 has no model card"
    card = ModelCard.load(readme)
    assert (card.data.license, card.data.language, card.data.base_model) == ("mit", ["en", "fr"], None)
    assert card.data.library_name == "transformers" and "foundation" in card.data.tags
    assert card.text.startswith("\n# selftune generation 0: the foundation") and "license: mit" in card.text
    assert lineage_card(context) == {"license": "mit", "language": ["en", "fr"]}  # what later cards repeat

    exported = context.artifacts.export(0, tmp_path / "export")
    assert "_model_name_or_path" not in json.loads((exported / "config.json").read_text())
    assert (exported / "README.md").read_text() == readme.read_text()
    context.store.engine.dispose()


def test_a_generations_card_names_its_base_model_license_language_and_a_valid_model_index(tmp_path: Path) -> None:
    write_reports(tmp_path, 3, {**manifest(), "card": foundation_card("embedded")}, suites())
    card = ModelCard.load(tmp_path / "README.md")  # parses the model-index: raises if it is not a valid one
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (data.license, data.language) == ("apache-2.0", ["en"])
    assert data.model_name == "selftune-generation-3" and {"selftune", "branch-main"} <= set(data.tags)
    results = {r.metric_name: (r.metric_type, r.metric_value, r.task_type, r.dataset_type) for r in data.eval_results}
    assert results["held-out loss on new data (bits/byte)"] == (
        "loss", 1.62, "text-generation", "selftune-held-out")
    assert card.text.lstrip().startswith("# selftune generation 3")
