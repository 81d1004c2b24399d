"""Preference data for ORPO: parquet pairs -> tokenized, masked, padding-free batches.

    parquet rows --read_rows--> Conversation (shared history, chosen answer, rejected answer)
                 --render-----> text: prompt, chosen response, rejected response (chat template or raw)
                 --tokenize---> TokenizedPair(prompt_ids, chosen_ids, rejected_ids), filtered and truncated
                 --PairBatcher/pack_pairs--> PackedBatch: one flat token stream, no padding

Tokenization rule (the source of many preference-training bugs): the chosen sequence is the tokenization of the
full text prompt+chosen, never two tokenizations joined, because tokens can merge across the boundary. The prompt
part is the longest run of leading tokens that the full sequence shares with the prompt tokenized alone, so a token
that straddles the boundary belongs to the response. Chosen and rejected use the same cut: they share one prompt.

Paper filters (section 5.1, Appendix C): text_filter, token_filter_and_truncate; each drop counted in PairSet.stats.
"""
import argparse
import datetime
import functools
import glob
import json
import random
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import jinja2
import jinja2.sandbox
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from model import hub_download   # the Hub client's failures, each in one sentence


class DataError(ValueError):
    """Bad input data or options; the message names the file, row or option at fault."""


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")      # owner/name of a Hugging Face Hub model or dataset


# -----------------------------------------------------------------------------
# Tokenizer: tokenizer.json, or a GPT-2-style vocab.json + merges.txt, with tokenizer_config.json

@dataclass
class Tok:
    tokenizer: Tokenizer
    bos_token: str | None
    eos_token: str
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    name: str = ""

    def __post_init__(self):
        self.tokenizer.no_truncation()   # some tokenizer.json files ship with truncation/padding switched on
        self.tokenizer.no_padding()
        if self.eos_token is None or self.tokenizer.token_to_id(self.eos_token) is None:
            raise DataError(f"tokenizer {self.name!r}: eos_token {self.eos_token!r} is not in its vocabulary "
                            "(ORPO puts EOS after every response)")
        # BOS goes where the tokenizer's post-processor puts it (Llama <s>, OPT </s>, GPT-2 none): encode both ways.
        with_special, without = (self.tokenizer.encode("a", add_special_tokens=s).ids for s in (True, False))
        prepends = len(with_special) > len(without) and with_special[1:1 + len(without)] == without
        self.bos_id = with_special[0] if prepends else None
        self.eos_id = self.tokenizer.token_to_id(self.eos_token)
        self.pad_id = self.tokenizer.token_to_id(self.pad_token) if self.pad_token else None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.encode_many([text])[0]

    def encode_many(self, texts):
        """Token ids with BOS where the tokenizer puts it (not twice if the text starts with it), no EOS."""
        bos = [] if self.bos_id is None else [self.bos_id]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [e.ids if e.ids[:1] == bos else bos + e.ids for e in encodings]

    def decode(self, ids, skip_special_tokens=False):
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, out_dir):
        """Write tokenizer.json and tokenizer_config.json (with the special tokens and chat template): AutoTokenizer."""
        (out := Path(out_dir)).mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / "tokenizer.json"))
        special = {k: v for k in ("bos_token", "eos_token", "pad_token", "unk_token") if (v := getattr(self, k))}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.bos_id is not None, **special,
                  "add_eos_token": False, "clean_up_tokenization_spaces": False, "chat_template": self.chat_template}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return out


