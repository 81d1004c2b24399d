"""Preference data for ORPO: parquet pairs -> tokenized, masked, padding-free batches.

The pipeline, top to bottom of this file:

    parquet rows --read_rows--> Conversation (shared history, chosen answer, rejected answer)
                 --render-----> text: prompt, chosen response, rejected response (chat template or raw)
                 --tokenize---> TokenizedPair(prompt_ids, chosen_ids, rejected_ids), filtered and truncated
                 --PairBatcher/pack_pairs--> PackedBatch: one flat token stream, no padding

Four row layouts are understood (column names can be overridden, see `build_pairs(columns=...)`):
  (a) "pairs"     prompt, chosen, rejected: strings.
  (b) "messages"  UltraFeedback-binarized: chosen and rejected are lists of {role, content}; the last message
                  is the answer, the earlier ones are the shared history (which must agree between the two).
  (c) "hh"        Anthropic HH-RLHF: chosen and rejected are whole transcripts "\\n\\nHuman: ... \\n\\nAssistant: ...";
                  the prompt is their common text up to the last "\\n\\nAssistant:" it contains.
  (d) "sharegpt"  LLaMA-Factory: conversations [{from, value}], chosen and rejected {from, value}.

Templates (`template=`): "auto" uses raw text for HH-RLHF (its transcript already is the format the paper
trained base models on, as the official code did) and, for the other layouts, the tokenizer's own
chat_template, or the Zephyr template that the official ORPO code sets when the tokenizer has none.
"zephyr", "raw", or the path of a .jinja file force a choice. Raw mode uses strings as they are and writes
message lists as an HH-style transcript.

Tokenization rule (the source of many preference-training bugs): the chosen sequence is the tokenization of
the full text prompt+chosen, never the concatenation of two separate tokenizations, because tokens can merge
across the boundary. The prompt part is the longest run of leading tokens that the full sequence shares with
the prompt tokenized alone; a token that straddles the boundary therefore belongs to the response, so the
response is scored on all of its text. Chosen and rejected use the same cut, so they share one prompt.

Paper filters (section 5.1, Appendix C): a pair is dropped when chosen == rejected, when either answer is empty,
or when the prompt is longer than max_prompt_length; then every sequence is cut to max_length by truncating
its response, never its prompt (a pair whose answers become identical by that cut is dropped too). Every drop,
truncation and boundary merge is counted in PairSet.stats.

Run `python data.py --help` for the command line (stats, examples with the spans marked, synthetic data).
"""
import argparse
import functools
import glob
import json
import os
import random
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer


class DataError(ValueError):
    """Bad input data or options; the message names the file, row or option at fault."""


# -----------------------------------------------------------------------------
# Tokenizer: tokenizers.Tokenizer + the special tokens and chat template from tokenizer_config.json

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
        # Put BOS where the tokenizer's own post-processor puts it (Llama prepends <s>, OPT prepends </s>,
        # GPT-2 adds nothing): compare an encoding with and without special tokens.
        with_special = self.tokenizer.encode("a", add_special_tokens=True).ids
        without = self.tokenizer.encode("a", add_special_tokens=False).ids
        prepends = len(with_special) > len(without) and with_special[1:1 + len(without)] == without
        self.bos_id = with_special[0] if prepends else None
        self.eos_id = self.tokenizer.token_to_id(self.eos_token)
        self.pad_id = self.tokenizer.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        """Token ids of `text` with BOS where the tokenizer puts it (not twice if the text starts with it), no EOS."""
        return self._with_bos(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_many(self, texts):
        return [self._with_bos(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _with_bos(self, ids):
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, out_dir):
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (loadable by AutoTokenizer)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / "tokenizer.json"))
        special = {k: v for k, v in [("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                     ("pad_token", self.pad_token), ("unk_token", self.unk_token)] if v is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.bos_id is not None,
                  "add_eos_token": False, "clean_up_tokenization_spaces": False, **special}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        return out


def _token_str(value):
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(f):
    try:
        return json.loads(Path(f).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot parse {f}: {e}") from None


def _tokenizer_source(folder, where, error=FileNotFoundError):
    """tokenizer.json in `folder`, else (vocab.json, merges.txt) of a GPT-2-style byte-level BPE (gpt2, facebook/opt-*
    ship only those), else a one-line error naming `where` and the files looked for."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if vocab.is_file() and merges.is_file():
        return vocab, merges
    hint = ("; its tokenizer.model (SentencePiece) is not read here: save the tokenizer with transformers "
            "(AutoTokenizer.from_pretrained(...).save_pretrained(...)) to write a tokenizer.json"
            if (folder / "tokenizer.model").is_file() else "")
    raise error(f"no tokenizer in {where}: looked for tokenizer.json, or vocab.json + merges.txt (byte-level BPE){hint}")


def _added_token(value, special):
    """An AddedToken from tokenizer_config.json's string or {"content", "lstrip", ...} form."""
    from tokenizers import AddedToken
    if isinstance(value, dict):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=bool(value.get("special", special)), **flags)
    return AddedToken(str(value), special=special)


def _byte_level_bpe(vocab_json, merges_txt, config):
    """The tokenizers.Tokenizer that transformers (GPT2Tokenizer, which OPT's configs name too) builds from vocab.json +
    merges.txt: byte-level BPE, add_prefix_space from the config (default False), the config's special tokens as added
    tokens, and a post-processor that prepends BOS when add_bos_token is true (OPT: "</s>") and appends EOS when
    add_eos_token is true, as transformers 5 does (TokenizersBackend.update_post_processor)."""
    from tokenizers import decoders, models, pre_tokenizers, processors
    vocab = _read_json(vocab_json)
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise DataError(f"{vocab_json}: expected a JSON object mapping tokens to integer ids")
    merges = []
    try:
        lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {merges_txt}: {e}") from None
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise DataError(f"{merges_txt} line {n}: expected two tokens separated by one space, got {line!r}")
        merges.append(tuple(pair))
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                         end_of_word_suffix="", fuse_unk=False)
    except Exception as e:                              # e.g. a merge of tokens that are not in vocab.json
        raise DataError(f"cannot build a BPE from {vocab_json} and {merges_txt}: {e}") from None
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    tokenizer.decoder = decoders.ByteLevel()

    # Added tokens in transformers' order: added_tokens_decoder, then the named special tokens, then the extra ones.
    # A token already in vocab.json keeps its id there; any other is appended after the vocabulary.
    wanted = []                                         # (AddedToken, id the config gives it or None)
    for i, value in sorted(((int(i), v) for i, v in (config.get("added_tokens_decoder") or {}).items())):
        wanted.append((_added_token(value, special=True), i))
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        if config.get(key) is not None:
            wanted.append((_added_token(config[key], special=True), None))
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key) or []
        for value in (extra.values() if isinstance(extra, dict) else extra):
            wanted.append((_added_token(value, special=True), None))
    seen = set()
    for token, expected_id in wanted:
        if token.content in seen:
            continue
        seen.add(token.content)
        tokenizer.add_tokens([token])
        got = tokenizer.token_to_id(token.content)
        if expected_id is not None and got != expected_id:
            raise DataError(f"tokenizer_config.json gives added token {token.content!r} id {expected_id}, "
                            f"but vocab.json + merges.txt give it id {got}")

    bos = _token_str(config.get("bos_token")) if config.get("add_bos_token", False) else None
    eos = _token_str(config.get("eos_token")) if config.get("add_eos_token", False) else None
    for flag, token in (("add_bos_token", bos), ("add_eos_token", eos)):
        if token is not None and tokenizer.token_to_id(token) is None:
            raise DataError(f"tokenizer_config.json sets {flag} but {token!r} is not in the vocabulary")
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = " ".join([single] + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tokenizer.token_to_id(t)) for t in dict.fromkeys([bos, eos]) if t])
    return tokenizer


