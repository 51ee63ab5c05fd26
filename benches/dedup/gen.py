#!/usr/bin/env python3
"""Synthetic corpus for the near-duplicate benchmark (standard library only).

    python3 benches/dedup/gen.py --records 1000000 --seed 1 --out DIR

writes DIR/corpus.jsonl, one `{"text": "..."}` per line, and DIR/plan.jsonl, one line per
record in the same order:

    {"line": i, "cluster": c, "kind": "original" | "exact" | "near"}

`cluster` is the line number of the original record that the line belongs to (an
original's cluster is its own line). Near duplicates also carry "jaccard": the exact
Jaccard similarity of their word 5-gram shingles to their original (on the text
lower-cased with whitespace collapsed), so that a scorer can tell the misses an LSH
index ought to avoid from those that are below any sensible threshold.

Make-up of the corpus (before a seeded shuffle of the order):

* 80% originals: 50 to 70 words (about 300 characters) in sentences of 6 to 14 words,
  drawn with Zipf-like frequencies from a vocabulary of 4,000 words (some common English
  function words, the rest invented), so unrelated records share almost no 5-gram;
* 10% exact duplicates of a random original: half byte-identical, half differing only
  in letter case (capitalised words, all upper or all lower case) and/or whitespace
  (doubled spaces, leading or trailing spaces);
* 10% near duplicates, each of a different random original, with 5% of the words (at
  least one, rounded) replaced by another word of the vocabulary: their Jaccard
  similarity to the original is about 0.55 to 0.7.

The output depends only on --records and --seed (and GEN_VERSION below). Each record's
text is derived from its own seeded random generator, so nothing but a few arrays of
integers is held in memory whatever the size.
"""

import argparse
import json
import os
import random
import sys
import time
from array import array

GEN_VERSION = 1
VOCAB_SIZE = 4000
EXACT_SHARE = 0.10
NEAR_SHARE = 0.10
MIN_WORDS, MAX_WORDS = 50, 70
MIN_SENTENCE, MAX_SENTENCE = 6, 14
NEAR_REPLACED = 0.05
SHINGLE = 5

# The most frequent ranks of the vocabulary.
FUNCTION_WORDS = """
the of and to in a is that it for on was with as be at by this from or are not have
but an they which we you one all were her his their has had been there can if more
will so no out up what about into than them some would its only other when who
""".split()

ONSETS = "b c d f g h j k l m n p r s t v w z br cl dr fl gr kr pl pr sk sl sn st tr sh ch th".split()
VOWELS = "a e i o u a e i o ai ea ou oo ie".split()
CODAS = ["", "", "", "n", "r", "s", "l", "t", "m", "k", "nd", "st", "rk"]

# Kinds, as stored in the plan arrays.
ORIGINAL, EXACT, NEAR = 0, 1, 2
KIND_NAMES = ("original", "exact", "near")


def normalise(text):
    """Lower case, whitespace runs collapsed to one space, ends trimmed."""
    return " ".join(text.lower().split())