def load_tokenizer(path_or_name):
    """A Tok from a folder, a tokenizer.json or tokenizer_config.json file, a Hub model id, or "synthetic"."""
    name = str(path_or_name)
    if name == "synthetic":
        return synthetic_tokenizer()
    path = Path(name)
    if path.exists():
        folder = path.parent if path.is_file() else path    # a file: the rest sits beside it
        where, missing = folder, FileNotFoundError
    elif HUB_ID.fullmatch(name):
        folder = hub_download(name, allow=["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                                            "special_tokens_map.json", "chat_template.jinja"], error=DataError)
        where, missing = f"Hub model {name}", DataError
    else:
        raise FileNotFoundError(f"tokenizer not found: {name} (a folder, a tokenizer.json, a Hub id, or 'synthetic')")
    tokenizer_json = path if path.is_file() and path.name != "tokenizer_config.json" else folder / "tokenizer.json"
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not tokenizer_json.is_file() and not (vocab.is_file() and merges.is_file()):
        hint = ("; its tokenizer.model (SentencePiece) is not read: transformers' save_pretrained writes a "
                "tokenizer.json" if (folder / "tokenizer.model").is_file() else "")
        raise missing(f"no tokenizer in {where}: looked for tokenizer.json, or vocab.json + merges.txt{hint}")
    config = {}
    for f in ("special_tokens_map.json", "tokenizer_config.json"):    # tokenizer_config.json wins
        if (folder / f).is_file():
            config.update(_read(folder / f, json.loads))
    if tokenizer_json.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:
            raise DataError(f"cannot read tokenizer file {tokenizer_json}: {e}") from None
        # As transformers 5, which users run the model with, reads a LlamaTokenizer (not a byte-level one, Llama 3):
        # Metaspace, no normalizer, whatever the file says (Llama-2's legacy one: " x" as "▁", "▁x", not "▁x").
        pre = tokenizer.pre_tokenizer.__getstate__() if tokenizer.pre_tokenizer else b""
        if str(config.get("tokenizer_class")).removesuffix("Fast") == "LlamaTokenizer" and b"ByteLevel" not in pre:
            prefix = config.get("add_prefix_space") is not False        # as transformers' _get_prepend_scheme
            scheme = ("always" if config.get("legacy") else "first") if prefix else "never"
            tokenizer.normalizer = None
            tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    else:           # gpt2 and facebook/opt-* ship only these
        tokenizer = _byte_level_bpe(vocab, merges, config)
    template = config.get("chat_template")
    if isinstance(template, list):                      # named templates: [{"name": "default", "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default", (template or [{}])[0].get("template"))
    if template is None and (folder / "chat_template.jinja").is_file():
        template = _read(folder / "chat_template.jinja")      # transformers >= 4.43 may save it there
    special = {k: _token_str(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return Tok(tokenizer, **special, chat_template=template, name=name)


def _token_str(value):      # tokenizer_config.json gives a special token as "<s>" or as {"content": "<s>", ...}
    return value.get("content") if isinstance(value, dict) else value


def _read(f, parse=str):    # the text of file f, or with parse=json.loads its JSON; else a one-line DataError
    try:
        return parse(Path(f).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {f}: {e}") from None


def _byte_level_bpe(vocab_json, merges_txt, config):
    """The Tokenizer transformers 5 builds from vocab.json + merges.txt (GPT2Tokenizer, named by OPT's configs too):
    byte-level BPE, the config's add_prefix_space, special tokens, add_bos_token / add_eos_token (OPT: BOS "</s>")."""
    try:
        bpe = models.BPE(*models.BPE.read_file(str(vocab_json), str(merges_txt)), dropout=None,
                         continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    except Exception as e:      # not a JSON object of ids, a malformed merges line, a merge of unknown tokens
        raise DataError(f"cannot build a BPE from {vocab_json} and {merges_txt}: {e}") from None
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    tokenizer.decoder = decoders.ByteLevel()
    # Added tokens in transformers' order: added_tokens_decoder (with its ids), the named special tokens, the extra
    # ones; a token's first mention counts. One in vocab.json keeps its id there; another is appended after it.
    wanted = sorted((int(i), v) for i, v in (config.get("added_tokens_decoder") or {}).items())
    wanted += [(None, config[k]) for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                                           "cls_token", "mask_token") if config.get(k) is not None]
    for extra in (config.get("additional_special_tokens") or [], config.get("extra_special_tokens") or []):
        wanted += [(None, v) for v in (extra.values() if isinstance(extra, dict) else extra)]
    specs = {}                                          # content -> (id the config gives or None, spec)
    for expected_id, spec in ((i, v if isinstance(v, dict) else {"content": str(v)}) for i, v in wanted):
        specs.setdefault(spec["content"], (expected_id, spec))
    for content, (expected_id, spec) in specs.items():
        flags = {k: bool(spec[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in spec}
        tokenizer.add_tokens([AddedToken(content, special=bool(spec.get("special", True)), **flags)])
        if expected_id is not None and tokenizer.token_to_id(content) != expected_id:
            raise DataError(f"tokenizer_config.json gives added token {content!r} id {expected_id}, "
                            f"but vocab.json + merges.txt give it id {tokenizer.token_to_id(content)}")
    bos, eos = (_token_str(config.get(k)) if config.get(f"add_{k}", False) else None for k in ("bos_token", "eos_token"))
    for flag, token in (("add_bos_token", bos), ("add_eos_token", eos)):
        if token is not None and tokenizer.token_to_id(token) is None:
            raise DataError(f"tokenizer_config.json sets {flag} but {token!r} is not in the vocabulary")
    seq = lambda s, k: " ".join([f"{bos}:{k}"] * bool(bos) + [f"${s}:{k}"] + [f"{eos}:{k}"] * bool(eos))   # "<s>:0 $A:0"
    specials = [(t, tokenizer.token_to_id(t)) for t in dict.fromkeys([bos, eos]) if t]
    tokenizer.post_processor = processors.TemplateProcessing(single=seq("A", 0), pair=f"{seq('A', 0)} {seq('B', 1)}",
                                                             special_tokens=specials)
    return tokenizer


# -----------------------------------------------------------------------------
# Chat templates, rendered through Jinja exactly as transformers' apply_chat_template does

# The template the official ORPO code (xfactlab/orpo, main.py) sets on tokenizers without one: Zephyr's.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


@functools.lru_cache(maxsize=8)
def _compile_template(source):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)
    # Same environment as transformers: templates from the Hub are untrusted, hence the sandbox.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, **{"ensure_ascii": False, **kw})
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.datetime.now().strftime(f))
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"chat template does not parse: {e}") from None


def render_chat(template, messages, *, add_generation_prompt=False, bos_token="<s>", eos_token="</s>"):
    """Render a list of {role, content} messages with a chat template source string."""
    try:
        return _compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  bos_token=bos_token, eos_token=eos_token)
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"chat template refused the conversation: {e}") from None


def resolve_template(template, tok, layout):
    """The template source for `template`, or None for raw text. "auto": HH-RLHF's transcripts as they are (this
    project's choice: the official code has no HH-RLHF path; it applies a chat template to `chosen`), else the
    tokenizer's chat_template or ZEPHYR_TEMPLATE. With a BOS, a template that never renders bos_token gets "{{
    bos_token }}" first: exported, it gives through apply_chat_template exactly the prompt tokens of training."""
    if template == "auto":
        source = None if layout == "hh" else tok.chat_template or ZEPHYR_TEMPLATE
    elif template in ("raw", "zephyr"):
        source = ZEPHYR_TEMPLATE if template == "zephyr" else None
    else:
        check_template(template)
        source = Path(template).read_text()
    return "{{ bos_token }}" + source if source and tok.bos_id is not None and "bos_token" not in source else source


# -----------------------------------------------------------------------------
# Reading parquet (files, folders, globs or Hub datasets, one row group at a time) -> Conversation -> text

# A file's split: from a Hub shard name <split>-00000-of-00003.parquet, or <split>.parquet or <split>/ for the usual
# split words (train_prefs-style too) only: en.parquet + fr.parquet, or shards/2024/ + 2025/, are parts, not splits.
_SHARD_NAME = re.compile(r"(\w+)-\d+-of-\d+.*\.parquet")
_SPLIT_WORD = re.compile(r"(train|training|test|testing|valid|validation|val|dev|eval|evaluation)(_\w+)?")


def resolve_files(source, split=None):
    """The parquet files of `source`: a file, a folder, a glob, or a Hub dataset id. Splits are never guessed: a Hub id
    needs one, so does a folder of two or more splits (no test pairs leak into training); a file or a glob has none."""
    source, path = str(source), Path(source)
    is_glob = not path.exists() and any(c in source for c in "*?[")
    if split and (path.is_file() or is_glob):
        what = "a single parquet file" if path.is_file() else "a glob"
        raise DataError(f"split {split!r} was given but {source} is {what}, which has no splits: point at a "
                        "folder or a Hub dataset, or drop the split")
    if path.is_file():
        return [path]
    if is_glob:
        files = [Path(f) for f in sorted(glob.glob(source, recursive=True))]
    elif path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        splits = sorted({_split_of(f) for f in files} - {None})
        if not split and len(splits) > 1:
            raise DataError(f"{source} holds the parquet files of {len(splits)} splits ({', '.join(splits)}): give "
                            "the split to read, or a glob to read them all together")
    elif HUB_ID.fullmatch(source):
        if not split:
            raise DataError(f"{source} looks like a Hub dataset id: give its split (e.g. --split train_prefs)")
        patterns = [f"*{split}-*.parquet", f"*{split}.parquet", f"*{split}/*.parquet"]
        files = sorted(hub_download(source, repo_type="dataset", allow=patterns, error=DataError).rglob("*.parquet"))
    else:
        raise FileNotFoundError(f"data not found: {source} (a parquet file, a folder, a glob, or a Hub dataset id)")
    if split:               # the Hub's layouts: data/<split>-00000-of-00001.parquet, <split>.parquet, <split>/
        files = [f for f in files if f.name.startswith(f"{split}-") or f.stem == split or f.parent.name == split]
    if not files:
        raise FileNotFoundError(f"no parquet files {f'for split {split!r} ' if split else ''}in {source}")
    return files


def _split_of(f):           # the split a parquet file belongs to, or None when its name and folder show none
    shard = _SHARD_NAME.fullmatch(f.name)
    names = [shard[1]] if shard else [name for name in (f.stem, f.parent.name) if _SPLIT_WORD.fullmatch(name)]
    return names[0] if names else None


ROLES = ("prompt", "chosen", "rejected", "conversations", "system")   # overridable column names


def detect_layout(schema, columns, where):
    """(layout, {role: column}) from a parquet schema and the user's {role: column name}: "pairs" (prompt, chosen,
    rejected strings), "messages" (UltraFeedback: {role, content} lists), "hh" (HH-RLHF transcripts) or "sharegpt"."""
    col = {role: (columns or {}).get(role, role) for role in ROLES}
    has = {role for role in ROLES if col[role] in schema.names}
    layout = None
    if {"chosen", "rejected"} <= has:
        kind = schema.field(col["chosen"]).type
        if "conversations" in has:
            layout = "sharegpt"
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            layout = "pairs" if "prompt" in has else "hh"
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            layout = "messages"
    if layout is None:
        raise DataError(f"{where}: no known preference layout in columns {schema.names}; expected prompt/chosen/"
                        "rejected strings, UltraFeedback message lists, HH-RLHF transcripts or ShareGPT conversations/"
                        "chosen/rejected (override with --columns prompt=...,chosen=...,rejected=...,conversations=...)")
    return layout, {role: col[role] for role in ROLES if role in has}


def read_rows(files, columns=None):
    """Yield (where, layout, row dict) one parquet row group at a time; `where` is "file row i" for errors."""
    layout = None
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise DataError(f"cannot read parquet file {f}: {e}") from None
        file_layout, colmap = detect_layout(pf.schema_arrow, columns, str(f))
        if layout is not None and file_layout != layout:
            raise DataError(f"{f} has layout {file_layout!r} but earlier files have {layout!r}")
        layout, row = file_layout, 0
        for rg in range(pf.num_row_groups):
            try:
                table = pf.read_row_group(rg, columns=list(colmap.values()))
            except Exception as e:
                raise DataError(f"cannot read row group {rg} of {f}: {e}") from None
            for record in table.to_pylist():
                yield f"{f} row {row}", layout, {role: record[c] for role, c in colmap.items()}
                row += 1


@dataclass
class Conversation:
    history: list          # shared messages [{role, content}], ending before the answer
    chosen: str            # the chosen answer
    rejected: str          # the rejected answer
    raw: tuple | None = None   # (prompt, chosen, rejected) text for raw mode when the data has its own format


HH_ASSISTANT = "\n\nAssistant:"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SHAREGPT_ANSWER = {"gpt": "assistant", "assistant": "assistant"}        # the roles a chosen/rejected turn may have


def _checked(value, what, where, kind=str, expected="a string"):
    if value is None:
        raise DataError(f"{where}: {what} is null")
    if not isinstance(value, kind):
        raise DataError(f"{where}: {what} is {type(value).__name__}, expected {expected}")
    return value


def _message(m, what, where, role_key="role", content_key="content", role_map=None):
    _checked(m, what, where, dict, f"a {{{role_key}, {content_key}}} message")
    role = _checked(m.get(role_key), f"{what} {role_key}", where)
    if role_map is not None and role not in role_map:
        raise DataError(f"{where}: {what} has role {role!r}; expected one of {sorted(role_map)}")
    content = _checked(m.get(content_key), f"{what} {content_key}", where)
    return {"role": role_map[role] if role_map else role, "content": content}


def parse_row(layout, row, where, stats):
    """A Conversation, or None when the row is dropped (the reason is counted in `stats`)."""
    if layout == "pairs":
        prompt, chosen, rejected = (_checked(row[k], k, where) for k in ("prompt", "chosen", "rejected"))
        return Conversation([{"role": "user", "content": prompt}], chosen, rejected, raw=(prompt, chosen, rejected))
    if layout == "hh":
        return _parse_hh(*(_checked(row[k], k, where) for k in ("chosen", "rejected")), where, stats)
    if layout == "messages":
        sides = []
        for side in ("chosen", "rejected"):
            msgs = enumerate(_checked(row[side], side, where, list, "a list of messages"))
            sides.append([_message(m, f"{side} message {i}", where) for i, m in msgs])
            if not sides[-1] or sides[-1][-1]["role"] != "assistant":
                raise DataError(f"{where}: {side} has no assistant message at the end")
        (*history, chosen), (*other_history, rejected) = sides
        if history != other_history:
            stats["dropped/history_mismatch"] += 1      # the two answers do not reply to the same conversation
            return None
        history = history or [{"role": "user", "content": _checked(row.get("prompt"), "prompt", where)}]
        return Conversation(history, chosen["content"], rejected["content"])
    turns = enumerate(_checked(row["conversations"], "conversations", where, list, "a list of turns"))   # sharegpt
    history = [_message(m, f"conversations[{i}]", where, "from", "value", SHAREGPT_ROLES) for i, m in turns]
    if row.get("system"):
        history = [{"role": "system", "content": _checked(row["system"], "system", where)}] + history
    chosen, rejected = (_message(row[s], s, where, "from", "value", SHAREGPT_ANSWER)["content"]
                        for s in ("chosen", "rejected"))
    if not any(m["role"] == "user" for m in history):
        raise DataError(f"{where}: conversations has no human turn")
    return Conversation(history, chosen, rejected)


def _common_prefix(a, b):
    """Length of the common prefix of two sequences (binary search on slice equality: C speed on long texts)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    return lo


def _parse_hh(chosen, rejected, where, stats):
    """HH-RLHF: the prompt is the common text up to the last "\\n\\nAssistant:" inside it (not each transcript up to
    its own last one: in a few real rows an answer itself holds "\\n\\nAssistant:" or more turns)."""
    common = _common_prefix(chosen, rejected)
    cut = chosen.rfind(HH_ASSISTANT, 0, common)          # the last marker that lies wholly in the common text
    if cut < 0 or chosen == rejected:
        cut = chosen.rfind(HH_ASSISTANT)
        if cut < 0:
            raise DataError(f"{where}: no '\\n\\nAssistant:' in the chosen transcript (HH-RLHF layout)")
    end = cut + len(HH_ASSISTANT)
    if chosen.rfind(HH_ASSISTANT) != cut or rejected.rfind(HH_ASSISTANT) != cut:
        stats["note/hh_answer_contains_turns"] += 1   # the prompt comes from the common prefix (see docstring)
    prompt, chosen_answer, rejected_answer = chosen[:end], chosen[end:], rejected[end:]
    turns = re.findall(r"\n\n(Human|Assistant):(.*?)(?=\n\n(?:Human|Assistant):|\Z)", prompt, re.S)
    history = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
               for role, content in turns[:-1]]     # the final, empty "Assistant:" is where the answer goes
    return Conversation(history, chosen_answer.strip(), rejected_answer.strip(),
                        raw=(prompt, chosen_answer, rejected_answer))


def render_texts(conv, template, tok, stats):
    """(prompt, chosen response, rejected response) text, the full sequences being prompt + response; raw mode
    (template None) uses the data's own text, or writes the messages as an HH-style transcript."""
    if template is None:
        if conv.raw is not None:
            return conv.raw
        names = {"user": "Human", "assistant": "Assistant", "system": "System"}
        prompt = "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in conv.history)
        return prompt + HH_ASSISTANT, " " + conv.chosen, " " + conv.rejected
    special = {"bos_token": tok.bos_token or "", "eos_token": tok.eos_token}
    prompt = render_chat(template, conv.history, add_generation_prompt=True, **special)
    responses = []
    for answer in (conv.chosen, conv.rejected):
        full = render_chat(template, conv.history + [{"role": "assistant", "content": answer}], **special)
        if not full.startswith(prompt):   # a template that renders history differently once an answer follows
            stats["note/template_prompt_not_prefix"] += 1
        responses.append(full[len(prompt):] if full.startswith(prompt) else answer + tok.eos_token)
    return prompt, *responses


# -----------------------------------------------------------------------------
# Tokenization, filters, truncation

@dataclass
class TokenizedPair:
    prompt_ids: np.ndarray     # (p,) int32, BOS included where the tokenizer puts it
    chosen_ids: np.ndarray     # (c,) response tokens, EOS last unless truncated
    rejected_ids: np.ndarray   # (r,)


def tokenize_texts(tok, texts, stats):
    """[(prompt, chosen response, rejected response) text] -> [(prompt, chosen, rejected) token ids], cut from the
    tokenization of the full texts prompt+response (see the tokenization rule above); one batched call for speed."""
    flat = tok.encode_many([t for p, c, r in texts for t in (p, p + c, p + r)])
    with_eos = lambda resp: resp if tok.eos_id in resp else resp + [tok.eos_id]   # unless the template wrote it
    out = []
    for prompt_ids, full_c, full_r in zip(flat[0::3], flat[1::3], flat[2::3]):
        k = min(_common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r))
        if k < len(prompt_ids):
            stats["note/boundary_merge"] += 1
        out.append((full_c[:k], with_eos(full_c[k:]), with_eos(full_r[k:])))    # EOS after every response
    return out


def text_filter(conv, stats):
    """Section 5.1: False (the reason counted) when chosen == rejected or an answer is empty: the pair is dropped."""
    reason = ("chosen_equals_rejected" if conv.chosen == conv.rejected else
              "empty_response" if not conv.chosen.strip() or not conv.rejected.strip() else None)
    if reason:
        stats[f"dropped/{reason}"] += 1
    return reason is None


def token_filter_and_truncate(p, c, r, max_length, max_prompt_length, stats):
    """Drop a pair whose prompt is too long (over max_prompt_length), else cut its responses to max_length (never
    the prompt; a pair whose answers become identical is dropped too): a TokenizedPair or None."""
    room = max_length - len(p)
    drops = [("empty_prompt", len(p) == 0),                  # nothing would predict the first response token
             ("prompt_too_long", len(p) > max_prompt_length),
             ("chosen_equals_rejected", c == r),              # different texts that tokenize the same: no signal
             ("prompt_fills_max_length", room < 1),           # no room left for a single response token
             ("identical_after_truncation", c[:room] == r[:room])]   # they differ only past max_length
    for reason, dropped in drops:
        if dropped:
            stats[f"dropped/{reason}"] += 1
            return None
    stats.update(f"truncated/{side}" for side, ids in (("chosen", c), ("rejected", r)) if len(ids) > room)
    return TokenizedPair(*(np.asarray(ids, dtype=np.int32) for ids in (p, c[:room], r[:room])))


class PairSet:
    """Tokenized pairs stored flat (int32), so that millions of tokens stay compact; indexing (and so iterating)
    gives TokenizedPair views, and .stats counts the rows read, kept, dropped and truncated, by reason."""

    def __init__(self, pairs, stats=None, layout=None, template=None, files=(), chat_template=None):
        self.stats, self.layout, self.files, self.template = Counter(stats or {}), layout, list(files), template
        self.chat_template = chat_template          # the Jinja source the prompts were rendered with; None: raw
        parts = [[getattr(pr, f) for pr in pairs] for f in ("prompt_ids", "chosen_ids", "rejected_ids")]
        self.lengths = np.array([[len(x) for x in part] for part in parts], dtype=np.int64).T.reshape(-1, 3)  # (n, 3)
        self._flat = [np.concatenate(part).astype(np.int32) if part else np.zeros(0, np.int32) for part in parts]
        self._starts = [np.concatenate([[0], np.cumsum(self.lengths[:, j])]) for j in range(3)]

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        i = range(len(self))[i]           # negative indices, slices and IndexError as for a list
        if isinstance(i, range):
            return [self[j] for j in i]
        return TokenizedPair(*(flat[s[i]:s[i + 1]] for flat, s in zip(self._flat, self._starts)))


def pairs_crc32(pairs):
    """crc32 of the pairs' lengths and tokens, which resume checks; the same for a PairSet and a list of its pairs."""
    pairs = pairs if isinstance(pairs, PairSet) else PairSet(pairs)
    crc = zlib.crc32(np.ascontiguousarray(pairs.lengths, np.int64))
    for side in pairs._flat:                    # the prompt, chosen and rejected tokens, in pair order
        crc = zlib.crc32(side, crc)
    return crc


def check_lengths(max_length, max_prompt_length):
    """The one check of the two length limits, for build_pairs and the entry points' flags."""
    if not 0 < max_prompt_length <= max_length:
        raise DataError(f"need 0 < max_prompt_length ({max_prompt_length}) <= max_length ({max_length})")


def check_template(template):
    """auto, zephyr, raw or an existing .jinja file (resolve_template and the flag checks call it)."""
    if template not in ("auto", "zephyr", "raw") and not Path(template).is_file():
        raise FileNotFoundError(f"template must be auto, zephyr, raw or a .jinja file; not found: {template}")


def parse_columns(spec):
    """--columns "prompt=q,chosen=good,rejected=bad" -> {"prompt": "q", ...}; None or "" -> None."""
    items = [tuple(x.strip() for x in item.partition("=")[::2]) for item in (spec or "").split(",") if spec]
    for role, name in items:
        if role not in ROLES or not name:
            raise DataError(f"--columns {spec}: {role}={name} is not ROLE=COLUMN with ROLE one of {', '.join(ROLES)}")
    return dict(items) or None


def build_pairs(source, tok, *, max_length=2048, max_prompt_length=1024, template="auto", split=None, columns=None):
    """Read, parse, render, tokenize, filter and truncate every row of `source` into a PairSet."""
    check_lengths(max_length, max_prompt_length)
    files = resolve_files(source, split)
    stats, pairs, pending, layout = Counter(), [], [], None
    resolved = functools.cache(lambda layout: resolve_template(template, tok, layout))

    def flush():
        for ids in tokenize_texts(tok, pending, stats):
            pair = token_filter_and_truncate(*ids, max_length, max_prompt_length, stats)
            if pair is not None:
                pairs.append(pair)
        pending.clear()

    for where, layout, row in read_rows(files, columns):
        template_source = resolved(layout)                # resolved at the first row, then cached
        stats["rows"] += 1
        try:
            conv = parse_row(layout, row, where, stats)
            if conv is not None and text_filter(conv, stats):
                pending.append(render_texts(conv, template_source, tok, stats))
        except DataError as e:      # name the row in every message
            raise DataError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        if len(pending) == 256:
            flush()
    flush()
    stats["kept"] = len(pairs)
    return PairSet(pairs, stats, layout=layout, template=template, files=files, chat_template=resolved(layout))


def train_and_eval_pairs(source, split, eval_source, eval_split, eval_fraction, seed, tok, scratch_dir, *,
                         synthetic_pairs=2000, writer=True, barrier=None, log=print, **build_kw):
    """The training and held-out pairs of an entry point (train.py, eval_rm.py train-rm), read one way.

    A source "synthetic" is data.py's synthetic set for that side, written under scratch_dir by the `writer` process
    (rank 0; `barrier` then lets the others read it). The eval pairs are eval_source's, or with eval_split alone
    another split of source, else a seeded eval_fraction of the training pairs. -> (train pairs, eval pairs, origin:
    the sources read and their stats (eval_data None when held out), the chat_template to export (None: raw text))"""
    sources = {"train": source, "eval": source if eval_source is None and eval_split is not None else eval_source}
    for side, name, n, synthetic_seed in (("train", f"synthetic_train_{synthetic_pairs}", synthetic_pairs, 0),
                                          ("eval", "synthetic_eval", 200, 1)):
        if sources[side] == "synthetic":
            sources[side] = Path(scratch_dir) / f"{name}.parquet"
            if writer and not sources[side].exists():
                write_synthetic(sources[side], n, seed=synthetic_seed, split=side)
    if barrier is not None:
        barrier()
    pairs, origin = {}, dict.fromkeys(("data", "data_stats", "eval_data", "eval_data_stats", "chat_template"))
    for side, src, src_split in (("train", sources["train"], split), ("eval", sources["eval"], eval_split)):
        if side == "eval" and src is None:      # no eval data: hold out some of the training pairs
            pairs["train"], pairs["eval"] = hold_out(pairs["train"], eval_fraction, seed)
            if pairs["eval"]:
                log(f"eval: held out {len(pairs['eval'])} of the training pairs (--eval-fraction {eval_fraction})")
            break
        where = f"{src}" + ("" if src_split is None else f" [{src_split}]")        # the one-line errors say which side
        try:
            pairs[side] = build_pairs(src, tok, split=src_split, **build_kw)
        except (ValueError, FileNotFoundError) as e:
            raise DataError(f"{side} data: {e}") from None
        log(f"{side}: {len(pairs[side])} pairs from {where} ({stats_line(pairs[side].stats)})")
        if len(pairs[side]) == 0:
            raise DataError(f"{side} data {where}: no usable pairs after filtering ({stats_line(pairs[side].stats)})")
        prefix = "" if side == "train" else "eval_"
        origin.update({f"{prefix}data": str(src), f"{prefix}data_stats": dict(pairs[side].stats)})
        origin["chat_template"] = pairs["train"].chat_template
    return pairs["train"], pairs["eval"], origin


def hold_out(pairs, fraction, seed):
    """A seeded random `fraction` of the pairs (at least one when > 0), the same on every rank. -> (train, held out)"""
    if fraction == 0:
        return pairs, []
    n_eval = max(1, round(len(pairs) * fraction))
    if n_eval >= len(pairs):
        raise DataError(f"only {len(pairs)} usable pairs: too few to hold out {fraction:.0%} and still train")
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pairs[i] for i in perm[n_eval:]], [pairs[i] for i in perm[:n_eval]]


