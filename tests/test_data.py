"""data.py: layouts, templates, tokenization at the prompt/response boundary, filters, packing, batching."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
from data import DataError, PairBatcher, TokenizedPair, build_pairs, pack_pairs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def shared(*parts):
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real reference data not found: {path}")
    return path


def write(path, columns, row_group_size=None):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def tok():
    return data.synthetic_tokenizer()


def texts(tok, pair):
    return tok.decode(pair.prompt_ids), tok.decode(pair.chosen_ids), tok.decode(pair.rejected_ids)


# ----------------------------------------------------------------------------- chat templates

def test_embedded_zephyr_template_is_the_official_one():
    assert data.ZEPHYR_TEMPLATE == shared("chat_templates", "zephyr.jinja").read_text()


def test_templates_render_like_transformers():
    folder = shared("chat_templates")
    cases = json.loads((folder / "expected_renders.json").read_text())
    for case in cases:
        out = data.render_chat((folder / case["template"]).read_text(), case["messages"],
                               add_generation_prompt=case["add_generation_prompt"],
                               bos_token=case["bos_token"], eos_token=case["eos_token"])
        assert out == case["expected"], case["template"]


def test_multi_turn_renders_with_zephyr_and_keeps_the_history(tmp_path, tok):
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    prompt = data.render_chat(data.ZEPHYR_TEMPLATE, history, add_generation_prompt=True)
    assert prompt == ("<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n"
                      "<|user|>\n2+2?</s>\n<|assistant|>\n")
    chosen = history[1:] + [{"role": "assistant", "content": "4"}]
    rejected = history[1:] + [{"role": "assistant", "content": "5"}]
    f = write(tmp_path / "m.parquet", {"prompt": ["Hi"], "chosen": [[history[0]] + chosen],
                                       "rejected": [[history[0]] + rejected]})
    pairs = build_pairs(f, tok)
    assert pairs.layout == "messages" and len(pairs) == 1
    p, c, r = texts(tok, pairs[0])
    assert p == "<s>" + prompt and c == "4</s>\n" and r == "5</s>\n"   # the template wrote EOS: not added twice
    assert (pairs[0].chosen_ids == tok.eos_id).sum() == 1


def test_template_raise_exception_names_the_row(tmp_path):
    tok = data.load_tokenizer("synthetic")
    f = write(tmp_path / "s.parquet", {"conversations": [[{"from": "human", "value": "a"}],
                                                         [{"from": "system", "value": "s"}, {"from": "human", "value": "b"}]],
                                       "chosen": [{"from": "gpt", "value": "x"}] * 2,
                                       "rejected": [{"from": "gpt", "value": "y"}] * 2})
    template = shared("chat_templates", "mistral_7b_instruct_v0.1.jinja")
    with pytest.raises(DataError, match=r"row 1: chat template refused .*alternate"):
        build_pairs(f, tok, template=str(template))


# ----------------------------------------------------------------------------- layouts

def test_layout_a_raw_and_zephyr(tmp_path, tok):
    f = write(tmp_path / "a.parquet", {"prompt": ["Q: 1+1=", "Say hi"], "chosen": [" 2", "hi"],
                                       "rejected": [" 3", "bye"], "extra": [1, 2]})
    raw = build_pairs(f, tok, template="raw")
    assert raw.layout == "pairs" and texts(tok, raw[0]) == ("<s>Q: 1+1=", " 2</s>", " 3</s>")
    zephyr = build_pairs(f, tok)                  # auto: the tokenizer's template (Zephyr)
    assert texts(tok, zephyr[1]) == ("<s><|user|>\nSay hi</s>\n<|assistant|>\n", "hi</s>\n", "bye</s>\n")


def test_layout_b_ultrafeedback_messages(tmp_path, tok):
    u = lambda s: {"role": "user", "content": s}
    a = lambda s: {"role": "assistant", "content": s}
    f = write(tmp_path / "b.parquet", {
        "prompt": ["p0", "p1", "p2"],
        "chosen": [[u("p0"), a("yes")], [u("p1"), a("x"), u("more"), a("good")], [a("alone")]],
        "rejected": [[u("p0"), a("no")], [u("p1"), a("DIFFERENT"), u("more"), a("bad")], [a("other")]],
        "score_chosen": [1.0, 2.0, 3.0]})
    pairs = build_pairs(f, tok, template="raw")
    assert pairs.stats["dropped/history_mismatch"] == 1 and len(pairs) == 2
    assert texts(tok, pairs[0]) == ("<s>\n\nHuman: p0\n\nAssistant:", " yes</s>", " no</s>")
    assert texts(tok, pairs[1])[0] == "<s>\n\nHuman: p2\n\nAssistant:"    # empty history: the prompt column


def test_layout_c_hh_rlhf_prompt_is_the_common_history(tmp_path, tok):
    base = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:"
    f = write(tmp_path / "c.parquet", {
        "chosen": [base + " 4", base + " 4\n\nHuman: sure?\n\nAssistant: yes"],
        "rejected": [base + " 5", base + " 5"]})
    raw = build_pairs(f, tok)                      # auto = raw text for HH-RLHF
    assert raw.layout == "hh"
    assert texts(tok, raw[0]) == ("<s>" + base, " 4</s>", " 5</s>")
    # the chosen answer holds a further turn: the prompt still stops at the last *shared* "Assistant:"
    assert texts(tok, raw[1]) == ("<s>" + base, " 4\n\nHuman: sure?\n\nAssistant: yes</s>", " 5</s>")
    assert raw.stats["note/hh_answer_contains_turns"] == 1
    chat = build_pairs(f, tok, template="zephyr")  # transcripts parsed into messages
    assert texts(tok, chat[0])[0] == "<s><|user|>\nhi</s>\n<|assistant|>\nhello</s>\n<|user|>\n2+2?</s>\n<|assistant|>\n"
    assert texts(tok, chat[0])[1] == "4</s>\n"


def test_layout_d_sharegpt_with_system_and_column_overrides(tmp_path, tok):
    f = write(tmp_path / "d.parquet", {
        "conv": [[{"from": "system", "value": "S"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                  {"from": "human", "value": "q2"}]],
        "good": [{"from": "gpt", "value": "right"}], "bad": [{"from": "gpt", "value": "wrong"}]})
    with pytest.raises(DataError, match=r"no known preference layout in columns \['conv', 'good', 'bad'\]"):
        build_pairs(f, tok)
    pairs = build_pairs(f, tok, columns={"conversations": "conv", "chosen": "good", "rejected": "bad"})
    assert pairs.layout == "sharegpt"
    assert texts(tok, pairs[0]) == ("<s><|system|>\nS</s>\n<|user|>\nq1</s>\n<|assistant|>\na1</s>\n<|user|>\nq2</s>\n"
                                    "<|assistant|>\n", "right</s>\n", "wrong</s>\n")


def test_folder_glob_split_and_row_groups(tmp_path, tok):
    folder = tmp_path / "repo" / "data"
    folder.mkdir(parents=True)
    rows = {"prompt": [f"q{i}" for i in range(10)], "chosen": ["a"] * 10, "rejected": ["b"] * 10}
    write(folder / "train_prefs-00000-of-00001.parquet", rows, row_group_size=3)
    write(folder / "test_prefs-00000-of-00001.parquet", {k: v[:2] for k, v in rows.items()})
    assert [f.name for f in data.resolve_files(tmp_path / "repo", "train_prefs")] == ["train_prefs-00000-of-00001.parquet"]
    assert len(data.resolve_files(str(folder / "*.parquet"))) == 2
    pairs = build_pairs(tmp_path / "repo", tok, split="train_prefs", template="raw")
    assert [texts(tok, p)[0] for p in pairs] == [f"<s>q{i}" for i in range(10)]    # order kept across row groups
    with pytest.raises(FileNotFoundError, match="split 'valid'"):
        data.resolve_files(tmp_path / "repo", "valid")


def test_folder_of_several_splits_needs_a_split(tmp_path, tok, capsys):
    rows = {"prompt": ["q0", "q1"], "chosen": ["a", "a"], "rejected": ["b", "b"]}
    hub = tmp_path / "hub" / "data"                          # a Hub snapshot: data/<split>-00000-of-00001.parquet
    hub.mkdir(parents=True)
    write(hub / "train_prefs-00000-of-00001.parquet", rows)
    write(hub / "test_prefs-00000-of-00001.parquet", rows)
    with pytest.raises(DataError, match=r"hub holds the parquet files of 2 splits \(test_prefs, train_prefs\): "
                                        r"give the split to read"):
        build_pairs(tmp_path / "hub", tok)
    assert data.main(["--data", str(tmp_path / "hub")]) == 2          # one line, no traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 splits" in err and "Traceback" not in err
    for name in ("train", "test"):                             # <split>/ folders
        (tmp_path / "folders" / name).mkdir(parents=True)
        write(tmp_path / "folders" / name / "0000.parquet", rows)
    with pytest.raises(DataError, match=r"2 splits \(test, train\)"):
        data.resolve_files(tmp_path / "folders")
    assert [f.parent.name for f in data.resolve_files(tmp_path / "folders", "test")] == ["test"]
    assert len(data.resolve_files(str(tmp_path / "folders" / "*" / "*.parquet"))) == 2   # a glob reads them all
    # no split structure (parts of one dataset, or one split alone): the folder is read whole
    (tmp_path / "parts").mkdir()
    for name in ("en.parquet", "fr.parquet"):
        write(tmp_path / "parts" / name, rows)
    assert len(data.resolve_files(tmp_path / "parts")) == 2
    (tmp_path / "one").mkdir()
    write(tmp_path / "one" / "train-00000-of-00002.parquet", rows)
    write(tmp_path / "one" / "train-00001-of-00002.parquet", rows)
    assert len(data.resolve_files(tmp_path / "one")) == 2


def test_a_split_given_with_a_file_or_glob_is_an_error(tmp_path, tok):
    f = write(tmp_path / "pairs.parquet", {"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]})
    with pytest.raises(DataError, match=r"split 'test_prefs' was given but .*pairs.parquet is a single parquet "
                                        r"file, which has no splits: point at a folder or a Hub dataset, or drop"):
        build_pairs(f, tok, split="test_prefs")               # was: the training file read again as eval data
    with pytest.raises(DataError, match=r"split 'test' was given but .*\*.parquet is a glob, which has no splits"):
        data.resolve_files(str(tmp_path / "*.parquet"), "test")
    assert len(build_pairs(f, tok)) == 1


def test_hub_dataset_without_network_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="split"):
        data.resolve_files("HuggingFaceH4/ultrafeedback_binarized")
    with pytest.raises(DataError, match="Hub dataset nobody/no-such-dataset-xyz is not in the local Hugging Face cache"):
        data.resolve_files("nobody/no-such-dataset-xyz", split="train_prefs")


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("columns, message", [
    ({"prompt": ["a", None], "chosen": ["x", "y"], "rejected": ["z", "w"]}, r"row 1: prompt is null"),
    ({"prompt": ["a"], "chosen": [[{"role": "user", "content": "a"}]], "rejected": [[{"role": "assistant", "content": "b"}]]},
     r"row 0: chosen has no assistant message at the end"),
    ({"conversations": [[{"from": "human", "value": "a"}]], "chosen": [{"from": "robot", "value": "x"}],
      "rejected": [{"from": "gpt", "value": "y"}]}, r"row 0: chosen has role 'robot'"),
    ({"chosen": ["no markers here"], "rejected": ["none either"]}, r"row 0: no '\\n\\nAssistant:'"),
    ({"prompt": ["a"], "chosen": [[{"role": "assistant", "content": "1"}]],
      "rejected": [[{"role": "assistant", "content": None}]]}, r"row 0: rejected message 0 content is null"),
])
def test_bad_rows_name_the_row(tmp_path, tok, columns, message):
    f = write(tmp_path / "bad.parquet", columns)
    with pytest.raises(DataError, match=message):
        build_pairs(f, tok)


def test_non_string_content_is_an_error(tmp_path, tok):
    f = write(tmp_path / "n.parquet", {"prompt": ["a"], "chosen": [[{"role": "assistant", "content": 3}]],
                                       "rejected": [[{"role": "assistant", "content": 4}]]})
    with pytest.raises(DataError, match="content is int, expected a string"):
        build_pairs(f, tok)


def test_unreadable_and_missing_files_and_cli_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read parquet file .*junk.parquet"):
        build_pairs(junk, data.synthetic_tokenizer())
    assert data.main(["--data", str(junk)]) == 2
    assert data.main(["--data", str(tmp_path / "missing.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "Traceback" not in err and "missing.parquet" in err


# ----------------------------------------------------------------------------- tokenization at the boundary

def check_boundary(tok, prompt, chosen, rejected, stats_key_expected):
    pairs = [data.Conversation([], chosen, rejected, raw=(prompt, chosen, rejected))]
    stats = Counter()
    (p, c, r), = data.tokenize_texts(tok, [data.render_texts(pairs[0], None, tok, stats)], stats)
    # the pieces are exactly the full-sequence tokenization, cut once, with EOS added
    assert p + c == tok.encode(prompt + chosen) + [tok.eos_id]
    assert p + r == tok.encode(prompt + rejected) + [tok.eos_id]
    assert p == tok.encode(prompt)[:len(p)]                      # the prompt part is a prefix of the prompt alone
    assert stats["note/boundary_merge"] == stats_key_expected
    return p, c, r


def test_boundary_merge_byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["The answer is 42 and 43. " * 20, "hello world " * 20], trainer)
    tok = data.Tok(bpe, bos_token=None, eos_token="<|endoftext|>")
    assert tok.bos_id is None and len(bpe.encode(" 42").ids) == 1
    p, c, r = check_boundary(tok, "The answer is 4", "2", "3", 1)   # " 4"+"2" -> " 42" straddles the boundary
    assert tok.decode(c).startswith(" 42")                          # so it belongs to the response
    check_boundary(tok, "The answer is", " 42", " 43", 0)


def tiny_byte_fallback_tokenizer():
    """A SentencePiece-style BPE (Llama layout): Prepend/Replace '▁' normalizer, byte fallback, <s> prepended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    specials = ["<unk>", "<s>", "</s>"]
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁hello", "▁w", "or", "▁wor",
              "ld", "▁world"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("▁", "hello"), ("▁", "w"), ("o", "r"),
              ("▁w", "or"), ("l", "d"), ("▁wor", "ld")]
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t.add_special_tokens(specials)
    return data.Tok(t, bos_token="<s>", eos_token="</s>")


