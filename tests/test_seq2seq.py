"""Seq2seq task (issue 16): readers, truncation counts, loss, generation, scorers, writers.

Models are tiny and random (or trained for a few seconds on a toy task) with MiniLM's
tokenizer: nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support import write

from hvdft.data.files import Shard
from hvdft.errors import HvdftError
from hvdft.tasks.seq2seq import (
    Seq2seqOptions,
    Seq2seqTask,
    apply_generation,
    decode_generated,
    featurize_pairs,
    generation_values,
    plan_model,
    token_loss_sum,
    training_generation,
    unescape,
)

BIN = Path(sys.executable).parent

# French has U+202F / U+00A0 before ! ? : ; in Tatoeba: kept as they are.
PAIRS = [
    ("Go.", "Va !"),
    ("Hi.", "Salut !"),
    ("Who are you?", "Qui êtes-vous\u202f?"),
    ("I'm hungry.", "J'ai faim."),
    ("Listen to me:", "Écoute-moi\u00a0:"),
    ("It is raining today.", "Il pleut aujourd'hui."),
    ("The cat is on the table.", "Le chat est sur la table."),
]


def pair_file(tmp_path: Path, name: str = "eng-fra.txt", extra: str = "") -> Path:
    return write(tmp_path, name, "".join(f"{en}\t{fr}{extra}\n" for en, fr in PAIRS))


def task(**options) -> Seq2seqTask:
    return Seq2seqTask(Seq2seqOptions(**options))


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(HvdftError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ============================================================================ readers


def test_task_contract() -> None:
    t = Seq2seqTask()
    assert (t.name, t.has_labels, t.model_inputs, t.targets) == ("seq2seq", False, ("input_ids", "attention_mask"),
                                                                  {"labels": -100})
    assert t.metric_names == ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum")
    assert t.Options is Seq2seqOptions


def test_pair_file_default_columns_and_languages(tmp_path: Path) -> None:
    path = pair_file(tmp_path)
    t = task()
    split = t.read(str(path), "train", Shard(0, 1))
    assert split.total == len(PAIRS) and split.ids == list(range(len(PAIRS)))
    assert [(e["source"], e["target"]) for e in split.examples] == PAIRS
    assert split.examples[2]["target"].endswith("\u202f?") and split.examples[4]["target"].endswith("\u00a0:")
    assert split.examples[3]["line"] == 4
    assert (t.use, t.default_metric) == ("translation", "bleu")
    # French -> English, by the file name's languages or by column
    for options in ({"source_lang": "fra", "target_lang": "eng"}, {"source_column": "1", "target_column": "0"},
                    {"source_column": "1"}):
        split = task(**options).read(str(path), "train", Shard(0, 1))
        assert [(e["source"], e["target"]) for e in split.examples] == [(fr, en) for en, fr in PAIRS], options


def test_pair_file_with_attribution_column(tmp_path: Path) -> None:
    path = pair_file(tmp_path, "fra.txt", "\tCC-BY 2.0 (France) Attribution: tatoeba.org #1 (x) & #2 (y)")
    split = task().read(str(path), "train", Shard(0, 1))
    assert [(e["source"], e["target"]) for e in split.examples] == PAIRS
    message = error_of(task(source_lang="fra").read, str(path), "train", Shard(0, 1))
    assert "fra.txt" in message and "--source-column 0/1" in message


def test_sharding_is_strided_and_parses_only_own_pairs(tmp_path: Path) -> None:
    lines = [f"{en}\t{fr}" for en, fr in PAIRS]
    lines[3] = "no tab here"  # pair 3 belongs to rank 1 of 2
    path = write(tmp_path, "bad.jsonl", "".join(json.dumps({"source": s.split("\t")[0],
                                                              "target": "" if i == 3 else "x"}) + "\n"
                                                  for i, s in enumerate(lines)))
    rank0 = task().read(str(path), "train", Shard(0, 2))
    assert rank0.total == len(PAIRS) and rank0.ids == [0, 2, 4, 6]
    assert error_of(task().read, str(path), "train", Shard(1, 2)) == f"{path}:4: empty target in column 'target'"
    good = pair_file(tmp_path)
    whole = task().read(str(good), "train", Shard(0, 1)).examples
    parts = [task().read(str(good), "train", Shard(r, 3)) for r in range(3)]
    assert sorted(i for p in parts for i in p.ids) == list(range(len(PAIRS)))
    for p in parts:
        assert p.examples == [whole[i] for i in p.ids]


def test_jsonl_csv_tsv_columns(tmp_path: Path) -> None:
    rows = [{"id": i, "article": en, "highlights": fr} for i, (en, fr) in enumerate(PAIRS)]
    jsonl = write(tmp_path, "d.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    csv = write(tmp_path, "d.csv", "id,article,highlights\n" + "".join(
        f'{r["id"]},"{r["article"]}","{r["highlights"]}"\n' for r in rows))
    tsv = write(tmp_path, "d.tsv", "id\tarticle\thighlights\n" + "".join(
        f'{r["id"]}\t{r["article"]}\t{r["highlights"]}\n' for r in rows))
    for path in (jsonl, csv, tsv):
        t = task()
        split = t.read(str(path), "validation", Shard(0, 1))
        assert split.name == "validation" and t.use is None  # the training split decides the use
        assert [(e["source"], e["target"]) for e in split.examples] == PAIRS, path
        t.read(str(path), "train", Shard(0, 1))
        assert (t.use, t.default_metric) == ("summarization", "rougeL")
        swapped = task(source_column="highlights", target_column="article").read(str(path), "train", Shard(0, 1))
        assert [(e["target"], e["source"]) for e in swapped.examples] == PAIRS
    generic = write(tmp_path, "g.jsonl", '{"input": "a b", "output": "b a"}\n')
    t = task()
    assert t.read(str(generic), "train", Shard(0, 1)).examples[0]["target"] == "b a"
    assert t.default_metric == "bleu"


def test_translation_rows(tmp_path: Path) -> None:
    path = write(tmp_path, "t.jsonl", "".join(json.dumps({"translation": {"en": en, "fr": fr}}) + "\n"
                                              for en, fr in PAIRS))
    t = task(source_lang="fr", target_lang="en")
    split = t.read(str(path), "train", Shard(0, 1))
    assert [(e["target"], e["source"]) for e in split.examples] == PAIRS
    assert t.default_metric == "bleu"
    assert error_of(task().read, str(path), "train", Shard(0, 1)) == (
        f"{path}:1: rows hold 'translation' pairs (en, fr): give --source-lang and --target-lang")
    assert error_of(task(source_lang="fr", target_lang="de").read, str(path), "train", Shard(0, 1)) == (
        f"{path}:1: no 'de' in 'translation' (languages: en, fr); use --target-lang")


DIALOGS = [
    {"dialog": [" Hi , how are you ? ", " Fine , thanks . And you ? ", " Great . "], "act": [1, 2, 1]},
    {"dialog": ["Where is the station ?", {"text": "Turn left ."}]},
    {"dialog": ["Only one turn ."]},
]


def test_dialogue_pairs_and_context_window(tmp_path: Path) -> None:
    path = write(tmp_path, "dd.jsonl", "".join(json.dumps(d) + "\n" for d in DIALOGS))
    t = task()
    split = t.read(str(path), "train", Shard(0, 1))
    assert split.total == 3  # 2 + 1 + 0 responses
    assert [(e["source"], e["target"], e["line"]) for e in split.examples] == [
        ("Hi , how are you ?", "Fine , thanks . And you ?", 1),
        ("Hi , how are you ? | Fine , thanks . And you ?", "Great .", 1),
        ("Where is the station ?", "Turn left .", 2),
    ]
    assert all(e["left_truncate"] for e in split.examples)
    assert (t.use, t.default_metric) == ("dialogue", "bleu")
    one = task(context_turns=1, turn_separator=" <t> ").read(str(path), "train", Shard(0, 1))
    assert one.examples[1]["source"] == "Fine , thanks . And you ?"
    two = task(context_turns=2, turn_separator=" <t> ").read(str(path), "train", Shard(0, 1))
    assert two.examples[1]["source"] == "Hi , how are you ? <t> Fine , thanks . And you ?"
    # sharding counts pairs, not dialogues
    assert task().read(str(path), "train", Shard(1, 2)).ids == [1]
    # predict: one example per dialogue, the reply to its end
    unlabelled = task(context_turns=2).read_unlabelled(str(path), Shard(0, 1))
    assert [e["source"] for e in unlabelled.examples] == [
        "Fine , thanks . And you ? | Great .", "Where is the station ? | Turn left .", "Only one turn ."]
    custom = write(tmp_path, "c.jsonl", json.dumps({"conv": ["a", "b"]}) + "\n")
    assert task(turns_column="conv").read(str(custom), "train", Shard(0, 1)).examples[0]["target"] == "b"


def test_dialogue_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "dd.jsonl", json.dumps(DIALOGS[0]) + "\n" + json.dumps({"dialog": ["a", "  "]}) + "\n")
    assert error_of(task().read, str(path), "train", Shard(0, 1)) == f"{path}:2: turn 1 of 'dialog' is empty"
    path = write(tmp_path, "d2.jsonl", json.dumps(DIALOGS[0]) + "\n" + json.dumps({"dialog": "a b"}) + "\n")
    assert error_of(task().read, str(path), "train", Shard(1, 2)) == (
        f"{path}:2: column 'dialog' holds a str, expected a list of turns")
    path = write(tmp_path, "d3.jsonl", json.dumps({"dialog": ["a", {"speaker": "B"}]}) + "\n")
    assert "turn 1 of 'dialog' is an object without a text" in error_of(task().read, str(path), "train", Shard(0, 1))


@pytest.mark.parametrize(
    "name, text, options, expected",
    [
        ("a.jsonl", '{"source": "a", "target": "b"}\n{"source": "c"}\n', {},
         "{path}:2: no column 'target' (columns: source); use --target-column"),
        ("a.jsonl", '{"source": "a", "target": "b"}\n{"source": " ", "target": "d"}\n', {},
         "{path}:2: empty source in column 'source'"),
        ("a.jsonl", '{"source": "a", "target": null}\n', {}, "{path}:1: empty target in column 'target'"),
        ("a.jsonl", '{"source": ["a"], "target": "b"}\n', {},
         "{path}:1: column 'source' holds a list, expected source text"),
        ("a.jsonl", '{"text": "a", "label": 1}\n', {},
         "{path}:1: no target column: none of target, tgt, output, summary, highlights, abstract, response, "
         "answer among the columns (text, label); use --target-column (the first row of a CSV/TSV file must "
         "name the columns)"),
        ("a.csv", "src,tgt\na,b\n", {"source_column": "de"},
         "{path}:2: no column 'de' (columns: src, tgt); use --source-column"),
        ("a.tsv", "source\ttarget\na\tb\nc\n", {}, "{path}:3: expected 2 fields (source, target), found 1"),
        ("eng-fra.txt", "Go.\tVa !\nHi.\n", {}, "{path}:2: expected 2 fields (0, 1), found 1"),
        ("eng-fra.txt", "Go.\tVa !\nHi.\t \n", {}, "{path}:2: empty target in column '1'"),
        ("eng-fra.txt", "Go.\tVa !\n", {"source_lang": "fr"},
         "{path}:1: --source-lang 'fr' is not a column of this pair file (its languages: eng, fra); "
         "or use --source-column 0/1"),
        ("a.jsonl", "", {}, "{path}: no pairs in file"),
        ("a.jsonl", '{"source": "a", "target": "b"}\n{oops}\n', {},
         "{path}:2: invalid JSON: Expecting property name enclosed in double quotes"),
    ],
)
def test_bad_rows_are_one_line_errors(tmp_path: Path, name: str, text: str, options: dict, expected: str) -> None:
    path = write(tmp_path, name, text)
    assert error_of(task(**options).read, str(path), "train", Shard(0, 1)) == expected.format(path=path)


def test_options_validation() -> None:
    for options, message in (({"max_target_length": 0}, "--max-target-length must be at least 1, got 0"),
                             ({"label_smoothing": 1.0}, "--label-smoothing must be below 1, got 1"),
                             ({"context_turns": -1}, "--context-turns must not be negative, got -1"),
                             ({"bleu_tokenize": "moses"}, "--bleu-tokenize must be one of"),
                             ({"source_lang": "en", "target_lang": "en"}, "are both 'en'")):
        assert message in error_of(Seq2seqOptions(**options).validate)


def test_read_unlabelled_formats(tmp_path: Path) -> None:
    plain = write(tmp_path, "in.txt", "Bonjour.\n\nMerci beaucoup.\n")
    split = task().read_unlabelled(str(plain), Shard(0, 1))
    assert [(e["source"], e["target"], e["line"]) for e in split.examples] == [("Bonjour.", None, 1),
                                                                               ("Merci beaucoup.", None, 3)]
    pairs = pair_file(tmp_path)
    split = task(source_lang="fra").read_unlabelled(str(pairs), Shard(0, 1))
    assert [e["source"] for e in split.examples] == [fr for _, fr in PAIRS]
    rows = write(tmp_path, "in.jsonl", '{"text": "a"}\n{"text": "b"}\n')
    split = task().read_unlabelled(str(rows), Shard(1, 2))
    assert (split.total, split.ids, split.examples[0]["source"]) == (2, [1], "b")


def test_hub_rows() -> None:
    datasets = pytest.importorskip("datasets")
    translation = datasets.Dataset.from_list([{"translation": {"en": en, "fr": fr}} for en, fr in PAIRS])
    t = task(source_lang="fr", target_lang="en")
    split = t.read_hub(translation, "train", Shard(1, 2), "opus")
    assert (split.total, split.ids, split.name, split.source) == (len(PAIRS), [1, 3, 5], "train", "opus[train]")
    assert [e["target"] for e in split.examples] == [PAIRS[i][0] for i in (1, 3, 5)]
    dialogues = datasets.Dataset.from_list([{"dialog": d["dialog"]} for d in DIALOGS[:1]] * 2)
    split = task().read_hub(dialogues, "validation", Shard(0, 2), "dd")
    assert (split.total, split.ids) == (4, [0, 2])
    assert [e["target"] for e in split.examples] == ["Fine , thanks . And you ?"] * 2
    withheld = datasets.Dataset.from_dict({"document": ["a", "b"], "summary": ["", ""]})
    assert task().read_hub(withheld, "test", Shard(0, 1), "xsum") is None
    bad = datasets.Dataset.from_dict({"document": ["a", ""], "summary": ["x", "y"]})
    assert error_of(task().read_hub, bad, "train", Shard(1, 2), "xsum") == (
        "xsum[train]: row 1: empty source in column 'document'")


def test_billsum_sample(shared_data: Path) -> None:
    """CRLF JSON lines: text -> summary, the CR is not part of the text."""
    t = task()
    split = t.read(str(shared_data / "billsum" / "us_train_sample_100.jsonl"), "train", Shard(0, 1))
    assert split.total == 100 and (t.use, t.default_metric) == ("summarization", "rougeL")
    assert all(not e["target"].endswith("\r") and e["source"].strip() for e in split.examples)


def test_tatoeba_file(shared_data: Path) -> None:
    split = task(source_lang="fra", target_lang="eng").read(
        str(shared_data / "tatoeba_en_fr" / "eng-fra.txt"), "train", Shard(1, 2))
    assert split.total == 167_130 and len(split.ids) == 83_565
    assert split.examples[0] == {"source": "Salut !", "target": "Hi.", "line": 2, "left_truncate": False}
    assert sum("\u202f" in e["source"] for e in split.examples) > 1000


# ============================================================================ features


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from hvdft.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm"))


def test_truncation_is_counted(tok) -> None:
    sources = ["one two three four five six seven eight", "one two", "a b c d e f g h i j k l"]
    targets = ["un deux trois quatre", "un", "x y z"]
    batch = {"source": sources, "target": targets, "example": [0, 1, 2], "left_truncate": [False, False, True]}
    f = featurize_pairs(batch, tok, max_source_length=6, max_target_length=3, drop_first=tok.cls_token_id)
    assert f["source_truncated"] == [1, 0, 1] and f["target_truncated"] == [1, 0, 1]
    assert [len(x) for x in f["input_ids"]] == [6, 4, 6]
    ids = f["input_ids"]
    assert tok.convert_ids_to_tokens(ids[0]) == ["[CLS]", "one", "two", "three", "four", "[SEP]"]
    # a dialogue context keeps its latest tokens
    assert tok.convert_ids_to_tokens(ids[2]) == ["[CLS]", "i", "j", "k", "l", "[SEP]"]
    # targets: the decoder start token ([CLS]) is not a label, eos ([SEP]) is, also after a cut
    assert [tok.convert_ids_to_tokens(x) for x in f["labels"]] == [["un", "deux", "[SEP]"], ["un", "[SEP]"],
                                                                   ["x", "y", "[SEP]"]]
    # a prefix stays in front of a left-cut dialogue context
    prefixed = featurize_pairs({"source": ["a b c d e f g h i j k l"], "target": [None], "example": [0],
                                "left_truncate": [True]}, tok, 8, 8, "reply: ")
    assert tok.convert_ids_to_tokens(prefixed["input_ids"][0]) == ["[CLS]", "reply", ":", "i", "j", "k", "l", "[SEP]"]
    assert prefixed["source_truncated"] == [1]
    exact = featurize_pairs({"source": ["a"], "target": ["x y"], "example": [0]}, tok, 3, 3, "", tok.cls_token_id)
    assert (exact["source_truncated"], exact["target_truncated"]) == ([0], [0])  # at the limit: not cut
    assert f["length"] == [len(a) + len(b) for a, b in zip(f["input_ids"], f["labels"], strict=True)]
    from transformers import BertConfig

    t = task(max_source_length=6, max_target_length=3)
    t.prepare(BertConfig(), tok, 64)
    split = SimpleNamespace(source="train.txt", total=3)
    counts = t.count_features(f)
    assert counts == {"sources": 3, "source_truncated": 2, "target_truncated": 2}
    assert t.describe_counts(split, counts, 64) == (
        "train.txt: 2 of 3 sources cut to --max-source-length 6, 2 targets cut to --max-target-length 3")
    assert t.describe_counts(split, {"sources": 3, "source_truncated": 0, "target_truncated": 0}, 64) == ""
    unlabelled = featurize_pairs({"source": ["a"], "target": [None], "example": [0]}, tok, 8, 8, "translate: ")
    assert unlabelled["labels"] == [[]] and tok.convert_ids_to_tokens(unlabelled["input_ids"][0])[1:3] == [
        "translate", ":"]


# ============================================================================ tiny models

SOURCES = ["le chat dort", "il pleut beaucoup aujourd'hui sur la ville", "bonjour", "merci beaucoup mon ami",
           "où est la gare la plus proche de la maison", "je suis fatigué", "nous allons au marché demain matin",
           "oui"]
TARGETS = ["the cat sleeps", "it rains a lot today in the city", "hello", "thanks a lot my friend",
           "where is the nearest station to the house", "i am tired", "we go to the market tomorrow morning", "yes"]


def tiny_bert(folder: Path, std: float = 0.02) -> Path:
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer (an encoder-only checkpoint)."""
    import shutil

    from transformers import BertConfig, BertModel

    from hvdft.models import resolve_model

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=std)
    BertModel(cfg).save_pretrained(folder)
    src = Path(resolve_model("minilm"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


def tiny_seq2seq(kind: str, std: float = 0.02):
    """A tiny random AutoModelForSeq2SeqLM for MiniLM's vocabulary: BART or T5."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "bart":
        cfg = BartConfig(vocab_size=30522, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=101, eos_token_id=102,
                         decoder_start_token_id=102, forced_eos_token_id=None, init_std=std)
        return BartForConditionalGeneration(cfg)
    cfg = T5Config(vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0,
                   eos_token_id=102, decoder_start_token_id=0, initializer_factor=std / 0.02)
    return T5ForConditionalGeneration(cfg)


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right padding to the longest row, as the engine's collate does."""
    longest = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (longest - len(r)) for r in rows], dtype=torch.long)


