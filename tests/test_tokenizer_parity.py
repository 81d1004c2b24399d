"""data.py's tokenization and chat templates against transformers (the reference users train and chat with).

- data.load_tokenizer(d).encode(text) == AutoTokenizer.from_pretrained(d)(text).input_ids on real HH-RLHF and
  ShareGPT texts for the four real tokenizers, edge cases included; the one documented difference is pinned.
- train_and_eval_pairs' origin["chat_template"], saved with Tok.save, makes transformers' apply_chat_template give
  exactly the prompt tokens training used.
"""
import itertools
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import data

transformers = pytest.importorskip("transformers")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZERS = ["llama2", "mistral", "gpt2", "opt"]
EDGE_CASES = ["  two  spaces", " leading", "trailing ", "a\n\n b\t c", "tab\tand\nnewline ", "", " ", "é ü 漢字",
              "\n\nHuman: hi\n\nAssistant:", "x </s> y"]


def shared(*parts):
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real reference data not found: {path}")
    return path


@pytest.fixture(scope="module")
def real_texts():
    """~400 texts: HH-RLHF transcripts and ShareGPT turns, as they are in the data."""
    hh = pq.read_table(shared("hh-rlhf-harmless-test.parquet")).slice(0, 100).to_pylist()
    sharegpt = pq.read_table(shared("llamafactory-dpo-en-demo.parquet")).slice(0, 60).to_pylist()
    texts = [row[side] for row in hh for side in ("chosen", "rejected")]
    for row in sharegpt:
        texts += [turn["value"] for turn in row["conversations"]] + [row["chosen"]["value"], row["rejected"]["value"]]
    return texts


def both(name):
    folder = shared("tokenizers", name)
    return data.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_encode_equals_transformers(name, real_texts):
    ours, theirs = both(name)
    texts = real_texts + EDGE_CASES
    got, expected = ours.encode_many(texts), theirs(texts).input_ids
    differ = [(t, g, e) for t, g, e in zip(texts, got, expected) if g != e]
    assert not differ, differ[:3]


@pytest.mark.parametrize("name, text", [("llama2", "<s>[INST] hi [/INST]"), ("mistral", "<s>hi"),
                                        ("opt", "</s><s>[INST] hi [/INST]")])
def test_text_that_starts_with_bos_gets_no_second_bos(name, text):
    """The one difference, documented: transformers' tokenizer(text) prepends BOS to a text that starts with it
    (two BOS); data.py does not, as apply_chat_template (add_special_tokens=False) does not for a template that
    renders bos_token itself, so a run trains on the tokens the exported model is chatted with."""
    ours, theirs = both(name)
    expected = theirs(text).input_ids
    assert expected[0] == expected[1] == ours.bos_id
    assert ours.encode(text) == expected[1:] == theirs(text, add_special_tokens=False).input_ids


def test_llama2_spaces_follow_transformers_not_the_legacy_normalizer():
    """Llama-2's tokenizer.json has a legacy Prepend("▁") normalizer, which transformers 5 replaces by a Metaspace
    pre-tokenizer: " leading" is "▁leading", not "▁" + "▁leading" (as the file alone, and sentencepiece, give)."""
    ours, _ = both("llama2")
    from tokenizers import Tokenizer
    as_file = Tokenizer.from_file(str(shared("tokenizers", "llama2", "tokenizer.json")))
    assert ours.tokenizer.id_to_token(ours.encode(" leading")[1]) == "▁leading"
    assert as_file.encode(" leading").tokens == ["<s>", "▁", "▁leading"]
    assert ours.decode(ours.encode("  two  spaces"), skip_special_tokens=True) == " two  spaces"


def sharegpt_subset(tmp_path, n=40):
    path = tmp_path / "sharegpt.parquet"
    pq.write_table(pq.read_table(shared("llamafactory-dpo-en-demo.parquet")).slice(0, n), path)
    return path


@pytest.mark.parametrize("name, template", itertools.product(TOKENIZERS + ["synthetic"], ["auto", "llama2_chat.jinja"]))
def test_exported_chat_template_gives_the_training_prompt_tokens(tmp_path, name, template):
    tok = data.load_tokenizer("synthetic" if name == "synthetic" else shared("tokenizers", name))
    template_arg = template if template == "auto" else str(shared("chat_templates", template))
    source = sharegpt_subset(tmp_path)
    pairs, _, origin = data.train_and_eval_pairs(source, None, None, None, 0, 0, tok, tmp_path, log=lambda s: None,
                                                 template=template_arg, max_length=10 ** 6, max_prompt_length=10 ** 6)
    rendered_with = tok.chat_template if template == "auto" else Path(template_arg).read_text()
    if template == "auto" and name != "synthetic":
        rendered_with = data.ZEPHYR_TEMPLATE                    # the real tokenizers have no template of their own
    assert origin["chat_template"] in (rendered_with, "{{ bos_token }}" + rendered_with)
    assert pairs.stats["kept"] == pairs.stats["rows"] == 40       # so pair i is row i
    assert pairs.stats["note/boundary_merge"] == 0                # so prompt_ids is the prompt's whole tokenization
    data.Tok(tok.tokenizer, tok.bos_token, tok.eos_token, chat_template=origin["chat_template"]).save(tmp_path / "x")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "x")
    for i, (_, layout, row) in enumerate(data.read_rows([source])):
        history = data.parse_row(layout, row, "", Counter()).history
        ids = exported.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert ids == pairs[i].prompt_ids.tolist(), i


def test_raw_text_exports_no_chat_template(tmp_path):
    path = tmp_path / "hh.parquet"
    pq.write_table(pq.read_table(shared("hh-rlhf-harmless-test.parquet")).slice(0, 20), path)
    tok = data.load_tokenizer(shared("tokenizers", "llama2"))
    for template in ("auto", "raw"):
        *_, origin = data.train_and_eval_pairs(path, None, None, None, 0, 0, tok, tmp_path, log=lambda s: None,
                                               template=template)
        assert origin["chat_template"] is None