def test_boundary_merge_byte_fallback_tokenizer():
    tok = tiny_byte_fallback_tokenizer()
    assert tok.bos_id == 1
    p, c, r = check_boundary(tok, "hello wor", "ld", "ké", 1)     # "▁wor"+"ld" merges; é falls back to 2 bytes
    assert [tok.tokenizer.id_to_token(i) for i in c] == ["▁world", "</s>"]     # the merged token is the response's
    assert [tok.tokenizer.id_to_token(i) for i in r[-3:]] == ["<0xC3>", "<0xA9>", "</s>"]
    assert p[0] == 1 and list(p).count(1) == 1                      # BOS once


def test_boundary_merge_real_llama2_tokenizer():
    tok = data.load_tokenizer(shared("tokenizers", "llama2"))
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    check_boundary(tok, "Hello wor", "ld", "ldwide", 1)
    check_boundary(tok, "\n\nHuman: hi\n\nAssistant:", " Sure", " No", 0)
    # a template that writes <s> itself does not get a second one
    assert tok.encode("<s>[INST] hi [/INST]")[:2] == [1, tok.encode("[INST]")[1]]


@pytest.mark.parametrize("name, bos, eos", [("llama2", 1, 2), ("mistral", 1, 2), ("opt", 2, 2), ("gpt2", None, 50256)])
def test_real_tokenizers_put_bos_where_their_post_processor_does(name, bos, eos):
    tok = data.load_tokenizer(shared("tokenizers", name))
    assert (tok.bos_id, tok.eos_id) == (bos, eos)
    ids = tok.encode("Hello world")
    assert (ids[0] == bos) if bos is not None else ids == tok.tokenizer.encode("Hello world").ids