def batch_of(features: dict[str, list], rows: list[int], pad_id: int = 0) -> SimpleNamespace:
    """The engine's Batch for these feature rows (inputs padded with pad / 0, labels with -100)."""
    ids = [features["input_ids"][r] for r in rows]
    inputs = {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(x) for x in ids], 0)}
    return SimpleNamespace(inputs=inputs, targets={"labels": pad([features["labels"][r] for r in rows], -100)},
                           rows=rows)


def configured(kind: str, tmp_path: Path, tok, std: float = 0.02, **options):
    """(task, model) for 'warm-start' (EncoderDecoderModel from a tiny BERT), 'bart' or 't5'."""
    options.setdefault("max_target_length", 24)  # the tiny BERT decoder has 64 positions
    t = task(**options)
    if kind == "warm-start":
        from transformers import AutoConfig

        folder = tiny_bert(tmp_path / "bert", std)
        config = AutoConfig.from_pretrained(folder)
        t.prepare(config, tok, 64)
        return t, t.build_model(str(folder), config, tok)
    model = tiny_seq2seq(kind, std)
    t.prepare(model.config, tok, 64)
    apply_generation(model, training_generation(t.options, t.settings["max_target_length"]), t.plan)
    return t, model


def features_of(t: Seq2seqTask, tok, sources=SOURCES, targets=TARGETS) -> dict[str, list]:
    batch = {"source": list(sources), "target": list(targets), "example": list(range(len(sources)))}
    return t.featurize(batch, tok, {}, 64)