def _tok_from_files(source, config_json=None, special_map_json=None, template_file=None, name=""):
    """A Tok from `source` (a tokenizer.json, or a (vocab.json, merges.txt) pair) and the config files beside it."""
    config = {}
    for f in (special_map_json, config_json):          # tokenizer_config.json wins over special_tokens_map.json
        if f is not None and Path(f).is_file():
            config.update(_read_json(f))
    if isinstance(source, tuple):
        tokenizer = _byte_level_bpe(*source, config)
    else:
        try:
            tokenizer = Tokenizer.from_file(str(source))
        except Exception as e:
            raise DataError(f"cannot read tokenizer file {source}: {e}") from None
    template = config.get("chat_template")
    if isinstance(template, list):                      # named templates: [{"name": "default", "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    if template is None and template_file is not None and Path(template_file).is_file():
        template = Path(template_file).read_text()     # transformers >= 4.43 may save it beside the config
    return Tok(tokenizer, bos_token=_token_str(config.get("bos_token")), eos_token=_token_str(config.get("eos_token")),
               pad_token=_token_str(config.get("pad_token")), unk_token=_token_str(config.get("unk_token")),
               chat_template=template, name=name)


def load_tokenizer(path_or_name):
    """A Tok from a folder (tokenizer.json, or a GPT-2-style vocab.json + merges.txt, with tokenizer_config.json),
    a tokenizer.json file, a Hub model id, or "synthetic" (the tiny demo tokenizer)."""
    name = str(path_or_name)
    if name == "synthetic":
        return synthetic_tokenizer()
    path = Path(name)
    if path.is_file():
        folder = path.parent            # tokenizer.json or tokenizer_config.json: the rest sits beside it
        source = _tokenizer_source(folder, folder) if path.name == "tokenizer_config.json" else path
    elif path.is_dir():
        folder = path
        source = _tokenizer_source(folder, path)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        folder = _hub_download(name, "model", ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                                                "special_tokens_map.json", "chat_template.jinja"])
        source = _tokenizer_source(folder, f"Hub model {name}", error=DataError)
    else:
        raise FileNotFoundError(f"tokenizer not found: {name} (a folder, a tokenizer.json, a Hub id, or 'synthetic')")
    return _tok_from_files(source, folder / "tokenizer_config.json", folder / "special_tokens_map.json",
                           folder / "chat_template.jinja", name=name)