def without_tokenizer_json(src, dst):
    """A copy of tokenizer folder `src` without its tokenizer.json: only vocab.json + merges.txt and the configs."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "tokenizer.json":
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


VOCAB_MERGES_TEXTS = ["Hello world", " Hello world", "  two leading spaces", "trailing space ", "a\nb\n\nc\r\n",
                      "\ttab\tand  double  spaces   ", "café naïve Ünïcödé 日本語 Ελληνικά русский", "emoji 🤗👍🏽 ok",
                      "numbers 0 12 345 6789 3.14159 1,000,000", "it's they're we'll I'd", "<|endoftext|>x</s><pad><s>",
                      "\u00a0nbsp\u2028ls", "", " ", "\n"]


@pytest.mark.parametrize("name, bos", [("gpt2", None), ("opt", 2)])
def test_vocab_json_and_merges_txt_tokenize_like_tokenizer_json(tmp_path, shared_data, name, bos):
    src = shared_data / "tokenizers" / name
    folder = without_tokenizer_json(src, tmp_path / name)
    tok, ref = data.load_tokenizer(folder), data.load_tokenizer(src)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (ref.bos_id, ref.eos_id, ref.pad_id, ref.vocab_size)
    assert tok.bos_id == bos
    assert tok.tokenizer.get_added_tokens_decoder() == ref.tokenizer.get_added_tokens_decoder()
    conversation = [{"role": "user", "content": "Hi there!\nHow are you? 🙂"}, {"role": "assistant", "content": " Fine."}]
    rendered = data.render_chat(data.ZEPHYR_TEMPLATE, conversation, add_generation_prompt=False,
                                bos_token=tok.bos_token, eos_token=tok.eos_token)
    strings = VOCAB_MERGES_TEXTS + [rendered]
    assert [tok.encode(s) for s in strings] == [ref.encode(s) for s in strings]
    assert tok.encode_many(strings) == ref.encode_many(strings)
    assert [tok.tokenizer.encode(s).ids for s in strings] == [ref.tokenizer.encode(s).ids for s in strings]
    for s in strings:
        ids = tok.encode(s)
        assert tok.decode(ids[1:] if bos is not None else ids) == s and tok.decode(ids) == ref.decode(ids)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))       # transformers' own reading of the same files
    assert [hf(s)["input_ids"] for s in strings] == [tok.tokenizer.encode(s).ids for s in strings]
    assert hf("Hello world")["input_ids"] == tok.encode("Hello world")


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_vocab_json_and_merges_txt_build_the_same_pairs(tmp_path, shared_data, name):
    src = shared_data / "tokenizers" / name
    tok, ref = data.load_tokenizer(without_tokenizer_json(src, tmp_path / name)), data.load_tokenizer(src)
    table = pq.read_table(shared_data / "hh-rlhf-harmless-test.parquet")
    subset = write(tmp_path / "hh.parquet", table.slice(0, 12).to_pydict())
    a, b = (build_pairs(subset, t, max_length=512, max_prompt_length=256) for t in (tok, ref))
    assert len(a) == len(b) > 0 and a.stats == b.stats
    assert np.array_equal(a.lengths, b.lengths) and data.pairs_crc32(a) == data.pairs_crc32(b)
    assert all(np.array_equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b)
               for f in ("prompt_ids", "chosen_ids", "rejected_ids"))


def test_vocab_merges_fallback_reads_the_config_flags(tmp_path):
    """add_bos_token / add_eos_token / add_prefix_space from tokenizer_config.json, and tokens outside vocab.json."""
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "h", "i", "Ġ", "hi", "Ġhi"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh i\nĠ hi\n")
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_prefix_space": True,
              "additional_special_tokens": ["<sep>"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = data.load_tokenizer(tmp_path)
    assert tok.bos_id == 0 and tok.eos_id == 1 and tok.encode("hi") == [0, 6]          # prefix space: "Ġhi"
    assert tok.tokenizer.token_to_id("<sep>") == 7 and tok.encode("hi<sep>hi") == [0, 6, 7, 6]
    config.update(add_bos_token=False, add_prefix_space=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = data.load_tokenizer(tmp_path)
    assert tok.bos_id is None and tok.encode("hi hi") == [5, 6]
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh i x\n")
    with pytest.raises(DataError, match=r"cannot build a BPE from .*vocab.json and .*merges.txt: .*Merges text file "
                                        r"invalid at line 1"):
        data.load_tokenizer(tmp_path)


def test_folder_without_a_usable_tokenizer_is_a_one_line_error(tmp_path, shared_data):
    folder = tmp_path / "spm_only"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((shared_data / "tokenizers" / "llama2" / "tokenizer.model").read_bytes())
    (folder / "vocab.json").write_text("{}")                                   # vocab.json alone is not enough
    with pytest.raises(FileNotFoundError) as e:
        data.load_tokenizer(folder)
    message = str(e.value)
    assert "\n" not in message and str(folder) in message
    assert all(f in message for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model"))
    (folder / "tokenizer_config.json").write_text("{}")                        # named through its config file too
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*spm_only: looked for tokenizer.json, or vocab"):
        data.load_tokenizer(folder / "tokenizer_config.json")


# ----------------------------------------------------------------------------- filters and truncation

def test_filters_counted_by_reason_and_truncation_keeps_the_prompt(tmp_path, tok):
    long_prompt = "x" * 40
    f = write(tmp_path / "f.parquet", {
        "prompt": ["same", "empty", "long", long_prompt, "ok", "cut", "twin"],
        "chosen": ["a", "", "b", "c", "yes", "y" * 50, "z" * 30 + " kind"],     # the twins differ only past
        "rejected": ["a", "r", " ", "d", "no", "n" * 5, "z" * 30 + " rude"]})   # max_length: equal once cut
    pairs = build_pairs(f, tok, template="raw", max_length=30, max_prompt_length=20)
    s = pairs.stats
    assert (s["rows"], s["kept"]) == (7, 2)
    assert (s["dropped/chosen_equals_rejected"], s["dropped/empty_response"], s["dropped/prompt_too_long"]) == (1, 2, 1)
    assert s["dropped/identical_after_truncation"] == 1
    assert (s["truncated/chosen"], s["truncated/rejected"]) == (1, 0)      # a dropped pair is not counted as cut
    assert all(not np.array_equal(p.chosen_ids, p.rejected_ids) for p in pairs)
    cut = pairs[1]
    assert tok.decode(cut.prompt_ids) == "<s>cut"                    # the prompt is never truncated
    assert len(cut.prompt_ids) + len(cut.chosen_ids) == 30          # the response is, to exactly max_length
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 30 for p in pairs)
    with pytest.raises(DataError, match="max_prompt_length"):
        build_pairs(f, tok, max_length=20, max_prompt_length=21)
    tight = build_pairs(f, tok, template="raw", max_length=4, max_prompt_length=4)   # "<s>cut" fills it
    assert tight.stats["dropped/prompt_fills_max_length"] == 1


# ----------------------------------------------------------------------------- packing

def random_pairs(n, seed=0, vocab=100):
    g = np.random.default_rng(seed)
    return [TokenizedPair(*(g.integers(3, vocab, g.integers(1, 9)).astype(np.int32) for _ in range(3)))
            for _ in range(n)]


def unpack_batch(batch):
    """The pairs a PackedBatch was built from (the inverse of pack_pairs, read back through its targets)."""
    P, ids = batch.n_pairs, batch.input_ids.cpu()
    starts = torch.nn.functional.pad(batch.seg_lens.sum(1).cumsum(0), (1, 0)).tolist()
    pairs = []
    for i in range(P):
        if batch.shared_prompt:
            lp, lc, lr = batch.seg_lens[i].tolist()
            s = starts[i]
            p, c, r = ids[s:s + lp], ids[s + lp:s + lp + lc], ids[s + lp + lc:s + lp + lc + lr]
        else:
            first_resp = int(batch.tgt_index[(batch.tgt_seq == i) & batch.tgt_response].min()) + 1 - starts[i]
            seq_c, seq_r = ids[starts[i]:starts[i + 1]], ids[starts[P + i]:starts[P + i + 1]]
            p, c, r = seq_c[:first_resp], seq_c[first_resp:], seq_r[first_resp:]
        pairs.append(TokenizedPair(p.numpy().astype(np.int32), c.numpy().astype(np.int32), r.numpy().astype(np.int32)))
    return pairs


def visible_context(batch, row):
    """The tokens row `row` attends to (its segment's earlier tokens, never chosen from rejected), in position
    order (ends with itself)."""
    starts = np.concatenate([[0], np.cumsum(batch.seg_lens.sum(1).numpy())])
    s = int(np.searchsorted(starts, row, side="right") - 1)
    p, c, r = batch.seg_lens[s].tolist()
    branch = np.repeat([0, 1, 2], [p, c, r])
    local = row - starts[s]
    keep = [j for j in range(local + 1) if branch[j] in (0, branch[local])]
    return tuple(batch.input_ids[starts[s] + j].item() for j in keep), tuple(batch.position_ids[starts[s] + j].item()
                                                                             for j in keep)


def per_sequence_targets(batch):
    out = Counter()
    for i, t, q, resp, nll in zip(batch.tgt_index.tolist(), batch.tgt_ids.tolist(), batch.tgt_seq.tolist(),
                                  batch.tgt_response.tolist(), batch.tgt_nll.tolist()):
        ctx, positions = visible_context(batch, i)
        assert positions == tuple(range(len(positions)))    # positions are those of a plain [prompt | answer] sequence
        out[(q, ctx, t, resp, nll)] += 1
    return out


@pytest.mark.parametrize("prompt_loss", [True, False])
def test_pack_round_trip_and_layouts_agree(prompt_loss):
    pairs = random_pairs(5)
    shared_b = pack_pairs(pairs, shared_prompt=True, prompt_loss=prompt_loss)
    plain_b = pack_pairs(pairs, shared_prompt=False, prompt_loss=prompt_loss)
    for b, S in ((shared_b, 5), (plain_b, 10)):
        assert b.seg_lens.shape == (S, 3) and b.seg_lens.sum() == b.num_tokens and b.n_pairs == 5
        for x, y in zip(unpack_batch(b), pairs):
            assert all(np.array_equal(getattr(x, f), getattr(y, f)) for f in ("prompt_ids", "chosen_ids", "rejected_ids"))
    # every target has the same context, id and flags in both layouts: per-sequence log-probs and NLL are equal
    assert per_sequence_targets(shared_b) == per_sequence_targets(plain_b)
    for i, pr in enumerate(pairs):
        lp, lc, lr = len(pr.prompt_ids), len(pr.chosen_ids), len(pr.rejected_ids)
        chosen, rejected = shared_b.tgt_seq == i, shared_b.tgt_seq == 5 + i
        assert int(shared_b.tgt_response[chosen].sum()) == lc and int(shared_b.tgt_response[rejected].sum()) == lr
        assert int(shared_b.tgt_nll[chosen].sum()) == (lp - 1 + lc if prompt_loss else lc)
        assert not shared_b.tgt_nll[rejected].any()
    # the last prompt row predicts both first answer tokens
    last_prompt_row = len(pairs[0].prompt_ids) - 1
    assert (shared_b.tgt_index == last_prompt_row).sum() == 2
    assert shared_b.position_ids[:sum(shared_b.seg_lens[0].tolist())].tolist() == (
        list(range(len(pairs[0].prompt_ids) + len(pairs[0].chosen_ids)))
        + list(range(len(pairs[0].prompt_ids), len(pairs[0].prompt_ids) + len(pairs[0].rejected_ids))))
    cu_seqlens = torch.nn.functional.pad(shared_b.seg_lens.sum(1).cumsum(0), (1, 0))    # flash-attn's boundaries
    assert shared_b.num_tokens < plain_b.num_tokens and cu_seqlens[-1] == shared_b.num_tokens


# ----------------------------------------------------------------------------- batching

def epoch_indices(batcher, epoch):
    return [sorted(map(int, b)) for b in batcher.plan(epoch)]


def test_rank_split_is_a_partition_with_equal_batch_counts():
    pairs = random_pairs(103, seed=1)
    world = 3
    batchers = [PairBatcher(pairs, batch_size=4, seed=7, rank=k, world_size=world, grad_accum=2) for k in range(world)]
    info = batchers[0].epoch_info()
    per_rank = [[i for b in epoch_indices(bt, 0) for i in b] for bt in batchers]
    assert len({len(bt) for bt in batchers}) == 1 and len(batchers[0]) % 2 == 0
    flat = [i for r in per_rank for i in r]
    assert len(flat) == len(set(flat)) == info["pairs_used"]            # disjoint
    assert info["pairs_used"] + info["pairs_dropped"] == 103 and info["pairs_dropped"] < world * 2 * 4
    assert epoch_indices(batchers[0], 1) != epoch_indices(batchers[0], 0)    # reshuffled each epoch
    again = PairBatcher(pairs, batch_size=4, seed=7, rank=0, world_size=world, grad_accum=2)
    assert epoch_indices(again, 0) == epoch_indices(batchers[0], 0)          # deterministic from the seed


def global_steps(pairs, world, accum, epoch=0, **kw):
    """Each optimizer step's pairs: the ranks' micro-batches concatenated rank-major (rank 0's in order, then 1's)."""
    plans = [PairBatcher(pairs, rank=r, world_size=world, grad_accum=accum, seed=3, **kw).plan(epoch)
             for r in range(world)]
    return [np.concatenate([plans[r][s * accum + a] for r in range(world) for a in range(accum)]).tolist()
            for s in range(len(plans[0]) // accum)]


@pytest.mark.parametrize("group_batches", [1, 3])
def test_global_batch_is_the_same_however_it_is_split(group_batches):
    """8 pairs per step as 1 rank x 1 micro-batch of 8, 1 x 2 of 4, 2 ranks x 1 of 4, 2 x 2 of 2: every step holds
    the same pairs in the same order; the remainder (70 = 8 x 8 + 6) is left out, another one each epoch."""
    pairs = random_pairs(70, seed=5)
    for epoch in (0, 1):
        reference = global_steps(pairs, 1, 1, epoch, batch_size=8, group_batches=group_batches)
        assert len(reference) == 8 and all(len(s) == 8 for s in reference)
        for world, accum in ((1, 2), (2, 1), (2, 2)):
            size = 8 // (world * accum)
            split = global_steps(pairs, world, accum, epoch, batch_size=size, group_batches=group_batches)
            assert split == reference, (world, accum, epoch)
    epochs = [global_steps(pairs, 2, 2, e, batch_size=2, group_batches=group_batches) for e in (0, 1)]
    assert epochs[0] != epochs[1] and {i for s in epochs[0] for i in s} != {i for s in epochs[1] for i in s}
    info = PairBatcher(pairs, batch_size=2, grad_accum=2, world_size=2, rank=1).epoch_info()
    assert info == {"epoch": 0, "steps": 8, "batches_per_rank": 16, "pairs_used": 64, "pairs_dropped": 6}


def test_token_budget_steps_are_the_same_for_ranks_or_micro_batches():
    """max_tokens: a micro-batch is a token budget on one rank; 2 ranks x 1 and 1 rank x 2 take the same steps."""
    pairs = random_pairs(90, seed=6)
    one, two = (global_steps(pairs, w, a, max_tokens=40) for w, a in ((1, 2), (2, 1)))
    assert one == two and len(one) > 3


def test_drop_remainder_false_keeps_every_pair_in_a_last_smaller_step():
    batchers = [PairBatcher(random_pairs(21), batch_size=4, world_size=2, rank=r, drop_remainder=False) for r in (0, 1)]
    assert sorted(int(i) for bt in batchers for b in bt.plan() for i in b) == list(range(21))
    assert len(batchers[0]) == len(batchers[1]) == 3 and batchers[0].epoch_info()["pairs_dropped"] == 0
    assert PairBatcher(random_pairs(3), batch_size=4, drop_remainder=False).epoch_info()["pairs_used"] == 3


def test_max_tokens_smaller_than_a_pair_is_an_error():
    pairs = random_pairs(50, seed=2)
    cost = np.array([2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs])
    message = (rf"max_tokens 20 is less than one pair: {(cost > 20).sum()} of the 50 pairs pack to more \(the longest "
               rf"to {cost.max()}\); raise max_tokens")
    with pytest.raises(DataError, match=message):
        PairBatcher(pairs, max_tokens=20, shared_prompt=False)
    PairBatcher(pairs, max_tokens=int(cost.max()), shared_prompt=False)


def test_token_budget_and_length_grouping():
    pairs = random_pairs(200, seed=2)
    bt = PairBatcher(pairs, max_tokens=60, seed=0, shared_prompt=False)
    sizes = [b.num_tokens for b in bt]
    assert max(sizes) <= 60 and sum(len(b) for b in bt.plan(1)) == 200 - bt.epoch_info(1)["pairs_dropped"]
    cost = bt.cost
    spread = np.mean([np.ptp(cost[b]) for b in bt.plan(1) if len(b) > 1])
    assert spread < np.ptp(cost) / 2            # grouped batches hold pairs of similar length


def test_resume_reproduces_the_rest_of_the_epoch():
    pairs = random_pairs(50, seed=3)
    make = lambda: PairBatcher(pairs, batch_size=3, seed=5, rank=1, world_size=2)
    full = make()
    reference = [b.input_ids for _ in range(2) for b in full]           # two uninterrupted epochs
    run = make()
    it = iter(run)
    seen = [next(it).input_ids for _ in range(5)]
    state = run.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b.input_ids for b in resumed] + [b.input_ids for b in resumed]   # rest of epoch 0, then epoch 1
    assert len(seen + rest) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, reference))
    with pytest.raises(DataError, match="cannot resume"):
        PairBatcher(pairs, batch_size=3, seed=6).load_state_dict(state)


def test_state_dict_records_what_the_batches_depend_on():
    pairs = random_pairs(40, seed=4)
    state = PairBatcher(pairs, batch_size=4, seed=5).state_dict()
    assert set(state) == {"epoch", "position", "world_size", "seed", "batch_size", "max_tokens", "grad_accum",
                          "shared_prompt", "group_batches", "n_pairs", "pairs_crc32", "batch_plan"}
    assert state["n_pairs"] == 40 and json.loads(json.dumps(state)) == state       # train.py stores it as JSON
    pairset = data.PairSet(pairs)                     # the checksum of a PairSet and of a list of its pairs agree
    assert data.pairs_crc32(pairset) == data.pairs_crc32(list(pairset)) == state["pairs_crc32"]


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=8), r"batch size \(pairs per micro-batch\) 4, now 8 \("),
    (dict(batch_size=None, max_tokens=64), r"batch size \(pairs per micro-batch\) 4, now None; max tokens per "
                                           r"micro-batch None, now 64; group_batches 1, now 50"),
    (dict(grad_accum=2), r"grad_accum 1, now 2"),
    (dict(shared_prompt=False), r"shared_prompt True, now False"),
    (dict(group_batches=3), r"group_batches 1, now 3"),
    (dict(seed=6), r"seed 5, now 6"),
    (dict(world_size=2), r"world size 1, now 2"),
    (dict(pairs=random_pairs(30, seed=4)), r"number of pairs 40, now 30; checksum \(crc32\) of the pairs' tokens"),
    (dict(pairs=random_pairs(40, seed=9)), r"checksum \(crc32\) of the pairs' tokens \d+, now \d+ \("),
])
def test_resume_refuses_a_state_saved_under_other_settings(change, message):
    settings = dict(pairs=random_pairs(40, seed=4), batch_size=4, max_tokens=None, seed=5, grad_accum=1)
    saved = PairBatcher(**settings)
    next(iter(saved))
    state = saved.state_dict()
    resumed = PairBatcher(**{**settings, **change})
    with pytest.raises(DataError, match="cannot resume: the batcher was saved with " + message):
        resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (0, 0)
    PairBatcher(**settings).load_state_dict(state)           # the same settings resume


def test_resume_from_an_incomplete_state_is_a_clear_error():
    batcher = PairBatcher(random_pairs(10), batch_size=2)
    with pytest.raises(DataError, match=r"cannot resume: the saved batcher state has no batch_size, max_tokens, "
                                        r"grad_accum, shared_prompt, group_batches, n_pairs, pairs_crc32"):
        batcher.load_state_dict({"epoch": 1, "position": 2, "seed": 0, "world_size": 1})
    for _ in batcher:
        pass
    batcher.rewind()
    assert (batcher.epoch, batcher.position) == (0, 0) and len(list(batcher)) == 5


def test_too_little_data_for_the_ranks_is_an_error():
    with pytest.raises(DataError, match=r"1 pairs make no step of world_size x grad_accum = 2 micro-batches of 4"):
        len(PairBatcher(random_pairs(1), batch_size=4, world_size=2))
    # fewer pairs than one global batch, but one for each micro-batch: a single, smaller step
    few = [PairBatcher(random_pairs(3), batch_size=4, world_size=2, rank=r) for r in (0, 1)]
    assert [len(b) for bt in few for b in bt.plan()] == [2, 1]


# ----------------------------------------------------------------------------- synthetic data and tokenizer

def test_synthetic_train_and_eval_splits_share_no_prompt(tmp_path):
    train = pq.read_table(data.write_synthetic(tmp_path / "t.parquet", 2000, seed=0, split="train")).to_pylist()
    held = pq.read_table(data.write_synthetic(tmp_path / "e.parquet", 200, seed=1, split="eval")).to_pylist()
    assert len(train) == 2000 and len(held) == 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len({r["prompt"].split()[0] for r in held}) == 4                   # every task kind is held out


def test_synthetic_data_is_deterministic_short_and_checkable(tmp_path, tok):
    a = pq.read_table(data.write_synthetic(tmp_path / "a.parquet", 300, seed=1)).to_pylist()
    b = pq.read_table(data.write_synthetic(tmp_path / "b.parquet", 300, seed=1)).to_pylist()
    assert a == b and a != pq.read_table(data.write_synthetic(tmp_path / "c.parquet", 300, seed=2)).to_pylist()
    for row in a:
        assert data.oracle_correct(row["prompt"], row["chosen"]) and not data.oracle_correct(row["prompt"], row["rejected"])
        assert max(len(row[k]) for k in row) <= 40
    assert len({row["prompt"].split()[0] for row in a}) == 4                  # all four task kinds
    pairs = build_pairs(tmp_path / "a.parquet", tok)
    assert len(pairs) == 300 and pairs.stats["note/boundary_merge"] == 0
    assert tok.tokenizer.token_to_id("<unk>") not in np.concatenate([pairs._flat[0], pairs._flat[1]])
    with pytest.raises(DataError, match="not a synthetic prompt"):
        data.oracle_correct("Tell me a joke", "no")


def test_synthetic_tokenizer_saves_for_transformers(tmp_path, tok):
    assert tok.vocab_size <= 512
    loaded = data.load_tokenizer(tok.save(tmp_path / "tok"))
    assert loaded.encode("<|user|>\nhi") == tok.encode("<|user|>\nhi") and loaded.chat_template == tok.chat_template
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == data.render_chat(tok.chat_template, messages, add_generation_prompt=True)
    assert hf(text)["input_ids"] == tok.encode(text)


# ----------------------------------------------------------------------------- real data

def test_real_hh_rlhf_with_llama2(tmp_path):
    table = pq.read_table(shared("hh-rlhf-harmless-test.parquet"))
    subset = write(tmp_path / "hh.parquet", table.take(list(range(150)) + [1254, 1688, 1950]).to_pydict())
    tok = data.load_tokenizer(shared("tokenizers", "llama2"))
    pairs = build_pairs(subset, tok, max_length=1024, max_prompt_length=512)
    s = pairs.stats
    assert s["rows"] == 153 and s["kept"] + sum(v for k, v in s.items() if k.startswith("dropped/")) == 153
    assert s["note/hh_answer_contains_turns"] == 3                  # the three rows whose answers hold more turns
    assistant = tok.encode("\n\nAssistant:")[-3:]
    for pair in pairs:
        assert list(pair.prompt_ids[-3:]) == assistant and pair.prompt_ids[0] == 1
        assert len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) <= 1024
    p, c, r = pairs.lengths.sum(0)
    assert 2 * p / (2 * p + c + r) > 0.5                             # prompts dominate: sharing them pays


def test_real_sharegpt_with_llama2(tmp_path):
    table = pq.read_table(shared("llamafactory-dpo-en-demo.parquet"))
    subset = write(tmp_path / "sg.parquet", table.slice(0, 40).to_pydict())
    tok = data.load_tokenizer(shared("tokenizers", "llama2"))
    pairs = build_pairs(subset, tok, template=str(shared("chat_templates", "llama2_chat.jinja")))
    assert pairs.layout == "sharegpt" and len(pairs) > 30
    assert all(pair.prompt_ids[0] == 1 and list(pair.prompt_ids).count(1) >= 1 and pair.prompt_ids[1] != 1
               for pair in pairs)                                   # the template wrote <s>: not doubled
    assert tok.decode(pairs[0].prompt_ids).endswith("[/INST]")


def test_cli_stats_show_and_help(tmp_path, capsys):
    f = data.write_synthetic(tmp_path / "s.parquet", 50)
    assert data.main(["--data", str(f), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "kept 50 of 50 rows" in out and "prompt share" in out and "[PROMPT]<s><|user|>" in out
    named = write(tmp_path / "named.parquet", {"q": ["hi"], "good": ["yes"], "bad": ["no"]})
    assert data.main(["--data", str(named)]) == 2
    assert "--columns prompt=...,chosen=...,rejected=..." in capsys.readouterr().err   # train.py's names
    assert data.main(["--data", str(named), "--columns", "prompt=q,chosen=good,rejected=bad"]) == 0
    assert "kept 1 of 1 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        data.main(["--help"])
    assert exit_.value.code == 0 and "default: 2048" in capsys.readouterr().out


def test_train_py_grad_accum_splits_of_one_global_batch_end_at_the_same_weights(tmp_path):
    """train.py on 1 rank, --batch-size 8 as --grad-accum 1, 2 and 4: the same pairs per step, so the same weights
    to float rounding (2 ranks x 1 micro-batch take the same micro-batches as 1 x 2: see the plan tests above)."""
    import model as model_lib
    import train
    from safetensors.torch import load_file
    config = model_lib.ModelConfig(family="llama", vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                   ffn_dim=64, max_seq_len=1024, tie_embeddings=True)
    torch.manual_seed(0)
    model_lib.Transformer(config).save_pretrained(tmp_path / "ckpt")
    data.synthetic_tokenizer().save(tmp_path / "ckpt")
    threads, weights = torch.get_num_threads(), []
    torch.set_num_threads(1)
    try:
        for accum in (1, 2, 4):
            out = tmp_path / f"accum{accum}"
            assert train.main(["--model", str(tmp_path / "ckpt"), "--out", str(out), "--data", "synthetic",
                               "--synthetic-pairs", "64", "--batch-size", "8", "--max-steps", "3", "--grad-accum", str(accum), "--lr", "3e-3",
                               "--warmup-steps", "1", "--eval-every", "0", "--save-every", "0"]) == 0
            weights.append(load_file(out / "final" / "model.safetensors"))
    finally:
        torch.set_num_threads(threads)
    moved = max((weights[0][k] - load_file(tmp_path / "ckpt" / "model.safetensors")[k]).abs().max() for k in weights[0])
    assert moved > 1e-3                                  # the runs trained
    for other in weights[1:]:
        for k in weights[0]:
            torch.testing.assert_close(other[k], weights[0][k], rtol=0, atol=1e-5, msg=k)


def test_eval_data_with_no_usable_pairs_is_an_error_naming_it_and_its_counts(tmp_path, tok):
    train = data.write_synthetic(tmp_path / "train.parquet", 20)
    bad = write(tmp_path / "bad_eval.parquet", {"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["x", "y"]})
    with pytest.raises(DataError, match=r"^eval data .*bad_eval.parquet: no usable pairs after filtering \(kept 0 of "
                                        r"2 rows; dropped: chosen_equals_rejected 2\)$"):
        data.train_and_eval_pairs(train, None, bad, None, 0.1, 0, tok, tmp_path, log=lambda s: None)