def test_plan_model(tok) -> None:
    from transformers import BertConfig, DistilBertConfig, GPT2Config

    plan = plan_model(BertConfig(), tok)
    assert (plan.kind, plan.decoder_start_token_id, plan.eos_token_id, plan.pad_token_id) == ("warm-start", 101, 102, 0)
    bart = plan_model(tiny_seq2seq("bart").config, tok)
    assert (bart.kind, bart.decoder_start_token_id, bart.eos_token_id) == ("seq2seq", 102, 102)
    t5 = plan_model(tiny_seq2seq("t5").config, tok)
    assert (t5.kind, t5.decoder_start_token_id, t5.eos_token_id, t5.pad_token_id) == ("seq2seq", 0, 102, 0)
    assert "'gpt2' checkpoints cannot be fine-tuned for seq2seq" in error_of(plan_model, GPT2Config(), tok)
    assert "'distilbert' checkpoints cannot" in error_of(plan_model, DistilBertConfig(), tok)


def test_warm_start_model_and_saved_folder(tmp_path: Path, tok) -> None:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    t, model = configured("warm-start", tmp_path, tok, num_beams=2, max_new_tokens=7, source_prefix="fr: ",
                          context_turns=2, turn_separator=" // ")
    assert t.plan.kind == "warm-start"
    assert type(model).__name__ == "EncoderDecoderModel"
    dec = model.config.decoder
    assert dec.is_decoder and dec.add_cross_attention and not model.config.encoder.is_decoder
    assert (model.config.decoder_start_token_id, model.config.eos_token_id, model.config.pad_token_id,
            model.config.vocab_size) == (101, 102, 0, 30522)
    # both halves start from the encoder checkpoint's weights
    assert torch.equal(model.encoder.embeddings.word_embeddings.weight,
                       model.decoder.bert.embeddings.word_embeddings.weight)
    out = tmp_path / "out"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "encoder-decoder" and saved["hvdft_seq2seq"]["source_prefix"] == "fr: "
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["num_beams"], gen["max_length"], gen["decoder_start_token_id"], gen["eos_token_id"]) == (
        2, 8, 101, 102)  # 7 new tokens after the decoder start token
    header = t.describe(model)
    assert header[0].startswith("model: encoder-decoder warm-started from the encoder-only checkpoint")
    assert "decoder start [CLS]=101, eos [SEP]=102, pad [PAD]=0" in header[0]
    assert header[-1].startswith("generation: num_beams=2 max_new_tokens=7 length_penalty=1.0 no_repeat_ngram_size=0")
    # hvdft predict: the stored settings are the defaults, the same generation is used
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(out)
    tok2 = AutoTokenizer.from_pretrained(out)
    p = Seq2seqTask()
    p.prepare(AutoConfig.from_pretrained(out), tok2, 64)
    lines = p.describe(None)
    assert p.settings["source_prefix"] == "fr: " and p.plan.kind == "seq2seq" and p.plan.decoder_start_token_id == 101
    assert any("case-insensitive (the tokenizer lowercases)" in line for line in lines)
    dialogues = write(tmp_path, "dd.jsonl", "".join(json.dumps(d) + "\n" for d in DIALOGS))
    assert p.read_unlabelled(str(dialogues), Shard(0, 1)).examples[0]["source"] == (
        "Fine , thanks . And you ? // Great .")  # the trained context window and separator
    f = features_of(p, tok2, SOURCES[:3], [None] * 3)
    assert tok2.decode(f["input_ids"][0]).startswith("[CLS] fr : le chat")
    b = batch_of(f, [0, 1, 2])
    model.eval()
    assert p.predictions([], None, b, reloaded) == t.predictions([], None, b, model)
    # a generation option given to predict replaces the stored one
    override = task(num_beams=1)
    override.prepare(reloaded.config, tok2, 64)
    override.predictions([], None, b, reloaded)
    assert generation_values(reloaded.generation_config) == {"num_beams": 1, "max_new_tokens": 7,
                                                             "length_penalty": 1.0, "no_repeat_ngram_size": 0}