# -----------------------------------------------------------------------------
# Packing (pairs -> one flat, padding-free token stream) and batching (length-grouped, split across ranks, resumable)

@dataclass
class PackedBatch:
    """P pairs as one flat stream of N tokens in S segments, no padding; model.py's docstring says what a token sees.

    With shared_prompt a segment is a pair [prompt | chosen | rejected] (the prompt computed once), else a sequence
    (len, 0, 0): [prompt | chosen] per pair, then [prompt | rejected]."""
    input_ids: torch.Tensor      # (N,) long
    position_ids: torch.Tensor   # (N,) long; restarts per segment, rejected restarts at p
    seg_lens: torch.Tensor       # (S, 3) long, CPU: (shared_len, chosen_len, rejected_len) per segment
    tgt_index: torch.Tensor      # (M,) row of the hidden states that predicts target m
    tgt_ids: torch.Tensor        # (M,) target token id (of sequence tgt_seq[m])
    tgt_seq: torch.Tensor        # (M,) 0..P-1 chosen of pair p, P..2P-1 rejected of pair p
    tgt_response: torch.Tensor   # (M,) bool: counts in eq. 3's average log-prob of its sequence
    tgt_nll: torch.Tensor        # (M,) bool: counts in L_SFT (chosen only)
    n_pairs: int
    shared_prompt: bool

    def to(self, device, non_blocking=False):       # seg_lens stays on the CPU
        return replace(self, **{k: v.to(device, non_blocking=non_blocking) for k, v in vars(self).items()
                                if isinstance(v, torch.Tensor) and k != "seg_lens"})

    @property
    def num_tokens(self):
        return self.input_ids.numel()

    @property
    def n_nll_tokens(self):
        return int(self.tgt_nll.sum())


