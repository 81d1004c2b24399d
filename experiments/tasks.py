"""Letter tasks: preference pairs a 3-layer, d = 96 model can learn on a CPU and GENERALISE to unseen prompts.

data.py's synthetic tasks (sums of two numbers, reversing one of 24 words) ask for facts about the prompt's
numbers and words that a model this small only memorises: the first edition's policies answered unseen prompts
right about 2% of the time. Here every answer is a short deterministic transformation of letters that are IN the
prompt, so the rule, once learnt, applies to strings never seen in training:

    Copy: hbjd             ->  hbjd          (copy: attend to the same position, an induction head)
    Reverse: hbjd          ->  djbh          (attend to the mirrored position)
    Next letters: hbjd     ->  icae          (copy, then one fixed successor table, j -> a)
    Sort: hbjd             ->  bdhj          (the smallest letter not yet written)

3 to 5 distinct letters of a-j (pilots with all 26 letters, or 16, did not learn the rules in the experiment's
800 steps: see experiments/paper_cpu.py's run history). The rejected answer is a near miss of the right one, as
a model makes them and as real preference data has them: two neighbouring letters swapped, or one letter
replaced by its neighbour in the alphabet (never equal to the right answer). `oracle_correct` recomputes the
right answer from the prompt alone.

Train and held-out prompts never share their LETTERS, in any task (a hash of the letter string decides the side,
as data.synthetic_split does for whole prompts), so a held-out answer cannot be recalled from training.

`pretraining_texts` is the base model's corpus (Fig. 3's setting, a pretrained model meeting a new response
domain): the rendered prompts (the instruction side, up to the assistant marker) and general sequences (runs of
the alphabet, random letter strings), never an answer after the assistant marker.
"""
import random
import re
import string
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

LETTERS = string.ascii_lowercase[:10]    # a-j: small enough for the tiny model to learn the rules in minutes
MIN_LEN, MAX_LEN = 3, 5
TASKS = {   # name -> (instruction, answer from the letters)
    "copy": ("Copy", lambda s: s),
    "reverse": ("Reverse", lambda s: s[::-1]),
    "next": ("Next letters", lambda s: "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)),
    "sort": ("Sort", lambda s: "".join(sorted(s))),
}
PROMPT = re.compile(r"(Copy|Reverse|Next letters|Sort): ([a-z]{3,8})")
BY_INSTRUCTION = {instruction: fn for instruction, fn in TASKS.values()}


def letters_split(letters):
    """'eval' for about one letter string in five, by a hash of the letters alone, else 'train'."""
    return "eval" if zlib.crc32(letters.encode()) % 5 == 0 else "train"


def near_miss(answer, rng):
    """A plausible mistake: two neighbouring letters swapped, or one letter moved to its alphabet neighbour."""
    while True:
        j = rng.randrange(len(answer) - 1)
        if rng.random() < 0.5:
            bad = answer[:j] + answer[j + 1] + answer[j] + answer[j + 2:]
        else:
            shifted = LETTERS[(LETTERS.index(answer[j]) + rng.choice((-1, 1))) % len(LETTERS)]
            bad = answer[:j] + shifted + answer[j + 1:]
        if bad != answer:
            return bad


def random_letters(rng, split=None):
    """3 to 5 distinct random letters, of `split` ("train", "eval"; None: either)."""
    while True:
        letters = "".join(rng.sample(LETTERS, rng.randint(MIN_LEN, MAX_LEN)))
        if split is None or letters_split(letters) == split:
            return letters


def example(rng, split):
    """(prompt, right answer, near miss) of a random task on random letters of `split`."""
    letters = random_letters(rng, split)
    instruction, answer = TASKS[rng.choice(sorted(TASKS))]
    good = answer(letters)
    return f"{instruction}: {letters}", good, near_miss(good, rng)


def write_pairs(path, n_pairs, seed, split):
    """n_pairs (prompt, chosen, rejected) rows of `split` to a parquet file (data.py's layout (a)), from `seed`."""
    rng = random.Random(seed)
    rows = [example(rng, split) for _ in range(n_pairs)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(dict(zip(("prompt", "chosen", "rejected"), map(list, zip(*rows))))), path)
    return path


def oracle_correct(prompt, response):
    """True when `response` is the right answer to a letter-task `prompt` (surrounding whitespace ignored)."""
    m = PROMPT.fullmatch(prompt.strip())
    if m is None:
        raise ValueError(f"not a letter-task prompt: {prompt!r}")
    return response.strip() == BY_INSTRUCTION[m[1]](m[2])


def task_of(prompt):
    return next(name for name, (instruction, _) in TASKS.items() if prompt.startswith(instruction + ":"))


def pretraining_texts(n_texts, seed):
    """General sequences for the base, one per text: runs of the alphabet (5 to 20 letters from any start, wrapping
    after j), and train-side letter strings, repeated or not. The rendered prompts are added by the caller (they
    need the tokenizer's chat template)."""
    rng, texts = random.Random(seed), []
    for _ in range(n_texts):
        if rng.random() < 0.5:
            start, n = rng.randrange(len(LETTERS)), rng.randint(5, 2 * len(LETTERS))
            texts.append("".join(LETTERS[(start + k) % len(LETTERS)] for k in range(n)))
        else:
            w = random_letters(rng, "train")
            texts.append(" ".join([w] * rng.randint(2, 4)) if rng.random() < 0.5 else
                         " ".join(random_letters(rng, "train") for _ in range(rng.randint(2, 6))))
    return texts