def _hub_download(repo_id, repo_type, allow_patterns):
    """snapshot_download with a clear error; HF_HUB_OFFLINE=1 makes it use the local cache only."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns))
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        hint = "it is not in the local cache (HF_HUB_OFFLINE is set)" if offline else \
            "no network, or the repo does not exist; set HF_HUB_OFFLINE=1 to use the cache or pass a local path"
        raise DataError(f"cannot fetch {repo_type} {repo_id!r} from the Hugging Face Hub: {hint} "
                        f"({type(e).__name__})") from None


# -----------------------------------------------------------------------------
# Chat templates, rendered through Jinja exactly as transformers' apply_chat_template does

# The template the official ORPO code (xfactlab/orpo, main.py) sets on tokenizers without one: Zephyr's.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}")


@functools.lru_cache(maxsize=8)
def _compile_template(source):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # Same environment as transformers: templates from the Hub are untrusted, hence the sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"chat template does not parse: {e}") from None


def render_chat(template, messages, *, add_generation_prompt=False, bos_token="<s>", eos_token="</s>", **extra):
    """Render a list of {role, content} messages with a chat template source string."""
    import jinja2
    try:
        return _compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  bos_token=bos_token, eos_token=eos_token, **extra)
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"chat template refused the conversation: {e}") from None


def resolve_template(template, tok, layout):
    """The template source for `template` ("auto" | "zephyr" | "raw" | path to .jinja), or None for raw text."""
    if template == "raw":
        return None
    if template == "zephyr":
        return ZEPHYR_TEMPLATE
    if template == "auto":
        if layout == "hh":
            return None      # HH-RLHF transcripts are already formatted text (the paper's base-model runs)
        return tok.chat_template or ZEPHYR_TEMPLATE
    check_template(template)
    return Path(template).read_text()


# -----------------------------------------------------------------------------
# Reading parquet: files, folders, globs or Hub datasets, one row group at a time

def resolve_files(source, split=None):
    """The parquet files of `source`: a file, a folder, a glob, or a Hub dataset id (needs `split`).

    Splits are never guessed: a Hub id needs one; a folder is read whole unless its files belong to two or
    more splits (then a split must be given, so that test pairs cannot leak into training); a file or a glob
    has no splits, so a split given with one is an error rather than ignored."""
    source = str(source)
    path = Path(source)
    is_glob = not path.exists() and any(c in source for c in "*?[")
    if split and (path.is_file() or is_glob):
        what = "a single parquet file" if path.is_file() else "a glob"
        raise DataError(f"split {split!r} was given but {source} is {what}, which has no splits: point at a "
                        "folder or a Hub dataset, or drop the split")
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _nonempty(sorted(path.rglob("*.parquet")), source)
        return _select_split(files, split, source) if split else _whole_folder(files, source)
    if is_glob:
        return _nonempty([Path(f) for f in sorted(glob.glob(source, recursive=True))], source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        if not split:
            raise DataError(f"{source} looks like a Hub dataset id: give its split (e.g. --split train_prefs)")
        folder = _hub_download(source, "dataset", [f"*{split}-*.parquet", f"*{split}.parquet", f"*{split}/*.parquet"])
        return _select_split(sorted(folder.rglob("*.parquet")), split, source)
    raise FileNotFoundError(f"data not found: {source} (a parquet file, a folder, a glob, or a Hub dataset id)")


def _nonempty(files, source):
    if not files:
        raise FileNotFoundError(f"no parquet files in {source}")
    return files


def _select_split(files, split, source):
    """Hub layout: data/<split>-00000-of-00001.parquet, <split>.parquet or <split>/*.parquet."""
    chosen = [f for f in files if f.name.startswith(f"{split}-") or f.stem == split or f.parent.name == split]
    if not chosen:
        raise FileNotFoundError(f"no parquet files for split {split!r} in {source}")
    return chosen


# The names by which a file shows its split, in the layouts _select_split reads. A shard name
# <split>-00000-of-00003.parquet is what the Hub writes; a bare <split>.parquet or <split>/ folder counts only
# for the usual split words (train, test, validation, ... and train_prefs-style variants), because
# en.parquet + fr.parquet, or shards/2024/ + shards/2025/, are parts of one dataset, not splits.
_SHARD_NAME = re.compile(r"(\w+)-\d+-of-\d+.*\.parquet")
_SPLIT_WORD = re.compile(r"(train|training|test|testing|valid|validation|val|dev|eval|evaluation)(_\w+)?")


def _split_of(f):
    """The split a parquet file belongs to, or None when its name and folder show none."""
    shard = _SHARD_NAME.fullmatch(f.name)
    if shard:
        return shard[1]
    for name in (f.stem, f.parent.name):
        if _SPLIT_WORD.fullmatch(name):
            return name
    return None


def _whole_folder(files, source):
    """All of a folder's files, unless they belong to several splits (a Hub snapshot): then a split is needed."""
    splits = sorted({s for s in map(_split_of, files) if s is not None})
    if len(splits) > 1:
        raise DataError(f"{source} holds the parquet files of {len(splits)} splits ({', '.join(splits)}): give "
                        "the split to read, or a glob to read them all together")
    return files


LAYOUTS = ("pairs", "messages", "hh", "sharegpt")
ROLES = ("prompt", "chosen", "rejected", "conversations", "system")   # overridable column names


def detect_layout(schema, columns, where):
    """(layout, {role: column}) from a parquet schema; `columns` maps a role to the user's column name."""
    col = {role: (columns or {}).get(role, role) for role in ROLES}
    names = schema.names
    has = {role: col[role] in names for role in ROLES}
    if has["chosen"] and has["rejected"]:
        kind = schema.field(col["chosen"]).type
        if has["conversations"]:
            layout = "sharegpt"
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            layout = "pairs" if has["prompt"] else "hh"
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            layout = "messages"
        else:
            layout = None
        if layout:
            wanted = {"pairs": ["prompt", "chosen", "rejected"], "hh": ["chosen", "rejected"],
                      "messages": ["prompt", "chosen", "rejected"], "sharegpt": ["conversations", "chosen", "rejected",
                                                                                 "system"]}[layout]
            return layout, {r: col[r] for r in wanted if has[r]}
    raise DataError(f"{where}: no known preference layout in columns {names}; expected prompt/chosen/rejected "
                    "strings, UltraFeedback message lists, HH-RLHF chosen/rejected transcripts, or ShareGPT "
                    "conversations/chosen/rejected (override names with --prompt-column/--chosen-column/"
                    "--rejected-column/--conversations-column)")


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
        layout = file_layout
        row = 0
        for rg in range(pf.num_row_groups):
            try:
                table = pf.read_row_group(rg, columns=list(colmap.values()))
            except Exception as e:
                raise DataError(f"cannot read row group {rg} of {f}: {e}") from None
            for record in table.to_pylist():
                yield f"{f} row {row}", layout, {role: record[c] for role, c in colmap.items()}
                row += 1


# -----------------------------------------------------------------------------
# Row layouts -> Conversation

@dataclass
class Conversation:
    history: list          # shared messages [{role, content}], ending before the answer
    chosen: str            # the chosen answer
    rejected: str          # the rejected answer
    raw: tuple | None = None   # (prompt, chosen, rejected) text for raw mode when the data has its own format


HH_ASSISTANT = "\n\nAssistant:"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _string(value, what, where):
    if value is None:
        raise DataError(f"{where}: {what} is null")
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} is {type(value).__name__}, expected a string")
    return value


def _message(m, what, where, role_key="role", content_key="content", role_map=None):
    if not isinstance(m, dict):
        raise DataError(f"{where}: {what} is {type(m).__name__}, expected a {{{role_key}, {content_key}}} message")
    role = _string(m.get(role_key), f"{what} {role_key}", where)
    if role_map is not None:
        if role not in role_map:
            raise DataError(f"{where}: {what} has role {role!r}; expected one of {sorted(role_map)}")
        role = role_map[role]
    return {"role": role, "content": _string(m.get(content_key), f"{what} {content_key}", where)}


def parse_row(layout, row, where, stats):
    """A Conversation, or None when the row is dropped (the reason is counted in `stats`)."""
    if layout == "pairs":
        prompt = _string(row["prompt"], "prompt", where)
        chosen, rejected = (_string(row[k], k, where) for k in ("chosen", "rejected"))
        return Conversation([{"role": "user", "content": prompt}], chosen, rejected, raw=(prompt, chosen, rejected))
    if layout == "hh":
        return _parse_hh(_string(row["chosen"], "chosen", where), _string(row["rejected"], "rejected", where),
                         where, stats)
    if layout == "messages":
        sides = {}
        for side in ("chosen", "rejected"):
            msgs = row[side]
            if msgs is None:
                raise DataError(f"{where}: {side} is null")
            msgs = [_message(m, f"{side} message {i}", where) for i, m in enumerate(msgs)]
            if not msgs or msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: {side} has no assistant message at the end")
            sides[side] = msgs
        history = sides["chosen"][:-1]
        if history != sides["rejected"][:-1]:
            stats["dropped/history_mismatch"] += 1      # the two answers do not reply to the same conversation
            return None
        if not history:
            history = [{"role": "user", "content": _string(row.get("prompt"), "prompt", where)}]
        return Conversation(history, sides["chosen"][-1]["content"], sides["rejected"][-1]["content"])
    if layout == "sharegpt":
        turns = row["conversations"]
        if turns is None:
            raise DataError(f"{where}: conversations is null")
        history = [_message(m, f"conversations[{i}]", where, "from", "value", SHAREGPT_ROLES)
                   for i, m in enumerate(turns)]
        if row.get("system"):
            history = [{"role": "system", "content": _string(row["system"], "system", where)}] + history
        answers = [_message(row[s], s, where, "from", "value", SHAREGPT_ROLES) for s in ("chosen", "rejected")]
        for side, a in zip(("chosen", "rejected"), answers):
            if a["role"] != "assistant":
                raise DataError(f"{where}: {side} is from role {a['role']!r}, expected an assistant (gpt) turn")
        if not any(m["role"] == "user" for m in history):
            raise DataError(f"{where}: conversations has no human turn")
        return Conversation(history, answers[0]["content"], answers[1]["content"])
    raise DataError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def _common_prefix(a, b):
    """Length of the common prefix of two sequences (binary search on slice equality: C speed on long texts)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _parse_hh(chosen, rejected, where, stats):
    """HH-RLHF: the prompt is the common text up to the last "\\n\\nAssistant:" inside it.

    Splitting each transcript at its own last "Assistant:" is not enough: in a few real rows one answer itself
    contains "\\n\\nAssistant:" or extra turns, and the two prompts would then differ."""
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
    history = []
    for role, content in re.findall(r"\n\n(Human|Assistant):(.*?)(?=\n\n(?:Human|Assistant):|\Z)", prompt, re.S):
        history.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    history = history[:-1]     # the final, empty "Assistant:" is where the answer goes
    return Conversation(history, chosen_answer.strip(), rejected_answer.strip(),
                        raw=(prompt, chosen_answer, rejected_answer))


def transcript(history):
    """Raw-mode rendering of messages: an HH-style "\\n\\nHuman: ...\\n\\nAssistant:" transcript."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in history) + HH_ASSISTANT


def render_texts(conv, template, tok, stats):
    """(prompt, chosen response, rejected response) text; the full sequences are prompt + response."""
    if template is None:
        if conv.raw is not None:
            return conv.raw
        return transcript(conv.history), " " + conv.chosen, " " + conv.rejected
    special = {"bos_token": tok.bos_token or "", "eos_token": tok.eos_token}
    prompt = render_chat(template, conv.history, add_generation_prompt=True, **special)
    responses = []
    for answer in (conv.chosen, conv.rejected):
        full = render_chat(template, conv.history + [{"role": "assistant", "content": answer}], **special)
        if full.startswith(prompt):
            responses.append(full[len(prompt):])
        else:   # a template that renders history differently once an answer follows: answer text + EOS
            stats["note/template_prompt_not_prefix"] += 1
            responses.append(answer + tok.eos_token)
    return prompt, responses[0], responses[1]


# -----------------------------------------------------------------------------
# Tokenization, filters, truncation

@dataclass
class TokenizedPair:
    prompt_ids: np.ndarray     # (p,) int32, BOS included where the tokenizer puts it
    chosen_ids: np.ndarray     # (c,) response tokens, EOS last unless truncated
    rejected_ids: np.ndarray   # (r,)


def tokenize_texts(tok, texts, stats):
    """[(prompt, chosen response, rejected response) text] -> [(prompt, chosen, rejected) token ids].

    The ids are cut from the tokenization of the full texts prompt+response, so merges across the boundary
    cannot make the pieces disagree with the sequence the model sees. One batched call for speed."""
    flat = tok.encode_many([t for p, c, r in texts for t in (p, p + c, p + r)])
    out = []
    for prompt_ids, full_c, full_r in zip(flat[0::3], flat[1::3], flat[2::3]):
        # The prompt is the run of leading tokens the full sequences share with the prompt tokenized alone;
        # a token merged across the boundary goes to the response. Chosen and rejected cut at the same place.
        k = min(_common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r))
        if k < len(prompt_ids):
            stats["note/boundary_merge"] += 1
        responses = []
        for full in (full_c, full_r):
            resp = full[k:]
            if tok.eos_id not in resp:       # EOS after every response, unless the template already wrote it
                resp = resp + [tok.eos_id]
            responses.append(resp)
        out.append((full_c[:k], responses[0], responses[1]))
    return out


def text_filter(conv, stats):
    """The paper's text filters (section 5.1): False (and the reason counted) when the pair is dropped."""
    if conv.chosen == conv.rejected:
        stats["dropped/chosen_equals_rejected"] += 1
    elif not conv.chosen.strip() or not conv.rejected.strip():
        stats["dropped/empty_response"] += 1
    else:
        return True
    return False


def token_filter_and_truncate(p, c, r, max_length, max_prompt_length, stats):
    """Drop pairs whose prompt is too long, then cut responses to max_length; a TokenizedPair or None."""
    if len(p) == 0:
        stats["dropped/empty_prompt"] += 1   # nothing would predict the first response token
        return None
    if len(p) > max_prompt_length:
        stats["dropped/prompt_too_long"] += 1
        return None
    if c == r:                               # different texts that tokenize the same: no preference signal
        stats["dropped/chosen_equals_rejected"] += 1
        return None
    room = max_length - len(p)
    if room < 1:
        stats["dropped/prompt_fills_max_length"] += 1   # no room left for a single response token
        return None
    if c[:room] == r[:room]:                 # the answers differ only past max_length: no signal left either
        stats["dropped/identical_after_truncation"] += 1
        return None
    if len(c) > room:
        stats["truncated/chosen"] += 1
        c = c[:room]
    if len(r) > room:
        stats["truncated/rejected"] += 1
        r = r[:room]
    as_array = functools.partial(np.asarray, dtype=np.int32)
    return TokenizedPair(as_array(p), as_array(c), as_array(r))


class PairSet:
    """The tokenized pairs of a dataset, stored flat (int32) so that millions of tokens stay compact.

    Indexing gives TokenizedPair views; .stats counts rows read, kept, dropped and truncated by reason."""

    def __init__(self, pairs, stats=None, layout=None, template=None, files=()):
        self.stats, self.layout, self.template, self.files = Counter(stats or {}), layout, template, list(files)
        parts = [[getattr(pr, f) for pr in pairs] for f in ("prompt_ids", "chosen_ids", "rejected_ids")]
        self.lengths = np.array([[len(x) for x in part] for part in parts], dtype=np.int64).T.reshape(-1, 3)  # (n, 3)
        self._flat = [np.concatenate(part).astype(np.int32) if part else np.zeros(0, np.int32) for part in parts]
        self._starts = [np.concatenate([[0], np.cumsum(self.lengths[:, j])]) for j in range(3)]

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        return TokenizedPair(*(flat[s[i]:s[i + 1]] for flat, s in zip(self._flat, self._starts)))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def check_lengths(max_length, max_prompt_length):
    """The one check of the two length limits (build_pairs and the entry points' flag checks call it)."""
    if not 0 < max_prompt_length <= max_length:
        raise DataError(f"need 0 < max_prompt_length ({max_prompt_length}) <= max_length ({max_length})")


def check_template(template):
    """auto, zephyr, raw or an existing .jinja file (resolve_template and the flag checks call it)."""
    if template not in ("auto", "zephyr", "raw") and not Path(template).is_file():
        raise FileNotFoundError(f"template must be auto, zephyr, raw or a .jinja file; not found: {template}")


def parse_columns(spec):
    """--columns "prompt=q,chosen=good,rejected=bad" -> {"prompt": "q", ...}; None or "" -> None."""
    if not spec:
        return None
    columns = {}
    for item in spec.split(","):
        role, _, name = item.partition("=")
        if role.strip() not in ROLES or not name.strip():
            raise DataError(f"--columns {spec}: {item!r} is not ROLE=COLUMN with ROLE one of {', '.join(ROLES)}")
        columns[role.strip()] = name.strip()
    return columns


def build_pairs(source, tok, *, max_length=2048, max_prompt_length=1024, template="auto", split=None, columns=None):
    """Read, parse, render, tokenize, filter and truncate every row of `source` into a PairSet."""
    check_lengths(max_length, max_prompt_length)
    files = resolve_files(source, split)
    stats, pairs, pending, resolved, layout = Counter(), [], [], None, None

    def flush():
        for ids in tokenize_texts(tok, pending, stats):
            pair = token_filter_and_truncate(*ids, max_length, max_prompt_length, stats)
            if pair is not None:
                pairs.append(pair)
        pending.clear()

    for where, layout, row in read_rows(files, columns):
        if resolved is None:
            resolved = (resolve_template(template, tok, layout),)
        stats["rows"] += 1
        try:
            conv = parse_row(layout, row, where, stats)
            if conv is not None and text_filter(conv, stats):
                pending.append(render_texts(conv, resolved[0], tok, stats))
        except DataError as e:      # name the row in every message
            raise DataError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        if len(pending) == 256:
            flush()
    flush()
    stats["kept"] = len(pairs)
    return PairSet(pairs, stats, layout=layout, template=template, files=files)


# -----------------------------------------------------------------------------
# Packing: pairs -> one flat, padding-free token stream

@dataclass
class PackedBatch:
    """P pairs as one flat stream of N tokens in S segments, no padding; what model.py and train.py read.

    Segments: seg_lens[s] = (shared_len, chosen_len, rejected_len). With shared_prompt a segment is one pair,
    [prompt | chosen | rejected], so the prompt is computed once for both answers; without it every sequence
    is a segment of its own, (len, 0, 0): [prompt | chosen] for each pair, then [prompt | rejected] for each.
    Attention: a token sees the earlier tokens of its own segment, except that a rejected token never sees a
    chosen one. Positions restart at 0 in each segment, and the rejected answer's restart at the prompt length,
    so every token sees exactly what it would see in its own unpacked [prompt | answer] sequence.
    Targets (M of them): hidden-state row tgt_index[m] predicts token tgt_ids[m] of sequence tgt_seq[m]
    (0..P-1 the chosen sequences, P..2P-1 the rejected ones). tgt_response marks the response tokens that
    eq. 3 averages; tgt_nll marks the tokens of L_SFT (chosen sequences only). The layouts differ only in
    the stream, never in the targets' contexts, so they give the same log-probs.
    """
    input_ids: torch.Tensor      # (N,) long
    position_ids: torch.Tensor   # (N,) long; restarts per segment, rejected restarts at p
    seg_lens: torch.Tensor       # (S, 3) long, CPU: (shared_len, chosen_len, rejected_len) per segment
    tgt_index: torch.Tensor      # (M,) row of the hidden states that predicts each target
    tgt_ids: torch.Tensor        # (M,) target token id
    tgt_seq: torch.Tensor        # (M,) 0..P-1 chosen of pair p, P..2P-1 rejected of pair p
    tgt_response: torch.Tensor   # (M,) bool: counts in eq. 3's average log-prob of its sequence
    tgt_nll: torch.Tensor        # (M,) bool: counts in L_SFT (chosen only)
    n_pairs: int
    shared_prompt: bool

    def to(self, device, non_blocking=False):
        moved = {k: getattr(self, k).to(device, non_blocking=non_blocking) for k in
                 ("input_ids", "position_ids", "tgt_index", "tgt_ids", "tgt_seq", "tgt_response", "tgt_nll")}
        return PackedBatch(seg_lens=self.seg_lens, n_pairs=self.n_pairs, shared_prompt=self.shared_prompt, **moved)

    @property
    def num_tokens(self):
        return self.input_ids.numel()

    @property
    def n_nll_tokens(self):
        return int(self.tgt_nll.sum())

    @property
    def cu_seqlens(self):
        """(S + 1,) int32 segment boundaries, as flash-attn's varlen kernels want them."""
        return torch.nn.functional.pad(self.seg_lens.sum(1).cumsum(0), (1, 0)).to(torch.int32)


def pack_pairs(pairs, shared_prompt=True, prompt_loss=True):
    """Pack P pairs into one PackedBatch; per-sequence targets are identical in both layouts.

    shared_prompt=True:  P segments [prompt | chosen | rejected], the prompt computed once (see PackedBatch).
    shared_prompt=False: 2P segments, [prompt | chosen] for every pair, then [prompt | rejected] for every pair.
    Targets: the chosen sequence of pair i (tgt_seq i) has its prompt tokens (only when prompt_loss: they count in
    the NLL, not in eq. 3) and its response tokens; the rejected one (tgt_seq P + i) has its response tokens only.
    """
    P = len(pairs)
    if P == 0:
        raise DataError("pack_pairs needs at least one pair")
    ids, pos, segs, targets = [], [], [], []     # targets: (rows, ids, seq, response, nll) per sequence
    start = 0
    sides = [(np.asarray(pr.prompt_ids, np.int64), np.asarray(pr.chosen_ids, np.int64),
              np.asarray(pr.rejected_ids, np.int64)) for pr in pairs]
    for i, (p, c, r) in enumerate(sides):
        if len(p) == 0 or len(c) == 0 or len(r) == 0:
            raise DataError(f"pair {i} has an empty prompt or response; build_pairs drops those")
        lp, lc, lr = len(p), len(c), len(r)
        first = 1 if prompt_loss else lp                  # first target position within [prompt | chosen]
        t = np.arange(first, lp + lc)                     # chosen target positions; row t-1 predicts token t
        targets.append((start + t - 1, np.concatenate([p, c])[first:], i, t >= lp, True))
        if shared_prompt:
            ids += [p, c, r]
            pos += [np.arange(lp + lc), np.arange(lp, lp + lr)]
            segs.append((lp, lc, lr))
            # the first rejected token is predicted by the last prompt row; later ones by the rejected rows
            rows = start + lp + lc + np.arange(lr) - 1
            rows[0] = start + lp - 1
            targets.append((rows, r, P + i, True, False))
            start += lp + lc + lr
        else:
            ids += [p, c]
            pos.append(np.arange(lp + lc))
            segs.append((lp + lc, 0, 0))
            start += lp + lc
    if not shared_prompt:
        for i, (p, _, r) in enumerate(sides):
            lp, lr = len(p), len(r)
            ids += [p, r]
            pos.append(np.arange(lp + lr))
            segs.append((lp + lr, 0, 0))
            targets.append((start + lp - 1 + np.arange(lr), r, P + i, True, False))
            start += lp + lr
    n = [len(t[0]) for t in targets]
    as_long = lambda arrays: torch.from_numpy(np.concatenate(arrays).astype(np.int64))
    return PackedBatch(
        input_ids=as_long(ids), position_ids=as_long(pos), seg_lens=torch.tensor(segs, dtype=torch.long),
        tgt_index=as_long([t[0] for t in targets]), tgt_ids=as_long([t[1] for t in targets]),
        tgt_seq=torch.repeat_interleave(torch.tensor([t[2] for t in targets]), torch.tensor(n)),
        tgt_response=torch.from_numpy(np.concatenate([np.broadcast_to(t[3], k) for t, k in zip(targets, n)])),
        tgt_nll=torch.from_numpy(np.concatenate([np.broadcast_to(t[4], k) for t, k in zip(targets, n)])),
        n_pairs=P, shared_prompt=shared_prompt)


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


# -----------------------------------------------------------------------------
# Batching: length-grouped, deterministic, split across ranks, resumable

class PairBatcher:
    """Yields this rank's PackedBatches for one epoch per `iter()`, deterministically from (seed, epoch).

    Batch size: `batch_size` pairs per batch, or `max_tokens` packed tokens per batch (counted in the layout
    chosen by `shared_prompt`; a single pair larger than the budget gets a batch of its own).
    Length grouping: the shuffled pairs are cut into groups of ~`group_batches` batches, sorted by length inside
    each group and cut into batches, so a batch holds pairs of similar length; then the batch order is shuffled.
    It pays only with a token budget, where similar lengths fill each batch evenly; with a fixed number of pairs
    packing wastes nothing, and grouping would only make batches less random (on the synthetic data, one task
    per batch). So by default (group_batches=None) it is 50 with max_tokens and off (1) with batch_size.
    Ranks: batch b goes to rank b % world_size. Every rank gets the same number of batches, a multiple of
    grad_accum, so that FSDP's collectives line up; the remainder batches are left out of this epoch and counted
    in `epoch_info()` (different pairs are left out each epoch, since the shuffle changes).
    Gradient accumulation: each batch is one micro-batch; `steps()` yields lists of grad_accum micro-batches
    (one optimizer step). For exact normalisation, sum `n_pairs` and `tgt_nll.sum()` over the list (and over
    ranks) before dividing, rather than averaging per micro-batch.
    Resume: state_dict() is (epoch, position = micro-batches already yielded this epoch) and the settings the
    batches depend on (RESUME_SETTINGS, with a checksum of the pairs); load_state_dict() refuses a state saved
    under other settings, since the same position would then name other pairs, and otherwise makes the next
    iteration yield exactly the rest of that epoch. rewind() restarts an epoch (evaluation).

    In train.py, with a global batch of G pairs per optimizer step (the paper: 32):
        batcher = PairBatcher(pairs, batch_size=G // (world_size * grad_accum), seed=seed, rank=rank,
                              world_size=world_size, grad_accum=grad_accum)
        for micro_batches in batcher.steps():
            n_pairs = sum(b.n_pairs for b in micro_batches)          # all-reduce (sum) these over ranks,
            n_nll = sum(b.n_nll_tokens for b in micro_batches)       # then divide each micro-batch's sums
    """

    def __init__(self, pairs, *, batch_size=None, max_tokens=None, seed=0, rank=0, world_size=1,
                 shared_prompt=True, prompt_loss=True, grad_accum=1, group_batches=None):
        if (batch_size is None) == (max_tokens is None):
            raise DataError("give exactly one of batch_size (pairs per batch) or max_tokens (tokens per batch)")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in 0..{world_size - 1}")
        self.pairs, self.seed, self.rank, self.world_size = pairs, seed, rank, world_size
        self.batch_size, self.max_tokens = batch_size, max_tokens
        if group_batches is None:
            group_batches = 50 if max_tokens is not None else 1
        self.grad_accum, self.group_batches = grad_accum, group_batches
        self.shared_prompt, self.prompt_loss = shared_prompt, prompt_loss
        lengths = pair_lengths(pairs)
        if len(lengths) == 0:
            raise DataError("no pairs to batch (every row was dropped? see the PairSet's stats)")
        p, c, r = lengths.T
        self.cost = (p + c + r) if shared_prompt else (2 * p + c + r)   # packed tokens per pair
        self.epoch, self.position = 0, 0
        self._plan_cache, self._checksum = None, None

    def _global_plan(self, epoch):
        """All batches of `epoch` (lists of pair indices) in order, before the rank split."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.cost))
        pairs_per_batch = self.batch_size or max(1, self.max_tokens // max(1, int(self.cost.mean())))
        group = self.group_batches * pairs_per_batch
        batches = []
        for g in range(0, len(order), group):
            chunk = order[g:g + group]
            chunk = chunk[np.argsort(-self.cost[chunk], kind="stable")]     # longest first within the group
            batches += self._cut(chunk)
        return [batches[i] for i in rng.permutation(len(batches))]

    def _cut(self, chunk):
        if self.batch_size is not None:
            return [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        batches, current, used = [], [], 0
        for i in chunk:
            if current and used + self.cost[i] > self.max_tokens:
                batches.append(np.array(current))
                current, used = [], 0
            current.append(i)
            used += self.cost[i]
        if current:
            batches.append(np.array(current))
        return batches

    def plan(self, epoch=None):
        """This rank's batches (arrays of pair indices) for `epoch` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            batches = self._global_plan(epoch)
            unit = self.world_size * self.grad_accum
            kept = len(batches) // unit * unit
            if kept == 0:
                raise DataError(f"{len(self.cost)} pairs make {len(batches)} batches, fewer than world_size x "
                                f"grad_accum = {unit}: use a smaller batch or more data")
            dropped = sum(len(b) for b in batches[kept:])
            info = {"epoch": epoch, "batches_per_rank": kept // self.world_size, "batches_dropped": len(batches) - kept,
                    "pairs_dropped": dropped, "pairs_used": sum(len(b) for b in batches[:kept])}
            self._plan_cache = (epoch, batches[self.rank:kept:self.world_size], info)
        return self._plan_cache[1]

    def epoch_info(self, epoch=None):
        """Counts for one epoch: batches per rank, and the remainder batches/pairs left out to keep ranks equal."""
        self.plan(epoch)
        return dict(self._plan_cache[2])

    def __len__(self):
        return len(self.plan())

    def __iter__(self):
        if self.position >= len(self):                    # the previous epoch was consumed to its end
            self.epoch, self.position = self.epoch + 1, 0
        plan = self.plan()
        while self.position < len(plan):
            idx = plan[self.position]
            self.position += 1                            # counted before the yield: a saved state skips it
            yield pack_pairs([self.pairs[int(i)] for i in idx], self.shared_prompt, self.prompt_loss)
        self.epoch, self.position = self.epoch + 1, 0

    def steps(self):
        """One epoch as optimizer steps: lists of grad_accum micro-batches."""
        step = []
        for batch in self:
            step.append(batch)
            if len(step) == self.grad_accum:
                yield step
                step = []

    # What a saved (epoch, position) means depends on these: under any other value it names other pairs.
    RESUME_SETTINGS = {"world_size": "world size", "seed": "seed", "batch_size": "batch size (pairs per micro-batch)",
                       "max_tokens": "max tokens per micro-batch", "grad_accum": "grad_accum",
                       "shared_prompt": "shared_prompt", "group_batches": "group_batches",
                       "n_pairs": "number of pairs", "pairs_crc32": "checksum (crc32) of the pairs' tokens"}

    def settings(self):
        """The values of RESUME_SETTINGS for this batcher (the checksum is computed once, on first use)."""
        if self._checksum is None:
            self._checksum = pairs_crc32(self.pairs)
        return {"world_size": self.world_size, "seed": self.seed, "batch_size": self.batch_size,
                "max_tokens": self.max_tokens, "grad_accum": self.grad_accum, "shared_prompt": self.shared_prompt,
                "group_batches": self.group_batches, "n_pairs": len(self.cost), "pairs_crc32": self._checksum}

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, **self.settings()}

    def load_state_dict(self, state):
        missing = [k for k in ("epoch", "position", *self.RESUME_SETTINGS) if k not in state]
        if missing:
            raise DataError(f"cannot resume: the saved batcher state has no {', '.join(missing)} (written by an "
                            "older data.py?), so it cannot be checked against this run's settings")
        now = self.settings()
        changed = [f"{label} {state[key]}, now {now[key]}" for key, label in self.RESUME_SETTINGS.items()
                   if state[key] != now[key]]
        if changed:
            raise DataError(f"cannot resume: the batcher was saved with {'; '.join(changed)} (the batches depend "
                            "on these: resume with the saved settings and data, or start a fresh run)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def rewind(self, epoch=0):
        """Make the next iteration yield `epoch` from its first batch (evaluation: the same batches every time)."""
        self.epoch, self.position = epoch, 0


def pair_lengths(pairs):
    """(n, 3) int64 (prompt, chosen, rejected) token counts of a PairSet or a list of TokenizedPairs."""
    if isinstance(pairs, PairSet):
        return pairs.lengths
    return np.array([[len(x.prompt_ids), len(x.chosen_ids), len(x.rejected_ids)] for x in pairs],
                    np.int64).reshape(-1, 3)


def pairs_crc32(pairs):
    """crc32 of the pairs' lengths and token ids: a cheap check that a resumed run batches the same pairs.

    Equal for a PairSet and a list of its TokenizedPairs (train.py holds eval pairs out as a list)."""
    crc = zlib.crc32(np.ascontiguousarray(pair_lengths(pairs), np.int64))
    for j, side in enumerate(("prompt_ids", "chosen_ids", "rejected_ids")):
        if isinstance(pairs, PairSet):
            crc = zlib.crc32(pairs._flat[j], crc)         # the flat store is the sides' tokens, in pair order
        else:
            for pair in pairs:
                crc = zlib.crc32(np.ascontiguousarray(getattr(pair, side), np.int32), crc)
    return crc


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
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        good = a + b
        return f"What is {a} + {b}?", str(good), str(good + 1 if good == 0 or rng.random() < 0.5 else good - 1)
    if kind == 1:
        w = rng.choice(SYNTHETIC_WORDS)
        good = w[::-1]
        j = rng.randrange(len(good) - 1)                # near miss: two neighbouring letters swapped
        bad = good[:j] + good[j + 1] + good[j] + good[j + 2:]
        return f"Reverse the word {w}.", good, bad if bad != good else w + w[0]
    if kind == 2:
        a, b = rng.sample(range(10, 100), 2)
        return f"Which is larger, {a} or {b}?", str(max(a, b)), str(min(a, b))
    w = rng.choice(SYNTHETIC_WORDS)
    return f"Write {w} in capitals.", w.upper(), w.upper()[:-1] + w[-1]


def synthetic_split(prompt):
    """"eval" for about one prompt in five, chosen by a hash of the prompt text, else "train".

    The split depends on the prompt alone, so a train set and an eval set written with any seeds never
    share a prompt: the eval set measures what was learned, not what was memorised."""
    return "eval" if zlib.crc32(prompt.encode()) % 5 == 0 else "train"


def write_synthetic(path, n_pairs, seed=0, split=None):
    """Write n_pairs synthetic preference pairs (layout (a)) to a parquet file, deterministically from seed.

    split="train" or "eval" keeps only the prompts of that side of synthetic_split (None keeps all)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n_pairs:
        row = _synthetic_example(rng)
        if split is None or synthetic_split(row[0]) == split:
            rows.append(row)
    table = pa.table({name: [r[j] for r in rows] for j, name in enumerate(("prompt", "chosen", "rejected"))})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def oracle_correct(prompt, response):
    """True when `response` is the right answer to a synthetic `prompt` (surrounding whitespace ignored)."""
    for pattern, answer in _TASKS:
        m = pattern.fullmatch(prompt.strip())
        if m:
            return response.strip() == answer(m)
    raise DataError(f"not a synthetic prompt: {prompt!r}")


def synthetic_tokenizer():
    """A deterministic character-level tokenizer (103 tokens) with Zephyr chat markers, for the tiny demo.

    Every printable ASCII character and newline is one token; <s> is prepended like Llama's tokenizer;
    the Zephyr template is its chat_template."""
    from tokenizers import AddedToken, decoders, models, processors
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
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
    parts = [f"kept {stats.get('kept', 0):,} of {stats.get('rows', 0):,} rows"]
    for kind in ("dropped", "truncated", "note"):
        items = [f"{k.split('/', 1)[1]} {v:,}" for k, v in sorted(stats.items()) if k.startswith(kind + "/") and v]
        if items:
            parts.append(f"{kind}: " + ", ".join(items))
    return "; ".join(parts)


def format_stats(pairs, max_length):
    """The report printed by --stats."""
    s = pairs.stats
    lines = [f"layout {pairs.layout}, template {pairs.template}, {len(pairs.files)} file(s)",
             f"rows read {s['rows']}, kept {s['kept']}"]
    for key in sorted(k for k in s if "/" in k):
        lines.append(f"  {key:36s} {s[key]}")
    if len(pairs) == 0:
        return "\n".join(lines + ["no pairs kept"])
    p, c, r = pairs.lengths.T
    q = (50, 90, 99, 100)
    lines.append("token-length percentiles " + " ".join(f"p{x}" for x in q))
    for name, v in (("prompt", p), ("chosen", p + c), ("rejected", p + r), ("chosen response", c),
                    ("rejected response", r)):
        lines.append(f"  {name:18s} " + " ".join(f"{int(np.percentile(v, x)):>5d}" for x in q))
    padded, unshared, shared = 2 * max_length * len(p), int((2 * p + c + r).sum()), int((p + c + r).sum())
    lines += [
        f"tokens per pair: padded to max_length {2 * max_length}, packed {unshared / len(p):.1f}, "
        f"packed shared-prompt {shared / len(p):.1f}",
        f"prompt share of packed tokens {2 * p.sum() / unshared:.1%}; shared-prompt packing computes "
        f"{1 - shared / unshared:.1%} fewer tokens ({unshared / shared:.2f}x)",
        f"a pad-to-max-length batcher (as the official code) spends {1 - unshared / padded:.1%} of its tokens on "
        f"padding: {padded / shared:.1f}x the tokens of shared-prompt packing",
    ]
    return "\n".join(lines)


def format_example(tok, pair, i):
    """One pair with its spans marked: [PROMPT ...] then each [RESPONSE ...], and the tokens at the boundary."""
    piece = lambda ids: " ".join(repr(tok.tokenizer.id_to_token(int(t))) for t in ids)
    out = [f"--- pair {i}: prompt {len(pair.prompt_ids)} tokens, chosen {len(pair.chosen_ids)}, "
           f"rejected {len(pair.rejected_ids)}",
           f"[PROMPT]{tok.decode(pair.prompt_ids)}[/PROMPT]"]
    for side in ("chosen", "rejected"):
        ids = getattr(pair, f"{side}_ids")
        out.append(f"[{side.upper()}]{tok.decode(ids)}[/{side.upper()}]")
        out.append(f"  boundary tokens: {piece(pair.prompt_ids[-3:])} | {piece(ids[:3])}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Inspect preference data as ORPO training will see it.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", help="parquet file, folder, glob, or Hub dataset id (with --split)")
    ap.add_argument("--split", default=None, help="split of a Hub dataset or folder, e.g. train_prefs")
    ap.add_argument("--tokenizer", default="synthetic", help="tokenizer folder, tokenizer.json, Hub id or 'synthetic'")
    ap.add_argument("--template", default="auto", help="auto | zephyr | raw | path to a .jinja chat template")
    ap.add_argument("--max-length", type=int, default=2048, help="longest sequence; responses are truncated to fit")
    ap.add_argument("--max-prompt-length", type=int, default=1024, help="pairs with longer prompts are dropped")
    for role in ("prompt", "chosen", "rejected", "conversations"):
        ap.add_argument(f"--{role}-column", default=None, help=f"name of the {role} column")
    ap.add_argument("--stats", action="store_true", help="print counts, length percentiles and padding compute")
    ap.add_argument("--show", type=int, default=0, metavar="N", help="print N examples with their spans marked")
    ap.add_argument("--write-synthetic", metavar="PATH", help="write a synthetic dataset to PATH and exit")
    ap.add_argument("--n-pairs", type=int, default=2000, help="pairs for --write-synthetic")
    ap.add_argument("--seed", type=int, default=0, help="seed for --write-synthetic")
    args = ap.parse_args(argv)
    try:
        if args.write_synthetic:
            print(f"wrote {args.n_pairs} pairs to {write_synthetic(args.write_synthetic, args.n_pairs, args.seed)}")
            return 0
        if not args.data:
            raise DataError("--data is required (or --write-synthetic)")
        columns = {r: getattr(args, f"{r}_column") for r in ("prompt", "chosen", "rejected", "conversations")
                   if getattr(args, f"{r}_column")}
        tok = load_tokenizer(args.tokenizer)
        pairs = build_pairs(args.data, tok, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                            template=args.template, split=args.split, columns=columns)
        if args.stats or not args.show:
            print(format_stats(pairs, args.max_length))
        for i in range(min(args.show, len(pairs))):
            print(format_example(tok, pairs[i], i))
    except BrokenPipeError:          # output piped into `head`
        return 0
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