def pack_pairs(pairs, shared_prompt=True, prompt_loss=True):
    """Pack P pairs into one PackedBatch (see there). With prompt_loss the chosen sequences' prompt tokens are targets
    too, counted in the NLL but not in eq. 3; the rejected sequences' targets are their response tokens only."""
    P = len(pairs)
    if P == 0:
        raise DataError("pack_pairs needs at least one pair")
    sides = [tuple(np.asarray(x, np.int64) for x in (pr.prompt_ids, pr.chosen_ids, pr.rejected_ids)) for pr in pairs]
    for i, side in enumerate(sides):
        if min(map(len, side)) == 0:
            raise DataError(f"pair {i} has an empty prompt or response; build_pairs drops those")
    # (pair, prompt, chosen, rejected) per segment, in stream order; an answer not in the segment is empty
    none = np.zeros(0, np.int64)
    segments = [(i, p, c, r if shared_prompt else none) for i, (p, c, r) in enumerate(sides)]
    segments += [] if shared_prompt else [(i, p, none, r) for i, (p, _, r) in enumerate(sides)]
    ids, pos, segs, targets, start = [], [], [], [], 0   # targets: (rows, ids, seq, response, nll) per sequence
    for i, p, c, r in segments:
        lp, lc, lr = len(p), len(c), len(r)
        ids += [p, c, r]
        pos += [np.arange(lp + lc), np.arange(lp, lp + lr)]     # the rejected answer restarts at the prompt length
        segs.append((lp, lc, lr) if shared_prompt else (lp + lc + lr, 0, 0))
        if lc:
            first = 1 if prompt_loss else lp              # first target position within [prompt | chosen]
            t = np.arange(first, lp + lc)                 # chosen target positions; row t-1 predicts token t
            targets.append((start + t - 1, np.concatenate([p, c])[first:], i, t >= lp, True))
        if lr:      # the last prompt row predicts the first rejected token, each rejected row the next one
            targets.append((np.r_[start + lp - 1, start + lp + lc + np.arange(lr - 1)], r, P + i, True, False))
        start += lp + lc + lr
    flat = lambda arrays: torch.from_numpy(np.concatenate(arrays))
    column = lambda j: flat([np.broadcast_to(t[j], len(t[0])) for t in targets])     # (M,) int64 or bool
    return PackedBatch(input_ids=flat(ids), position_ids=flat(pos), seg_lens=torch.tensor(segs, dtype=torch.long),
                       tgt_index=column(0), tgt_ids=column(1), tgt_seq=column(2), tgt_response=column(3),
                       tgt_nll=column(4), n_pairs=P, shared_prompt=shared_prompt)


