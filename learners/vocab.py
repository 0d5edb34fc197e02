"""Vocabulary trimming of a model directory: a smaller tokenizer and a smaller tied embedding and LM head.

One measurement, one decision (``selftune.policies.vocab.plan_vocabulary``), one rewrite:
- count the tokens of the branch's traffic (training, replay and rehearsal rows) and of general text with
  the parent's own tokenizer;
- keep what the policy says (special tokens, the byte alphabet, the chat template's tokens, every
  traffic token, the most frequent general tokens, closed under the BPE merges);
- renumber the kept tokens densely in their old order and rewrite ``tokenizer.json`` (vocabulary, merges,
  added tokens, post-processor ids), ``tokenizer_config.json``, the embedding rows and LM head rows (tied
  stay tied), and the token ids of ``config.json`` and ``generation_config.json``.

The result is an ordinary transformers directory: ``AutoTokenizer`` and ``AutoModelForCausalLM`` load it in
any process. On text whose tokens were all kept it computes the same logits as the parent restricted to the
kept ids (``restrict_to_kept``); other text still encodes, through shorter pieces down to single bytes.
The kept ids (old ids, in new order) are written to ``vocab_trim.json`` beside the weights, so that a teacher
with the parent's vocabulary can be compared with the trimmed student (the distillation heal).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from selftune.policies.pruning import within_prune_budget
from selftune.policies.vocab import Merge, VocabPlan, VocabTrimConfig, general_token_steps, plan_vocabulary

from .chat import Row, as_messages
from .evaluate import held_out_loss, load_model, parameter_count

Text = Union[str, Row]
"""A plain text (encoded as it is) or a learner row / conversation (rendered with the chat template first)."""

KEPT_IDS_FILE = "vocab_trim.json"
"""Written beside the trimmed weights: ``kept_ids`` (the parent's id of each new id) and the sizes."""
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "cls_token_id",
                 "mask_token_id", "decoder_start_token_id")
"""Token ids that ``config.json`` and ``generation_config.json`` may hold (an int or a list of ints)."""
COPIED_TOKENIZER_FILES = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json")
"""Tokenizer files that hold no ids: copied as they are."""
BYTE_FALLBACK_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


# ---- reading the BPE model ----------------------------------------------------------------------


def parse_merges(raw: Sequence[Union[str, Sequence[str]]]) -> tuple[list[Merge], str]:
    """Merges as (left, right) pairs, and the format they came in: ``"pairs"`` ([a, b]) or ``"strings"`` ("a b")."""
    if raw and isinstance(raw[0], str):
        pairs = []
        for rank, line in enumerate(raw):
            parts = str(line).split(" ")
            if len(parts) != 2:
                raise ValueError(f"merge {rank} is {line!r}: a merge string must be two tokens separated by one space")
            pairs.append((parts[0], parts[1]))
        return pairs, "strings"
    return [(str(a), str(b)) for a, b in raw], "pairs"


def format_merges(merges: Sequence[Merge], fmt: str) -> list[Any]:
    return [f"{a} {b}" for a, b in merges] if fmt == "strings" else [[a, b] for a, b in merges]


def _has_byte_level(pre_tokenizer: Any) -> bool:
    if not isinstance(pre_tokenizer, dict):
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre_tokenizer.get("pretokenizers") or ())


def byte_alphabet_ids(data: Mapping[str, Any]) -> set[int]:
    """Ids of the byte-level base tokens the vocabulary has: the ByteLevel alphabet (and ``<0xNN>`` tokens
    where the model falls back to bytes). A tokenizer with neither cannot encode every text: refused."""
    from tokenizers.pre_tokenizers import ByteLevel  # the tokenizers package ships with transformers

    vocab = data["model"]["vocab"]
    ids = set()
    if _has_byte_level(data.get("pre_tokenizer")):
        ids |= {vocab[c] for c in ByteLevel.alphabet() if c in vocab}
    if data["model"].get("byte_fallback"):
        ids |= {vocab[t] for t in BYTE_FALLBACK_TOKENS if t in vocab}
    if not ids:
        raise ValueError("the tokenizer is neither byte-level (ByteLevel pre-tokenizer) nor byte-fallback BPE: "
                         "after trimming some text would not encode; trim only byte-level BPE tokenizers")
    return ids


