"""Vocabulary trimming of the tiny Llama on the real SmolLM2 tokenizer: same tokens and logits in scope,
every text still encodes, and the result loads in a fresh process with its chat template and roles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from selftune.learners.vocab import (
    KEPT_IDS_FILE,
    byte_alphabet_ids,
    format_merges,
    load_kept_ids,
    parse_merges,
    remap_post_processor,
    restrict_to_kept,
    trim_vocabulary,
    trim_within_budget,
)
from selftune.policies.vocab import VocabTrimConfig

TRAFFIC = [
    {"prompt": "In hacker jargon, what does \"kluge\" mean?",
     "response": "A clever programming trick intended to solve a particular nasty case in an expedient way."},
    {"prompt": "In hacker jargon, what does \"grok\" mean?",
     "response": "To understand, connoting intimate and exhaustive knowledge. Contrast zen."},
    ("What is a daemon?", "A program that is not invoked explicitly, but lies dormant waiting for a condition."),
    "The 1TBS (\u201cOne True Brace Style\u201d) puts the opening brace on the same line.",
]
GENERAL = ["What is the capital of France?", "Explain in two sentences why the sky is blue."]
CONFIG = VocabTrimConfig(enabled=True, general_tokens=300)
MISSING_BYTE_CHARS = "\x04\x06\x13\x14\x16\x1d"
"""Characters whose UTF-8 byte the SmolLM2 vocabulary lacks: its own tokenizer drops them (so does the trimmed
one); likewise every character from U+40000 up (lead bytes F1, F2 are missing; F5-FF are not UTF-8)."""
UNICODE_SAMPLES = [
    "hello 😀 世界", "e\u0301 a\u0308 n\u0303 (combining marks)", "👩‍👩‍👧 ZWJ family, 🇫🇷 flag",
    "Ελληνικά, русский, עברית, العربية, हिन्दी", "control: \x00 \x01 \x7f \x1b[0m tab\there\r\n", "  spaces  \n\n",
    "<|im_end|> inside text, and <|endoftext|>", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟙𝟚𝟛, \U0002a6d6 (CJK ext. B)", "",
]


@pytest.fixture(scope="module")
def trimmed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("trimmed") / "model"
    facts = trim_vocabulary(tiny_model_dir, out, TRAFFIC, GENERAL, CONFIG)
    return out, facts


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir: Path, trimmed: tuple[Path, dict[str, Any]]) -> tuple[Any, Any]:
    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(trimmed[0])


def chat_text(tokenizer: Any, row: Any) -> str:
    prompt, response = (row["prompt"], row["response"]) if isinstance(row, dict) else row
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def in_scope_texts(tokenizer: Any) -> list[str]:
    return [t if isinstance(t, str) else chat_text(tokenizer, t) for t in TRAFFIC]


def test_the_facts_and_the_shrunk_tied_embedding(trimmed: tuple[Path, dict[str, Any]]) -> None:
    out, facts = trimmed
    assert facts["vocab_size_before"] == 49152 and facts["vocab_size_before"] > 10 * facts["vocab_size_after"]
    assert facts["embedding_rows_after"] == facts["vocab_size_after"] == facts["id_map_size"]
    assert sum(facts["kept_by_reason"].values()) == facts["vocab_size_after"]
    assert facts["kept_by_reason"]["special"] == 17 and facts["kept_by_reason"]["byte_alphabet"] == 235
    hidden = 64  # the tiny model's width: the tied matrix is stored once
    assert facts["parameters_before"] - facts["parameters_after"] == hidden * (49152 - facts["vocab_size_after"])
    assert facts["merges_after"] < facts["merges_before"]
    kept = load_kept_ids(out)
    assert kept == sorted(kept) and len(kept) == facts["vocab_size_after"] and kept[:17] == list(range(17))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.vocab_size == facts["vocab_size_after"]


def test_in_scope_text_encodes_to_the_same_tokens(tokenizers: tuple[Any, Any], trimmed: tuple[Path, Any]) -> None:
    before, after = tokenizers
    new_id = {old: new for new, old in enumerate(load_kept_ids(trimmed[0]))}
    for text in in_scope_texts(before) + GENERAL:
        old_ids = before(text, add_special_tokens=False)["input_ids"]
        new_ids = after(text, add_special_tokens=False)["input_ids"]
        assert after.convert_ids_to_tokens(new_ids) == before.convert_ids_to_tokens(old_ids)
        assert new_ids == [new_id[i] for i in old_ids]


def test_out_of_scope_text_still_encodes_in_more_pieces(tokenizers: tuple[Any, Any]) -> None:
    before, after = tokenizers
    text = "Photosynthesis converts carbon dioxide into glucose; mitochondria respire."
    old_ids, new_ids = before(text)["input_ids"], after(text)["input_ids"]
    assert len(new_ids) > len(old_ids) and after.decode(new_ids) == text
    assert max(new_ids) < len(after)


def test_every_word_whose_tokens_were_all_kept_encodes_identically(tokenizers: tuple[Any, Any]) -> None:
    """The claim of ``policies.vocab.trimmed_merges``, word by word on real prose (this repository's README):
    a word whose original BPE pieces are all kept gets the same pieces; any other word only kept ones."""
    before, after = tokenizers
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    words = [w for w, _ in before.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    kept, same = set(after.get_vocab()), 0
    for word in words:
        old = [t.value for t in before.backend_tokenizer.model.tokenize(word)]
        new = [t.value for t in after.backend_tokenizer.model.tokenize(word)]
        assert "".join(new) == word and set(new) <= kept
        if set(old) <= kept:
            assert new == old, word
            same += 1
    assert len(words) > 500 and 0 < same < len(words)  # both kinds of word occur


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_unicode_round_trips(tokenizers: tuple[Any, Any], text: str) -> None:
    _, after = tokenizers
    assert after.decode(after(text)["input_ids"]) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(max_codepoint=0x3FFFF, blacklist_categories=("Cs",),
                                  blacklist_characters=MISSING_BYTE_CHARS), max_size=40))
def test_any_text_round_trips(tokenizers: tuple[Any, Any], text: str) -> None:
    before, after = tokenizers
    assert after.decode(after(text)["input_ids"]) == text == before.decode(before(text)["input_ids"])


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=20))
def test_text_the_parent_cannot_encode_either_decodes_as_the_parent_does(tokenizers: tuple[Any, Any],
                                                                         text: str) -> None:
    before, after = tokenizers
    assert after.decode(after(text)["input_ids"]) == before.decode(before(text)["input_ids"])


def test_next_token_distributions_are_identical_in_scope(tiny_model_dir: Path, trimmed: tuple[Path, Any],
                                                        tokenizers: tuple[Any, Any]) -> None:
    before, after = tokenizers
    parent = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    child = AutoModelForCausalLM.from_pretrained(trimmed[0]).eval()
    kept = load_kept_ids(trimmed[0])
    with torch.no_grad():
        for text in in_scope_texts(before):
            old = parent(**before(text, return_tensors="pt")).logits
            new = child(**after(text, return_tensors="pt")).logits
            torch.testing.assert_close(new, restrict_to_kept(old, kept), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(new.log_softmax(-1), restrict_to_kept(old, kept).log_softmax(-1),
                                       rtol=1e-5, atol=1e-5)


def test_chat_template_and_special_roles(tokenizers: tuple[Any, Any], trimmed: tuple[Path, Any]) -> None:
    before, after = tokenizers
    messages = [{"role": "user", "content": TRAFFIC[1]["prompt"]}]
    old = before.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert after.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == old
    # the template's own text (its default system prompt too) is kept whole: the same tokens as before
    tokens = before.convert_ids_to_tokens(before(old)["input_ids"])
    assert after.convert_ids_to_tokens(after(old)["input_ids"]) == tokens
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(after, role) == getattr(before, role)
        assert after.decode([getattr(after, role + "_id")]) == getattr(before, role)
    config = json.loads((trimmed[0] / "config.json").read_text())
    generation = json.loads((trimmed[0] / "generation_config.json").read_text())
    for key, token in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"), ("pad_token_id", "pad_token")):
        assert config[key] == generation[key] == getattr(after, token + "_id")


FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tokenizer.apply_chat_template([{"role": "user", "content": "grok 😀 世界"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print(json.dumps({"vocab": len(tokenizer), "rows": model.get_input_embeddings().num_embeddings,
                  "eos": tokenizer.decode([model.generation_config.eos_token_id]),
                  "max_id": int(out.max()), "text": tokenizer.decode(ids[0])}))
"""


def test_loads_in_a_fresh_process(trimmed: tuple[Path, dict[str, Any]]) -> None:
    out, facts = trimmed
    run = subprocess.run([sys.executable, "-c", FRESH, str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["vocab"] == loaded["rows"] == facts["vocab_size_after"]
    assert loaded["eos"] == "<|im_end|>" and loaded["max_id"] < facts["vocab_size_after"]
    assert loaded["text"].endswith("<|im_start|>user\ngrok 😀 世界<|im_end|>\n<|im_start|>assistant\n")


def test_disabled_copies_the_model_unchanged(tiny_model_dir: Path, tmp_path: Path) -> None:
    facts = trim_vocabulary(tiny_model_dir, tmp_path / "same", TRAFFIC, GENERAL, VocabTrimConfig(enabled=False))
    assert facts["vocab_size_after"] == facts["vocab_size_before"] == 49152
    assert facts["parameters_after"] == facts["parameters_before"]
    original = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    assert json.loads((tmp_path / "same" / "tokenizer.json").read_text()) == original


def test_refuses_to_overwrite(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is the source directory"):
        trim_vocabulary(tiny_model_dir, tiny_model_dir, [], [], CONFIG)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="is not empty"):
        trim_vocabulary(tiny_model_dir, tmp_path / "busy", [], [], CONFIG)


def test_both_merge_formats_round_trip() -> None:
    pairs = [("Ġ", "t"), ("i", "n")]
    assert parse_merges(["Ġ t", "i n"]) == (pairs, "strings")
    assert parse_merges([["Ġ", "t"], ["i", "n"]]) == (pairs, "pairs")
    assert format_merges(pairs, "strings") == ["Ġ t", "i n"]
    assert format_merges(pairs, "pairs") == [["Ġ", "t"], ["i", "n"]]
    with pytest.raises(ValueError, match="merge 0 is 'a b c'"):
        parse_merges(["a b c"])


def test_string_merges_trim_and_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "strings"
    source.mkdir()
    for path in tiny_model_dir.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    data = json.loads((source / "tokenizer.json").read_text())
    data["model"]["merges"] = [f"{a} {b}" for a, b in data["model"]["merges"]]
    (source / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    facts = trim_vocabulary(source, tmp_path / "out", TRAFFIC[:1], [], VocabTrimConfig(enabled=True,
                                                                                          general_tokens=0))
    written = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert all(isinstance(m, str) for m in written["model"]["merges"])
    assert len(written["model"]["merges"]) == facts["merges_after"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.decode(tokenizer("kluge 😀")["input_ids"]) == "kluge 😀"
    assert json.loads((tmp_path / "out" / KEPT_IDS_FILE).read_text())["vocab_size_after"] == len(tokenizer)


def test_post_processor_ids_are_renumbered() -> None:
    id_map = {1: 0, 7: 1, 9: 2}
    template = {"type": "TemplateProcessing", "single": [],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [7], "tokens": ["<s>"]}}}
    roberta = {"type": "RobertaProcessing", "sep": ["</s>", 9], "cls": ["<s>", 7]}
    remapped = remap_post_processor({"type": "Sequence", "processors": [template, roberta]}, id_map)
    assert remapped["processors"][0]["special_tokens"]["<s>"]["ids"] == [1]
    assert remapped["processors"][1]["sep"] == ["</s>", 2] and remapped["processors"][1]["cls"] == ["<s>", 1]
    assert remap_post_processor(None, id_map) is None


def test_a_tokenizer_without_byte_pieces_is_refused() -> None:
    data = {"pre_tokenizer": {"type": "Whitespace"}, "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}
    with pytest.raises(ValueError, match="neither byte-level"):
        byte_alphabet_ids(data)
    data["model"]["byte_fallback"] = True
    data["model"]["vocab"]["<0x41>"] = 1
    assert byte_alphabet_ids(data) == {1}


HELD_OUT = [[{"role": "user", "content": "In hacker jargon, what does \"cruft\" mean?"},
             {"role": "assistant", "content": "Excess, superfluous junk; the results of shoddy construction."}]]


def test_a_trim_within_its_budget_keeps_the_smallest_vocabulary_that_fits(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = VocabTrimConfig(enabled=True, general_tokens=12_000)  # steps: 12,000, 24,000 and 48,000 tokens
    loose, reference = trim_within_budget(tiny_model_dir, tmp_path / "loose", TRAFFIC, GENERAL, config,
                                          held_out=HELD_OUT, max_length=64, max_cost=10.0)
    assert loose["general_tokens"] == 12_000 and len(loose["trials"]) == 1 and loose["trials"][0]["within"]
    assert loose["loss_untrimmed"] == reference and loose["vocab_size_after"] < loose["vocab_size_before"]
    assert load_kept_ids(tmp_path / "loose") is not None
    # a budget nothing meets (the loss must fall by half): every step tried, none kept, nothing left behind
    none, _ = trim_within_budget(tiny_model_dir, tmp_path / "none", TRAFFIC, GENERAL, config, held_out=HELD_OUT,
                                 max_length=64, max_cost=-0.5)
    assert none["enabled"] is False and "-50%" in none["reason"] and not (tmp_path / "none").exists()
    assert [t["general_tokens"] for t in none["trials"]] == [12_000, 24_000, 48_000]
    assert not any(t["within"] for t in none["trials"])