def test_output_folder_loads_for_generation(tmp_path: Path, tok) -> None:
    """transformers 4.x: pipeline("text2text-generation") accepts the EncoderDecoderModel folder;
    transformers 5 removed that pipeline: AutoModelForSeq2SeqLM + generate() is the way."""
    import transformers
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    t, model = configured("warm-start", tmp_path, tok, std=0.3, num_beams=1, max_new_tokens=6)
    out = tmp_path / "out"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ours = t.predictions([], None, batch_of(features_of(t, tok, SOURCES[:1], [None]), [0]), model)[0][0]
    if int(transformers.__version__.split(".")[0]) < 5:
        generator = transformers.pipeline("text2text-generation", model=str(out))
        assert generator(SOURCES[0])[0]["generated_text"] == ours
    else:
        from transformers.pipelines import REMOVED_TASKS

        assert "text2text-generation" in REMOVED_TASKS
        loaded, tok2 = AutoModelForSeq2SeqLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
        ids = loaded.generate(**tok2([SOURCES[0]], return_tensors="pt"))
        assert tok2.decode(ids[0], skip_special_tokens=True) == ours


@pytest.mark.parametrize("kind", ["warm-start", "bart", "t5"])
def test_loss_is_the_summed_token_cross_entropy(kind: str, tmp_path: Path, tok) -> None:
    t, model = configured(kind, tmp_path, tok)
    model.eval()  # no dropout: the sums below must match exactly
    f = features_of(t, tok)
    rows = list(range(len(SOURCES)))
    b = batch_of(f, rows)
    labels = b.targets["labels"]
    loss, outputs = t.loss(model, b)
    count = t.target_count(b)
    assert count == sum(len(x) for x in f["labels"])
    # the reference formula: -log p(y_t | y_<t, x), summed over non-padding target tokens
    logp = torch.log_softmax(outputs.logits.double(), dim=-1)
    mask = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    assert loss.item() == pytest.approx(nll.sum().item(), rel=1e-5)
    # teacher forcing matches the model's own shift-right: its mean loss x token count
    hf = model(**b.inputs, labels=labels)
    assert loss.item() == pytest.approx(hf.loss.item() * count, rel=1e-5)
    # global normalisation: two "ranks" with their own padding == one batch
    half = [batch_of(f, rows[::2]), batch_of(f, rows[1::2])]
    parts = [t.loss(model, h)[0].item() for h in half]
    assert sum(t.target_count(h) for h in half) == count
    assert sum(parts) / count == pytest.approx(loss.item() / count, rel=1e-5)