def read_bpe(source_dir: Path) -> tuple[dict[str, Any], dict[str, int], list[Merge], str]:
    """``tokenizer.json``, its full vocabulary (model vocabulary plus added tokens), merges and merge format."""
    path = source_dir / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: vocabulary trimming needs a fast tokenizer; save the tokenizer "
                                "with transformers (AutoTokenizer(...).save_pretrained) first")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data["model"].get("type") != "BPE":
        raise ValueError(f"{path} holds a {data['model'].get('type')} model: vocabulary trimming handles BPE only")
    vocab = dict(data["model"]["vocab"])
    for added in data.get("added_tokens") or ():
        vocab.setdefault(added["content"], int(added["id"]))
    merges, fmt = parse_merges(data["model"].get("merges") or [])
    return data, vocab, merges, fmt


# ---- counting ----------------------------------------------------------------------------------


def render(tokenizer: Any, text: Text) -> str:
    """A text as it is, a row in the chat template (as training and evaluation see it)."""
    return text if isinstance(text, str) else tokenizer.apply_chat_template(as_messages(text), tokenize=False)


def count_tokens(tokenizer: Any, texts: Iterable[Text], batch: int = 256) -> Counter[int]:
    """How often each id occurs when the texts are encoded with ``tokenizer`` (no special tokens added)."""
    counts: Counter[int] = Counter()
    rendered = [render(tokenizer, text) for text in texts]
    for start in range(0, len(rendered), batch):
        for ids in tokenizer(rendered[start:start + batch], add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    return counts


def template_ids(tokenizer: Any) -> set[int]:
    """The tokens of the chat template's own text (markers, role names, a default system prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    samples = [
        ([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], False),
        ([{"role": "system", "content": ""}, {"role": "user", "content": ""}], True),
    ]
    ids: set[int] = set()
    for messages, prompt in samples:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def configured_ids(*configs: Any) -> set[int]:
    """Every token id named in the model's config and generation config (kept as special tokens)."""
    ids: set[int] = set()
    for config in configs:
        for key in TOKEN_ID_KEYS:
            value = getattr(config, key, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            ids.update(int(v) for v in values if v is not None)
    return ids


# ---- rewriting ---------------------------------------------------------------------------------


def remap_post_processor(processor: Any, id_map: Mapping[int, int]) -> Any:
    """A post-processor with its token ids renumbered (TemplateProcessing, Roberta/Bert, Sequence)."""
    if not isinstance(processor, dict):
        return processor
    out = dict(processor)
    for key in ("sep", "cls"):  # RobertaProcessing / BertProcessing: [token, id]
        if isinstance(out.get(key), list) and len(out[key]) == 2:
            out[key] = [out[key][0], id_map[int(out[key][1])]]
    if isinstance(out.get("special_tokens"), dict):  # TemplateProcessing
        out["special_tokens"] = {name: {**spec, "ids": [id_map[int(i)] for i in spec.get("ids", [])]}
                                 for name, spec in out["special_tokens"].items()}
    if isinstance(out.get("processors"), list):
        out["processors"] = [remap_post_processor(p, id_map) for p in out["processors"]]
    return out


def trimmed_tokenizer_json(data: Mapping[str, Any], plan: VocabPlan, fmt: str) -> dict[str, Any]:
    """``tokenizer.json`` with only the kept tokens and merges, every id renumbered by ``plan.id_map``."""
    id_map = plan.id_map
    out = json.loads(json.dumps(data))  # a deep copy
    model_vocab = data["model"]["vocab"]
    out["model"]["vocab"] = dict(sorted(((t, id_map[i]) for t, i in model_vocab.items() if i in id_map),
                                        key=lambda item: item[1]))
    out["model"]["merges"] = format_merges(plan.merges, fmt)
    out["added_tokens"] = [{**added, "id": id_map[int(added["id"])]} for added in data.get("added_tokens") or ()]
    out["post_processor"] = remap_post_processor(data.get("post_processor"), id_map)
    if isinstance(out.get("padding"), dict) and "pad_id" in out["padding"]:
        out["padding"]["pad_id"] = id_map[int(out["padding"]["pad_id"])]
    return out


def write_tokenizer_files(source_dir: Path, out_dir: Path, data: Mapping[str, Any], plan: VocabPlan,
                          fmt: str) -> None:
    """The trimmed ``tokenizer.json`` and the other tokenizer files of ``source_dir``, their ids renumbered."""
    id_map = plan.id_map
    new = trimmed_tokenizer_json(data, plan, fmt)
    (out_dir / "tokenizer.json").write_text(json.dumps(new, ensure_ascii=False, indent=2), encoding="utf-8")
    config_path = source_dir / "tokenizer_config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(config.get("added_tokens_decoder"), dict):
            config["added_tokens_decoder"] = {str(id_map[int(i)]): spec
                                              for i, spec in config["added_tokens_decoder"].items()}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2),
                                                       encoding="utf-8")
    added_path = source_dir / "added_tokens.json"
    if added_path.exists():  # {content: id}
        added = json.loads(added_path.read_text(encoding="utf-8"))
        (out_dir / "added_tokens.json").write_text(
            json.dumps({t: id_map[int(i)] for t, i in added.items()}, ensure_ascii=False, indent=2), encoding="utf-8")
    if (source_dir / "vocab.json").exists():  # a slow tokenizer's copy of the BPE model: keep it consistent
        (out_dir / "vocab.json").write_text(json.dumps(new["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    if (source_dir / "merges.txt").exists():
        lines = "".join(f"{a} {b}\n" for a, b in plan.merges)
        (out_dir / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    for name in COPIED_TOKENIZER_FILES:
        if (source_dir / name).exists():
            shutil.copyfile(source_dir / name, out_dir / name)


def shrink_embeddings(model: PreTrainedModel, kept_ids: Sequence[int]) -> None:
    """Keep only the embedding and LM-head rows of ``kept_ids``, in that order; tied weights stay one tensor."""
    index = torch.tensor(list(kept_ids), dtype=torch.long)
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    if int(index.max()) >= embedding.num_embeddings:
        raise ValueError(f"token id {int(index.max())} is beyond the {embedding.num_embeddings} embedding rows: the "
                         "tokenizer does not belong to this model")
    new_id = {old: new for new, old in enumerate(kept_ids)}
    with torch.no_grad():
        embedding.weight = torch.nn.Parameter(embedding.weight.index_select(0, index.to(embedding.weight.device)))
    embedding.num_embeddings = len(kept_ids)
    if getattr(embedding, "padding_idx", None) is not None:
        embedding.padding_idx = new_id.get(embedding.padding_idx)
    if head is not None:
        if tied:
            head.weight = embedding.weight
        else:
            with torch.no_grad():
                head.weight = torch.nn.Parameter(head.weight.index_select(0, index.to(head.weight.device)))
        if getattr(head, "bias", None) is not None:
            with torch.no_grad():
                head.bias = torch.nn.Parameter(head.bias.index_select(0, index.to(head.bias.device)))
        head.out_features = len(kept_ids)
    model.config.vocab_size = len(kept_ids)


def remap_token_ids(config: Any, id_map: Mapping[int, int]) -> None:
    """The token ids of a model config or generation config, renumbered (every one must be kept)."""
    for key in TOKEN_ID_KEYS:
        value = getattr(config, key, None)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            setattr(config, key, [id_map[int(v)] for v in value])
        else:
            setattr(config, key, id_map[int(value)])


def restrict_to_kept(logits: torch.Tensor, kept_ids: Sequence[int]) -> torch.Tensor:
    """Logits over the parent's vocabulary cut to the kept ids, in the trimmed model's order (last dimension)."""
    return logits.index_select(-1, torch.tensor(list(kept_ids), dtype=torch.long, device=logits.device))


def load_kept_ids(model_dir: str | Path) -> list[int] | None:
    """The parent's id of each token of a trimmed model, or None where the directory was not trimmed."""
    path = Path(model_dir) / KEPT_IDS_FILE
    return list(json.loads(path.read_text(encoding="utf-8"))["kept_ids"]) if path.exists() else None


# ---- the whole step ----------------------------------------------------------------------------


def trim_vocabulary(
    source_dir: str | Path,
    out_dir: str | Path,
    traffic_texts: Iterable[Text],
    general_texts: Iterable[Text],
    config: VocabTrimConfig,
) -> dict[str, Any]:
    """Write the trimmed model of ``source_dir`` to ``out_dir`` (created; must not exist or be empty).

    ``traffic_texts``: the branch's training, replay and rehearsal rows (or plain texts); ``general_texts``:
    general prose whose most frequent tokens stay (the foundation probe and rehearsal prompts, say).
    Returns the facts for the report: vocabulary sizes, embedding rows, parameters and merges before and
    after, the kept tokens by reason, the size of the id map, and the traffic/general token counts.
    A disabled config copies the model unchanged (same facts, nothing removed).
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if source_dir.resolve() == out_dir.resolve():
        raise ValueError(f"out_dir {out_dir} is the source directory: write the trimmed model to a new directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: give a new or empty directory for the trimmed model")
    data, vocab, merges, fmt = read_bpe(source_dir)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype="auto")
    traffic = count_tokens(tokenizer, traffic_texts)
    general = count_tokens(tokenizer, general_texts)
    special = {int(a["id"]) for a in data.get("added_tokens") or ()} | set(tokenizer.all_special_ids)
    special |= configured_ids(model.config, model.generation_config)
    plan = plan_vocabulary(vocab, merges, special_ids=special, byte_alphabet_ids=byte_alphabet_ids(data),
                           traffic_counts=traffic, general_counts=general, config=config,
                           template_ids=template_ids(tokenizer))
    rows_before = model.get_input_embeddings().num_embeddings
    params_before = parameter_count(model)
    if config.enabled:
        shrink_embeddings(model, plan.kept_ids)
        remap_token_ids(model.config, plan.id_map)
        remap_token_ids(model.generation_config, plan.id_map)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    write_tokenizer_files(source_dir, out_dir, data, plan, fmt)
    facts = {
        "enabled": config.enabled,
        "vocab_size_before": plan.vocab_size_before,
        "vocab_size_after": plan.vocab_size_after,
        "embedding_rows_before": rows_before,
        "embedding_rows_after": model.get_input_embeddings().num_embeddings,
        "parameters_before": params_before,
        "parameters_after": parameter_count(model),
        "merges_before": plan.merges_before,
        "merges_after": len(plan.merges),
        "id_map_size": len(plan.kept_ids),
        "kept_by_reason": dict(plan.kept_by_reason),
        "traffic_tokens": sum(traffic.values()),
        "traffic_distinct_tokens": len(traffic),
        "general_tokens": sum(general.values()),
        "general_distinct_tokens": len(general),
    }
    record = {"kept_ids": list(plan.kept_ids), **{k: v for k, v in facts.items() if k != "kept_by_reason"}}
    (out_dir / KEPT_IDS_FILE).write_text(json.dumps(record), encoding="utf-8")
    return facts


def trim_within_budget(
    source_dir: str | Path,
    out_dir: str | Path,
    traffic_texts: Sequence[Text],
    general_texts: Sequence[Text],
    config: VocabTrimConfig,
    *,
    held_out: Sequence[Row],
    max_length: int,
    max_cost: float,
) -> tuple[dict[str, Any], float]:
    """The smallest trim (``general_token_steps``) whose loss on ``held_out`` stays within ``max_cost`` of the
    untrimmed model's, written to ``out_dir``; None's facts and no directory if even the largest costs more.

    Trimming is lossless on text its kept tokens cover, but a held-out word the traffic never used is cut into
    shorter pieces the model predicts worse (SmolLM2-135M on 930 hacker_jargon rows: 6.9% of held-out answer
    tokens dropped at 8,000 general tokens, +15% loss per byte; 1.8% at 32,000, +3.2%), so the size the
    specialty allows is measured, not assumed. Returns the facts (with every ``trials`` entry) and the
    untrimmed model's held-out loss, the reference later cuts are budgeted against."""
    out_dir = Path(out_dir)

    def loss_of(directory: Path) -> float:
        model, tokenizer = load_model(directory)
        return held_out_loss(model, tokenizer, held_out, max_length=max_length).loss

    reference = loss_of(Path(source_dir))
    vocab_size = len(AutoTokenizer.from_pretrained(source_dir))
    trials: list[dict[str, Any]] = []
    for general in general_token_steps(config, vocab_size):
        shutil.rmtree(out_dir, ignore_errors=True)
        facts = trim_vocabulary(source_dir, out_dir, traffic_texts, general_texts, replace(config, general_tokens=general))
        loss = loss_of(out_dir)
        within = within_prune_budget(loss, reference, max_cost)
        trials.append({"general_tokens": general, "vocab_size_after": facts["vocab_size_after"],
                       "parameters_after": facts["parameters_after"], "loss": loss, "loss_ratio": loss / reference,
                       "within": within})
        if within:
            return {**facts, "general_tokens": general, "loss_untrimmed": reference, "loss_after": loss,
                    "max_cost": max_cost, "trials": trials}, reference
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"enabled": False, "reason": f"every trim tried cost more than {max_cost:.0%} on the held-out rows",
            "loss_untrimmed": reference, "max_cost": max_cost, "trials": trials}, reference