class PairBatcher:
    """This rank's PackedBatches, one epoch per `iter()`, deterministically from (seed, epoch).

    A step is one global batch of unit = world_size x grad_accum micro-batches, rank-major (rank r's micro-batch a is
    the step's r * grad_accum + a): every rank gets as many, and the ranks' ones concatenated are the global batch.
    batch_size (pairs per micro-batch): a global batch is the next unit x batch_size pairs of the epoch's order, the
    same for any split (1 rank x 2 micro-batches of 4 = 2 ranks x 1 of 4 = 1 x 1 of 8); the pairs that fill no whole
    one are left out (another remainder each epoch), or make a smaller last step: with drop_remainder=False (eval)
    or when they fill none. max_tokens: a micro-batch is packed pairs up to max_tokens on one rank, a step `unit`
    consecutive ones. Length-sorted within groups of `group_batches` global batches (default 1) or micro-batches
    (max_tokens: 50, so a budget fills evenly). Resume: state_dict() is (epoch, position) + the RESUME_SETTINGS."""
    batch_plan = 2          # 2: global batches split rank-major (1, before: batch b on rank b % world_size)
    RESUME_SETTINGS = {"world_size": "world size", "seed": "seed", "batch_size": "batch size (pairs per micro-batch)",
                       "max_tokens": "max tokens per micro-batch", "grad_accum": "grad_accum", "shared_prompt":
                       "shared_prompt", "group_batches": "group_batches", "n_pairs": "number of pairs",
                       "pairs_crc32": "checksum (crc32) of the pairs' tokens", "batch_plan": "batch plan"}

    def __init__(self, pairs, *, batch_size=None, max_tokens=None, seed=0, rank=0, world_size=1,
                 shared_prompt=True, prompt_loss=True, grad_accum=1, group_batches=None, drop_remainder=True):
        if (batch_size is None) == (max_tokens is None):
            raise DataError("give exactly one of batch_size (pairs per batch) or max_tokens (tokens per batch)")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in 0..{world_size - 1}")
        self.pairs = pairs if isinstance(pairs, PairSet) else PairSet(pairs)
        if len(self.pairs) == 0:
            raise DataError("no pairs to batch (every row was dropped? see the PairSet's stats)")
        self.seed, self.rank, self.world_size, self.grad_accum = seed, rank, world_size, grad_accum
        self.batch_size, self.max_tokens, self.drop_remainder = batch_size, max_tokens, drop_remainder
        self.shared_prompt, self.prompt_loss, self.epoch, self.position = shared_prompt, prompt_loss, 0, 0
        self.group_batches = group_batches if group_batches is not None else 50 if max_tokens is not None else 1
        self.cost = self.pairs.lengths @ [1 if shared_prompt else 2, 1, 1]   # packed tokens per pair: p (or 2p) + c + r
        self.n_pairs, self._plan = len(self.cost), None
        if max_tokens is not None and (over := int((self.cost > max_tokens).sum())):
            raise DataError(f"max_tokens {max_tokens} is less than one pair: {over} of the {self.n_pairs} pairs pack "
                            f"to more (the longest to {self.cost.max()}); raise max_tokens to that or lower max_length")

    @functools.cached_property
    def pairs_crc32(self):
        return pairs_crc32(self.pairs)                  # computed once, when a state is first saved or loaded

    def plan(self, epoch=None):
        """This rank's micro-batches (arrays of pair indices) for `epoch` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, epoch])
        order, unit, size = rng.permutation(len(self.cost)), self.world_size * self.grad_accum, self.batch_size
        longest_first = lambda o, n: [o[g:g + n][np.argsort(-self.cost[o[g:g + n]], kind="stable")]
                                      for g in range(0, len(o), n)]        # o in runs of n pairs, each sorted
        if size:
            step, kept = unit * size, len(order) // (unit * size) * unit * size     # the rest fills no global batch
            grouped = np.concatenate([order[:0], *longest_first(order[:kept], self.group_batches * step)])
            micro = list(grouped.reshape(-1, step)[rng.permutation(kept // step)].reshape(-1, size))
            if (not self.drop_remainder or kept == 0) and len(order) - kept >= unit:
                micro += np.array_split(order[kept:], unit)    # a smaller last step (or the only one)
        else:
            micro, per_micro = [], max(1, self.max_tokens // int(self.cost.mean()))      # about, for the groups
            for chunk in longest_first(order, self.group_batches * per_micro):
                start, used = 0, 0      # a micro-batch ends before the pair that would take it over max_tokens
                for end, i in enumerate(chunk):
                    if end > start and used + self.cost[i] > self.max_tokens:
                        micro.append(chunk[start:end])
                        start, used = end, 0
                    used += self.cost[i]
                micro.append(chunk[start:])
            micro = [micro[i] for i in rng.permutation(len(micro))][:len(micro) // unit * unit]
        if not micro:
            raise DataError(f"{len(order)} pairs make no step of world_size x grad_accum = {unit} micro-batches of "
                            f"{f'{size} pairs' if size else f'up to {self.max_tokens} tokens'}: more data or less batch")
        first, used = self.rank * self.grad_accum, sum(map(len, micro))     # this rank's first micro-batch of a step
        mine = [m for s in range(0, len(micro), unit) for m in micro[s + first:s + first + self.grad_accum]]
        self._plan = (epoch, mine, {"epoch": epoch, "steps": len(micro) // unit, "batches_per_rank": len(mine),
                                    "pairs_used": used, "pairs_dropped": len(order) - used})
        return mine

    def epoch_info(self, epoch=None):
        """Counts for one epoch: steps, micro-batches per rank, the pairs used and those left out (the remainder)."""
        self.plan(epoch)
        return dict(self._plan[2])

    def __len__(self):
        return len(self.plan())

    def __iter__(self):
        if self.position >= len(self):                    # the previous epoch was consumed to its end
            self.epoch, self.position = self.epoch + 1, 0
        plan = self.plan()
        while self.position < len(plan):
            self.position += 1                            # counted before the yield: a saved state skips it
            yield pack_pairs([self.pairs[int(i)] for i in plan[self.position - 1]], self.shared_prompt, self.prompt_loss)
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, **{k: getattr(self, k) for k in self.RESUME_SETTINGS}}

    def load_state_dict(self, state):
        if missing := [k for k in ("epoch", "position", *self.RESUME_SETTINGS) if k not in state]:
            raise DataError(f"cannot resume: the saved batcher state has no {', '.join(missing)} (written by an "
                            "older data.py?), so it cannot be checked against this run's settings")
        if changed := [f"{label} {state[key]}, now {getattr(self, key)}" for key, label in self.RESUME_SETTINGS.items()
                       if state[key] != getattr(self, key)]:
            raise DataError(f"cannot resume: the batcher was saved with {'; '.join(changed)} (the batches depend "
                            "on these: resume with the saved settings and data, or start a fresh run)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def rewind(self, epoch=0):
        """Make the next iteration yield `epoch` from its first batch (evaluation: the same batches every time)."""
        self.epoch, self.position = epoch, 0


# -----------------------------------------------------------------------------
# Synthetic data: tasks with an objectively right answer and a near miss, for the demo and the tests

SYNTHETIC_WORDS = ["cat", "dog", "sun", "tree", "bird", "fish", "moon", "star", "lamp", "rock", "milk", "frog",
                   "leaf", "ship", "rain", "book", "cup", "hat", "pen", "box", "kite", "corn", "wolf", "bell"]
_TASKS = [
    (re.compile(r"What is (\d+) \+ (\d+)\?"), lambda m: str(int(m[1]) + int(m[2]))),
    (re.compile(r"Reverse the word (\w+)\."), lambda m: m[1][::-1]),
    (re.compile(r"Which is larger, (\d+) or (\d+)\?"), lambda m: str(max(int(m[1]), int(m[2])))),
    (re.compile(r"Write (\w+) in capitals\."), lambda m: m[1].upper()),
]


def _synthetic_example(rng):
    kind = rng.randrange(4)                         # (prompt, right answer, near miss) of a random task
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"What is {a} + {b}?", str(a + b), str(a + b + 1 if a + b == 0 or rng.random() < 0.5 else a + b - 1)
    if kind == 2:
        a, b = rng.sample(range(10, 100), 2)
        return f"Which is larger, {a} or {b}?", str(max(a, b)), str(min(a, b))
    w = rng.choice(SYNTHETIC_WORDS)
    if kind == 3:
        return f"Write {w} in capitals.", w.upper(), w.upper()[:-1] + w[-1]
    good = w[::-1]
    j = rng.randrange(len(good) - 1)                # near miss: two neighbouring letters swapped
    bad = good[:j] + good[j + 1] + good[j] + good[j + 2:]
    return f"Reverse the word {w}.", good, bad if bad != good else w + w[0]


def synthetic_split(prompt):
    """"eval" for about one prompt in five, by a hash of the prompt alone, else "train": train and eval sets written
    with any seeds never share a prompt, so the eval set measures what was learned, not what was memorised."""
    return "eval" if zlib.crc32(prompt.encode()) % 5 == 0 else "train"


def write_synthetic(path, n_pairs, seed=0, split=None):
    """n_pairs synthetic pairs, from seed, to a parquet file; split "train" or "eval": that side of synthetic_split."""
    rng, rows = random.Random(seed), []
    while len(rows) < n_pairs:
        row = _synthetic_example(rng)
        if split is None or synthetic_split(row[0]) == split:
            rows.append(row)
    (path := Path(path)).parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")   # then renamed: a run killed while writing leaves no torn file
    pq.write_table(pa.table(dict(zip(("prompt", "chosen", "rejected"), map(list, zip(*rows))))), tmp)
    return tmp.replace(path)


def oracle_correct(prompt, response):
    """True when `response` is the right answer to a synthetic `prompt` (surrounding whitespace ignored)."""
    for pattern, answer in _TASKS:
        if m := pattern.fullmatch(prompt.strip()):
            return response.strip() == answer(m)
    raise DataError(f"not a synthetic prompt: {prompt!r}")


def synthetic_tokenizer():
    """The tiny demo's tokenizer: one token per printable ASCII character and newline, Zephyr's chat markers and
    template, and <s> prepended as Llama's tokenizer does (103 tokens)."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + chars)}, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return Tok(tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
               chat_template=ZEPHYR_TEMPLATE, name="synthetic")