def test_targets_and_generations_may_fill_every_decoder_position(tmp_path: Path, tok) -> None:
    """The tiny BERT decoder has 64 positions: a 64-token target trains and 64 new tokens
    generate; 65 of either is refused before training, naming the limit."""
    t, model = configured("warm-start", tmp_path, tok, max_target_length=64, max_new_tokens=64)
    model.eval()
    long_target = " ".join(["chat"] * 80)  # one token per word: cut to 64 with eos
    f = features_of(t, tok, sources=[SOURCES[0]], targets=[long_target])
    assert len(f["labels"][0]) == 64 and f["target_truncated"] == [1]
    loss, _ = t.loss(model, batch_of(f, [0]))
    assert torch.isfinite(loss)
    ids = torch.tensor([f["input_ids"][0]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                         num_beams=1, do_sample=False)
    assert out.shape[1] == 65  # the start token and 64 new ones
    for options, message in [({"max_target_length": 65}, "--max-target-length 65 does not fit the decoder's 64"),
                             ({"max_target_length": 24, "max_new_tokens": 65},
                              "--max-new-tokens 65 does not fit the decoder's 64")]:
        assert message in error_of(configured, "warm-start", tmp_path / str(len(message)), tok, **options)


def test_label_smoothing(tmp_path: Path, tok) -> None:
    t, model = configured("bart", tmp_path, tok, std=0.3, label_smoothing=0.1)  # peaked: smoothing matters
    model.eval()
    b = batch_of(features_of(t, tok), list(range(len(SOURCES))))
    loss, outputs = t.loss(model, b)
    labels = b.targets["labels"]
    logp = torch.log_softmax(outputs.logits.double(), dim=-1)
    mask = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    uniform = -logp.mean(dim=-1)
    expected = ((1 - 0.1) * nll + 0.1 * uniform)[mask].sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = token_loss_sum(outputs.logits, labels).item()
    assert plain == pytest.approx(nll[mask].sum().item(), rel=1e-5) and loss.item() != pytest.approx(plain, rel=1e-3)


def test_decode_generated_cuts_at_eos_and_drops_padding(tok) -> None:
    cat, dog, sleeps = tok.convert_tokens_to_ids(["cat", "dog", "sleeps"])
    sequences = torch.tensor([[101, cat, sleeps, 102, 0, 0], [101, dog, 102, cat, 0, 0],
                              [101, cat, cat, dog, dog, cat]])
    assert decode_generated(sequences, tok, 102) == [("cat sleeps", False), ("dog", False),
                                                     ("cat cat dog dog cat", True)]
    assert decode_generated(sequences, tok, [102, sleeps])[0] == ("cat", False)


def _eos_with_mixed_lengths(model, tok, f) -> int:
    """A token the random model emits at different steps for different inputs, used as eos so
    that rows of one batch end at different lengths (finished rows are then padded)."""
    b = batch_of(f, list(range(len(f["input_ids"]))))
    model.generation_config.eos_token_id = 1  # [unused0]: never produced
    seqs = model.generate(**b.inputs).tolist()
    best, spread = None, 0
    for token in sorted({t for s in seqs for t in s[2:]} - {0, 101, 102}):
        firsts = {s.index(token, 1) for s in seqs if token in s[1:]}
        if len(firsts) > spread:
            best, spread = token, len(firsts)
    assert best is not None and spread >= 2
    return best


@pytest.mark.parametrize("kind, beams", [("warm-start", 1), ("warm-start", 3), ("bart", 1), ("bart", 3), ("t5", 2)])
def test_batch_generation_equals_one_at_a_time(kind: str, beams: int, tmp_path: Path, tok) -> None:
    """Right padding inside a batch, and the pad tokens after a finished row, never reach an output;
    sharding the inputs over ranks and regrouping them in other batches changes nothing."""
    t, model = configured(kind, tmp_path, tok, std=0.3, num_beams=beams, max_new_tokens=8, no_repeat_ngram_size=3)
    model = model.double().eval()
    f = features_of(t, tok, SOURCES, [None] * len(SOURCES))
    eos = _eos_with_mixed_lengths(model, tok, f)
    model.generation_config.eos_token_id = eos
    alone = [t.predictions([], None, batch_of(f, [i]), model)[0] for i in range(len(SOURCES))]
    together = t.predictions([], None, batch_of(f, list(range(len(SOURCES)))), model)
    assert together == alone
    assert len({text for text, _ in alone}) > 1, "outputs depend on the input"
    assert any(not cut for _, cut in alone), "some rows end with eos before max_new_tokens"
    assert len({len(text.split()) for text, _ in alone}) > 1, "rows of different lengths"
    # two ranks, strided; each generates its shard in length-sorted batches of 3; gathered by id
    gathered = {}
    for rank in range(2):
        mine = list(range(rank, len(SOURCES), 2))
        for start in range(0, len(mine), 3):
            rows = sorted(mine, key=lambda r: -len(f["input_ids"][r]))[start:start + 3]
            gathered.update(zip(rows, t.predictions([], None, batch_of(f, rows), model), strict=True))
    assert [gathered[i] for i in range(len(SOURCES))] == alone


# ============================================================================ scoring and writers

REFS = ["The cat sat on the mat.", "There is a cat on the mat.\nIt sleeps.", "Hello, world!",
        "It's raining\tcats and dogs.", "Qui êtes-vous\u202f?"]
HYPS = ["the cat sat on a mat .", "A cat is on the mat.\nIt is sleeping.", "Hello world!",
        "It is raining cats and dogs.", "Qui es-tu ?"]


def test_written_predictions_round_trip(tmp_path: Path) -> None:
    examples = [{"source": f"src\\{i}\twith tab", "target": r, "line": i} for i, r in enumerate(REFS)]
    Seq2seqTask().write_predictions(tmp_path, "test", examples, [(h, False) for h in HYPS])
    lines = (tmp_path / "test_predictions.tsv").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "source\treference\thypothesis" and lines[-1] == ""
    rows = [[unescape(c) for c in line.split("\t")] for line in lines[1:-1]]
    assert rows == [[e["source"], e["target"], h] for e, h in zip(examples, HYPS, strict=True)]
    Seq2seqTask().write_unlabelled_predictions(tmp_path / "p.tsv", examples, [(h, True) for h in HYPS])
    assert (tmp_path / "p.tsv").read_text().splitlines()[:2] == ["source\thypothesis", "src\\\\0\\twith tab\t"
                                                                 "the cat sat on a mat ."]


def _from_tsv(path: Path) -> tuple[list[str], list[str]]:
    rows = [[unescape(c) for c in line.split("\t")] for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    return [r[1] for r in rows], [r[2] for r in rows]


@pytest.mark.parametrize("lowercase", [False, True])
def test_metrics_equal_the_sacrebleu_command_line(tmp_path: Path, lowercase: bool) -> None:
    refs = [r.replace("\n", " ") for r in REFS]  # sacrebleu reads one sentence per line
    examples = [{"source": "s", "target": r, "line": None} for r in refs]
    t = task(lowercase_scores=lowercase)
    t.write_predictions(tmp_path, "test", examples, [(h.replace("\n", " "), False) for h in HYPS])
    refs_read, hyps_read = _from_tsv(tmp_path / "test_predictions.tsv")
    (tmp_path / "ref.txt").write_text("\n".join(refs_read) + "\n", encoding="utf-8")
    (tmp_path / "hyp.txt").write_text("\n".join(hyps_read) + "\n", encoding="utf-8")
    cmd = [str(BIN / "sacrebleu"), str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"), "-m", "bleu", "chrf",
           "-b", "-w", "4"] + ["-lc", "--chrf-lowercase"] * lowercase
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout)
    metrics, report = t.score(examples, [(h, False) for h in hyps_read])
    assert [round(metrics["bleu"], 4), round(metrics["chrf"], 4)] == out
    assert ("case:lc" in report) == lowercase and "tok:13a" in report


def test_metrics_equal_the_rouge_score_command_line(tmp_path: Path) -> None:
    examples = [{"source": "s", "target": r, "line": None} for r in REFS]
    t = task()
    t.write_predictions(tmp_path, "test", examples, [(h, False) for h in HYPS])
    refs_read, hyps_read = _from_tsv(tmp_path / "test_predictions.tsv")
    assert refs_read == REFS  # newlines and tabs survive the TSV
    sep = "\n@@@\n"  # records hold newlines (rougeLsum's sentence breaks)
    (tmp_path / "ref.txt").write_text(sep.join(refs_read) + sep, encoding="utf-8")
    (tmp_path / "hyp.txt").write_text(sep.join(hyps_read) + sep, encoding="utf-8")
    cmd = [sys.executable, "-m", "rouge_score.rouge", f"--target_filepattern={tmp_path / 'ref.txt'}",
           f"--prediction_filepattern={tmp_path / 'hyp.txt'}", f"--output_filename={tmp_path / 'scores.csv'}",
           "--rouge_types=rouge1,rouge2,rougeL,rougeLsum", "--use_stemmer=true", "--noaggregate", f"--delimiter={sep}"]
    subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    lines = (tmp_path / "scores.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [list(map(float, ln.split(",")[1:])) for ln in lines[1:]]
    assert len(rows) == len(REFS)
    metrics, report = t.score(examples, [(h, False) for h in hyps_read])
    for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        column = header.index(f"{kind}-F") - 1
        assert metrics[kind] == pytest.approx(100 * sum(r[column] for r in rows) / len(rows), abs=1e-3), kind
    assert metrics["rougeLsum"] != pytest.approx(metrics["rougeL"], abs=1e-6), "newlines split sentences"
    assert "use_stemmer=True" in report


def test_score_counts_generations_cut_at_max_new_tokens() -> None:
    metrics, report = Seq2seqTask().score([{"target": "the cat sat on the mat"}, {"target": "d"}],
                                          [("the cat sat on the mat", False), ("x y", True)])
    assert metrics["cut_generations"] == 1.0 and "without eos: 1 of 2" in report
    assert 0 < metrics["bleu"] <= 100 and metrics["rouge1"] == pytest.approx(50.0)


@pytest.mark.slow
def test_generations_gathered_from_two_ranks_equal_one_process(tmp_path: Path, tok) -> None:
    """Real Horovod, through the engine (inference.load_model, tokenize, Evaluator): each rank
    generates its strided shard in its own length-sorted, padded batches; rank 0's gathered
    list equals a 1-process run with other batches, in input order, with outputs of different
    lengths (rows that finish early are padded by generate)."""
    from support import ROOT, horovodrun, job_env, run

    t, model = configured("warm-start", tmp_path, tok, std=0.3, num_beams=2, max_new_tokens=8)
    model.eval()
    f = features_of(t, tok, SOURCES, [None] * len(SOURCES))
    model.generation_config.eos_token_id = _eos_with_mixed_lengths(model, tok, f)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    sources = SOURCES + [s + " " + s for s in SOURCES[:5]]  # 13 pairs: shards of 7 and 6
    data = write(tmp_path, "test.txt", "".join(f"{s}\tx\n" for s in sources))
    script = str(ROOT / "tests" / "scripts" / "seq2seq_gather.py")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    e = job_env(HVDFT_CACHE=str(tmp_path / "cache"))
    run([sys.executable, script, str(tmp_path / "model"), str(data), str(one), "5"], timeout=300, env=e)
    run([*horovodrun(2), sys.executable, script, str(tmp_path / "model"), str(data), str(two), "3"], timeout=300, env=e)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world"], b["world"]) == (1, 2)
    assert a["sources"] == b["sources"] == sources
    assert b["hypotheses"] == a["hypotheses"]
    loss_a, loss_b = a["metrics"].pop("loss"), b["metrics"].pop("loss")
    assert b["metrics"] == a["metrics"], "the scores of identical texts"
    # token_loss_sum adds in float32 (as training does): other batches, other rounding
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert len({len(text.split()) for text, _ in b["hypotheses"]}) > 1, "outputs of different lengths"
    assert any(not cut for _, cut in b["hypotheses"]), "some end with eos before max_new_tokens"


def test_multilingual_language_codes() -> None:
    """mBART-50 / NLLB tokenizers get their src_lang/tgt_lang codes (as run_translation.py sets them);
    the offline machine has no such tokenizer, so a stand-in with their attributes is used."""
    from hvdft.tasks.seq2seq import set_language_codes

    class MBart50TokenizerFast:
        all_special_tokens = ["<s>", "</s>", "<pad>", "en_XX", "fr_XX", "fa_IR", "zh_CN"]
        src_lang = tgt_lang = None

    tok = MBart50TokenizerFast()
    assert set_language_codes(tok, "fr", "en_XX") == ("fr_XX", "en_XX") and (tok.src_lang, tok.tgt_lang) == (
        "fr_XX", "en_XX")
    assert "--target-lang 'f' is not one of the tokenizer's language codes" in error_of(
        set_language_codes, tok, "fr", "f")
    assert "needs --source-lang (one of: en_XX, fa_IR, fr_XX, zh_CN)" in error_of(set_language_codes, tok, None, "en")
    assert set_language_codes(object(), "fr", "en") == (None, None)  # other tokenizers: nothing to set


def test_plain_reference_loop_runs(tmp_path: Path) -> None:
    """benchmarks/plain_seq2seq.py: a leak-free split, then 2 steps and scoring on a tiny model."""
    from support import ROOT

    script = str(ROOT / "benchmarks" / "plain_seq2seq.py")
    lines = [f"{en}\t{fr}" for en, fr in PAIRS] + [f"{en} {i}\t{fr} {i}" for i, (en, fr) in enumerate(PAIRS)]
    lines.append(f"{PAIRS[0][0]}\tAllez !")  # shares its English side with another pair
    data = write(tmp_path, "eng-fra.txt", "\n".join(lines) + "\n")
    subprocess.run([sys.executable, script, "split", "--input", str(data), "--out", str(tmp_path / "s"), "--test", "4",
                    "--seed", "1"], check=True, capture_output=True, text=True, timeout=120)
    train = (tmp_path / "s" / "train.txt").read_text().splitlines()
    test = (tmp_path / "s" / "test.txt").read_text().splitlines()
    assert len(test) == 4 and set(train) | set(test) <= set(lines)
    held = {cell for line in test for cell in line.split("\t")}
    assert not {cell for line in train for cell in line.split("\t")} & held, "no held-out sentence in training"
    model = tiny_bert(tmp_path / "bert")
    results, predictions = tmp_path / "r.json", tmp_path / "p.tsv"
    subprocess.run([sys.executable, script, "train", "--model", str(model), "--train-file", str(tmp_path / "s" /
                    "train.txt"), "--test-file", str(tmp_path / "s" / "test.txt"), "--batch-size", "4", "--steps", "2",
                    "--max-target-length", "16", "--max-new-tokens", "4", "--num-beams", "2", "--log-every", "1",
                    "--results", str(results), "--predictions", str(predictions)],
                   check=True, capture_output=True, text=True, timeout=600)
    r = json.loads(results.read_text())
    assert (r["steps"], r["test_pairs"], r["generation"]["num_beams"]) == (2, 4, 2)
    assert 0 <= r["bleu"] <= 100 and r["bleu_signature"].startswith("nrefs:1|case:lc")
    rows = predictions.read_text(encoding="utf-8").splitlines()
    assert rows[0] == "source\treference\thypothesis" and [r.split("\t")[:2] for r in rows[1:]] == [
        line.split("\t")[::-1] for line in test]