def shingles(norm):
    """The set of word SHINGLE-grams of a normalised text."""
    words = norm.split()
    if len(words) < SHINGLE:
        return {tuple(words)}
    return {tuple(words[i : i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def jaccard(a, b):
    return len(a & b) / len(a | b) if a or b else 1.0


def make_vocabulary(seed):
    """VOCAB_SIZE distinct lower-case words, most frequent first (shorter words first)."""
    rng = random.Random(f"llmops-dedup-vocab-{seed}")
    words = list(dict.fromkeys(FUNCTION_WORDS))
    taken = set(words)
    invented = []
    while len(words) + len(invented) < VOCAB_SIZE:
        syllables = rng.choices((1, 2, 3), weights=(3, 5, 2))[0]
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
        if w not in taken:
            taken.add(w)
            invented.append(w)
    # Zipf's law pairs frequent with short: sort by length, ties in random order.
    rng.shuffle(invented)
    invented.sort(key=len)
    return words + invented


def zipf_cumulative(n, offset=2.7):
    """Cumulative weights of ranks 0..n-1 with weight 1 / (rank + offset)."""
    total = 0.0
    cum = []
    for rank in range(n):
        total += 1.0 / (rank + offset)
        cum.append(total)
    return cum


class Generator:
    def __init__(self, seed):
        self.seed = seed
        self.vocab = make_vocabulary(seed)
        self.capitalised = [w[0].upper() + w[1:] for w in self.vocab]
        self.cum = zipf_cumulative(len(self.vocab))
        self.ranks = range(len(self.vocab))

    def _rng(self, tag, j):
        # One independent stream per (seed, tag, record): any record can be made again
        # on demand, in any order.
        return random.Random((self.seed << 40) | (tag << 36) | j)

    def original(self, c):
        """Word ranks and sentence-end flags of original number c."""
        rng = self._rng(1, c)
        n = rng.randint(MIN_WORDS, MAX_WORDS)
        ranks = rng.choices(self.ranks, cum_weights=self.cum, k=n)
        ends = [False] * n
        i = -1
        while True:
            i += rng.randint(MIN_SENTENCE, MAX_SENTENCE)
            if i >= n - 1:
                break
            ends[i] = True
        ends[n - 1] = True
        return ranks, ends

    def render(self, ranks, ends):
        vocab, capitalised = self.vocab, self.capitalised
        out = []
        start = True
        for r, end in zip(ranks, ends):
            w = capitalised[r] if start else vocab[r]
            out.append(w + "." if end else w)
            start = end
        return " ".join(out)

    def exact_variant(self, text, j):
        """text changed only in letter case and/or whitespace (never equal to text)."""
        rng = self._rng(2, j)
        mode = rng.choice(("case", "space", "both"))
        if mode in ("case", "both"):
            how = rng.choice(("title", "upper", "lower"))
            if how == "title":
                text = " ".join(w[0].upper() + w[1:] for w in text.split(" "))
            elif how == "upper":
                text = text.upper()
            else:
                text = text.lower()
        if mode in ("space", "both"):
            words = text.split(" ")
            for _ in range(rng.randint(1, 4)):
                k = rng.randrange(len(words))
                words[k] = words[k] + " "
            text = " ".join(words)
            if rng.random() < 0.5:
                text = " " * rng.randint(1, 2) + text
            if rng.random() < 0.7:
                text = text + " " * rng.randint(1, 3)
        return text

    def near_variant(self, ranks, ends, j):
        """A copy of (ranks, ends) with NEAR_REPLACED of the words replaced."""
        rng = self._rng(3, j)
        ranks = list(ranks)
        k = max(1, round(len(ranks) * NEAR_REPLACED))
        for pos in rng.sample(range(len(ranks)), k):
            old = ranks[pos]
            while True:
                new = rng.choices(self.ranks, cum_weights=self.cum)[0]
                if new != old:
                    break
            ranks[pos] = new
        return ranks, ends


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, required=True, help="number of records N")
    ap.add_argument("--seed", type=int, default=1, help="seed of everything (default 1)")
    ap.add_argument("--out", required=True, help="directory for corpus.jsonl and plan.jsonl")
    args = ap.parse_args()
    n = args.records
    if n < 1:
        ap.error("--records must be at least 1")
    if args.seed < 0 or args.seed >= 1 << 24:
        ap.error("--seed must be in [0, 2^24)")
    if n >= 1 << 36:
        ap.error("--records is too large")

    started = time.perf_counter()
    gen = Generator(args.seed)
    n_exact = int(n * EXACT_SHARE)
    n_near = int(n * NEAR_SHARE)
    n_orig = n - n_exact - n_near

    # Generation order: originals 0..n_orig-1, then the exact and the near duplicates,
    # each of a random (hence earlier) original. The file order is a shuffle of it.
    plan_rng = random.Random(f"llmops-dedup-plan-{args.seed}")
    # Near duplicates go to distinct originals, so that with a keep-first pass a missed
    # near duplicate is a miss of the MinHash/LSH test and not a matter of order (two
    # near duplicates of one original are only about 0.4 alike: whichever comes first
    # would keep the other).
    source = array("q", range(n_orig))
    identical = bytearray(n)
    for j in range(n_orig, n_orig + n_exact):
        source.append(plan_rng.randrange(n_orig))
        identical[j] = plan_rng.random() < 0.5
    source.extend(plan_rng.sample(range(n_orig), n_near))
    order = list(range(n))
    plan_rng.shuffle(order)
    line_of = array("q", bytes(8 * n))
    for i, j in enumerate(order):
        line_of[j] = i

    os.makedirs(args.out, exist_ok=True)
    corpus_path = os.path.join(args.out, "corpus.jsonl")
    plan_path = os.path.join(args.out, "plan.jsonl")
    seen = set()  # hashes of the normalised texts that must be unique
    counts = [0, 0, 0]
    with open(corpus_path, "w", encoding="utf-8") as corpus, open(plan_path, "w", encoding="utf-8") as plan:
        for i, j in enumerate(order):
            extra = ""
            if j < n_orig:
                kind = ORIGINAL
                text = gen.render(*gen.original(j))
                key = normalise(text)
            elif j < n_orig + n_exact:
                kind = EXACT
                text = gen.render(*gen.original(source[j]))
                if not identical[j]:
                    text = gen.exact_variant(text, j)
                key = None
            else:
                kind = NEAR
                ranks, ends = gen.original(source[j])
                base = normalise(gen.render(ranks, ends))
                text = gen.render(*gen.near_variant(ranks, ends, j))
                key = normalise(text)
                extra = ', "jaccard": %.4f' % jaccard(shingles(base), shingles(key))
            if key is not None:
                h = hash(key)
                if h in seen:
                    sys.exit(f"gen.py: seed {args.seed} made two records with the same normalised text; use another --seed")
                seen.add(h)
            counts[kind] += 1
            corpus.write(json.dumps({"text": text}) + "\n")
            plan.write('{"line": %d, "cluster": %d, "kind": "%s"%s}\n' % (i, line_of[source[j]], KIND_NAMES[kind], extra))
            if (i + 1) % 100_000 == 0:
                print(f"gen.py: {i + 1}/{n} records, {time.perf_counter() - started:.1f}s", file=sys.stderr)
    elapsed = time.perf_counter() - started
    print(
        json.dumps(
            {
                "records": n,
                "originals": counts[ORIGINAL],
                "exact": counts[EXACT],
                "near": counts[NEAR],
                "seed": args.seed,
                "gen_version": GEN_VERSION,
                "seconds": round(elapsed, 2),
                "corpus": os.path.abspath(corpus_path),
                "plan": os.path.abspath(plan_path),
            }
        )
    )


if __name__ == "__main__":
    main()