# -----------------------------------------------------------------------------
# Command line: counts, length percentiles, padding compute, examples with spans marked

def stats_line(stats: dict) -> str:
    """The filter counts in one line: 'kept 2,308 of 2,312 rows; dropped: empty_response 4; truncated: ...'."""
    groups = [(kind, [f"{k.split('/', 1)[1]} {v:,}" for k, v in sorted(stats.items()) if k.startswith(kind + "/") and v])
              for kind in ("dropped", "truncated", "note")]
    return "; ".join([f"kept {stats.get('kept', 0):,} of {stats.get('rows', 0):,} rows"]
                     + [f"{kind}: " + ", ".join(items) for kind, items in groups if items])


def format_stats(pairs):         # what the command line prints
    lines = [f"layout {pairs.layout}, template {pairs.template}, {len(pairs.files)} file(s); {stats_line(pairs.stats)}"]
    if len(pairs):
        p, c, r = pairs.lengths.T
        rows = {"prompt": p, "chosen": p + c, "rejected": p + r, "chosen response": c, "rejected response": r}
        lines += ["token-length percentiles p50 p90 p99 p100"] + [f"  {name:18s} " + " ".join(
            f"{int(np.percentile(v, q)):>5d}" for q in (50, 90, 99, 100)) for name, v in rows.items()]
        unshared, shared = int((2 * p + c + r).sum()), int((p + c + r).sum())
        lines.append(f"prompt share {2 * p.sum() / unshared:.1%} of the tokens of a pair packed as two sequences: "
                     f"shared-prompt packing computes {unshared / shared:.2f}x fewer tokens")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Inspect preference data as ORPO training will see it.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", required=True, help="parquet file, folder, glob, or Hub dataset id (with --split)")
    ap.add_argument("--split", default=None, help="split of a Hub dataset or folder, e.g. train_prefs")
    ap.add_argument("--tokenizer", default="synthetic", help="tokenizer folder, tokenizer.json, Hub id or 'synthetic'")
    ap.add_argument("--template", default="auto", help="auto | zephyr | raw | path to a .jinja chat template")
    ap.add_argument("--max-length", type=int, default=2048, help="longest sequence; responses are truncated to fit")
    ap.add_argument("--max-prompt-length", type=int, default=1024, help="pairs with longer prompts are dropped")
    ap.add_argument("--columns", default=None, metavar="ROLE=NAME,...", help=f"column names; roles: {', '.join(ROLES)}")
    ap.add_argument("--show", type=int, default=0, metavar="N", help="print N examples with their spans marked")
    args = ap.parse_args(argv)
    try:
        tok = load_tokenizer(args.tokenizer)
        pairs = build_pairs(args.data, tok, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                            template=args.template, split=args.split, columns=parse_columns(args.columns))
        print(format_stats(pairs))
        piece = lambda ids: " ".join(repr(tok.tokenizer.id_to_token(int(t))) for t in ids)
        for i, pair in enumerate(pairs[:args.show]):          # the spans marked, and the tokens at the boundary
            print(f"--- pair {i}: prompt {len(pair.prompt_ids)} tokens, chosen {len(pair.chosen_ids)}, "
                  f"rejected {len(pair.rejected_ids)}\n[PROMPT]{tok.decode(pair.prompt_ids)}[/PROMPT]")
            for side, ids in (("CHOSEN", pair.chosen_ids), ("REJECTED", pair.rejected_ids)):
                print(f"[{side}]{tok.decode(ids)}[/{side}]\n"
                      f"  boundary tokens: {piece(pair.prompt_ids[-3:])} | {piece(ids[:3])}")
    except BrokenPipeError:          # output piped into `head`
        return 0
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
