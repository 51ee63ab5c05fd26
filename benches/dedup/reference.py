#!/usr/bin/env python3
"""Reference near-duplicate removal with datasketch, for benches/dedup. Runs in the venv
of scripts/datasketch-env:

    $(scripts/datasketch-env) benches/dedup/reference.py --corpus DIR/corpus.jsonl \\
        --plan DIR/plan.jsonl [--write-kept FILE]

Reads every `{"text": ...}` line into memory first (not timed), then times the two
stages, one pass over the records in file order:

1. exact: the text is normalised (lower case, whitespace runs collapsed to one space,
   ends trimmed) and a record whose normalised text has a BLAKE2b-128 digest already
   seen is dropped;
2. near: a MinHash (128 permutations, seed 1, datasketch's default scheme and SHA-1
   hash) of the record's word 5-gram shingles of the normalised text (the whole text as
   one shingle when it has fewer than 5 words) is looked up in a MinHashLSH index
   (threshold 0.5; banding picked by datasketch with weights 0.2,0.8 unless --weights
   says otherwise, the same 30 bands x 4 rows the worker uses); the record is dropped if the query
   returns any record, and otherwise inserted and kept. No candidate is verified
   against an estimated or exact Jaccard similarity.

Prints one JSON line: the timing, the peak RSS of this process (ru_maxrss, which
includes the texts held in memory) and the figures of score.py against the plan.
"""

import argparse
import hashlib
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import score as scoring  # noqa: E402  (benches/dedup/score.py)

import datasketch  # noqa: E402
from datasketch import MinHash, MinHashLSH  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--shingle-size", type=int, default=5)
    ap.add_argument("--permutations", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--weights", default="0.2,0.8",
                    help="false-positive,false-negative weights of the band choice; the worker uses "
                         "0.2,0.8 (30 bands x 4 rows at 0.5), so the default compares at equal recall")
    ap.add_argument("--write-kept", metavar="FILE", help="also write the kept records as JSONL")
    args = ap.parse_args()
    size = args.shingle_size

    t = time.perf_counter()
    with open(args.corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    read_s = time.perf_counter() - t
    print(f"reference.py: read {len(texts)} records in {read_s:.1f}s", file=sys.stderr)

    started = time.perf_counter()
    seen = set()
    order = []  # indices of the records that passed the exact stage, in order

    def exact_survivors():
        """Shingles of each record that passes the exact stage (its index goes to order)."""
        blake2b = hashlib.blake2b
        for i, text in enumerate(texts):
            norm = " ".join(text.lower().split())
            digest = blake2b(norm.encode(), digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
            words = norm.split()
            if len(words) < size:
                shingles = [norm.encode()]
            else:
                shingles = [" ".join(words[k : k + size]).encode() for k in range(len(words) - size + 1)]
            order.append(i)
            yield shingles

    weights = tuple(float(w) for w in args.weights.split(","))
    lsh = MinHashLSH(threshold=args.threshold, num_perm=args.permutations, weights=weights)
    kept = []
    near_dropped = 0
    # MinHash.generator pulls one record's shingles from exact_survivors at a time, so
    # order[-1] is always the record whose MinHash comes out.
    for m in MinHash.generator(exact_survivors(), num_perm=args.permutations, seed=args.seed):
        i = order[-1]
        if lsh.query(m):
            near_dropped += 1
            continue
        lsh.insert(i, m, check_duplication=False)
        kept.append(i)
    wall = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    if args.write_kept:
        with open(args.write_kept, "w", encoding="utf-8") as f:
            for i in kept:
                f.write(json.dumps({"text": texts[i]}) + "\n")

    kind, cluster, jaccard = scoring.read_plan(args.plan)
    if len(kind) != len(texts):
        sys.exit(f"reference.py: {args.corpus} has {len(texts)} records but {args.plan} has {len(kind)}")
    figures = scoring.score(kind, cluster, jaccard, kept, args.threshold)
    # What the banding promises: a near duplicate of Jaccard similarity J to its original
    # collides with it in at least one of b bands of r rows with probability 1-(1-J^r)^b.
    b, r = lsh.b, lsh.r
    expected = [1 - (1 - j**r) ** b for j in jaccard.values()]
    n = len(texts)
    result = {
        "label": "datasketch",
        "records": n,
        "kept": len(kept),
        "wall_s": round(wall, 3),
        "records_per_s": round(n / wall, 1) if wall > 0 else None,
        "peak_rss_mib": round(peak_mib, 1),
        "read_s": round(read_s, 3),
        "exact_stage_dropped": n - len(order),
        "near_stage_dropped": near_dropped,
        "lsh_bands": b,
        "lsh_rows": r,
        "near_recall_expected": round(sum(expected) / len(expected), 4) if expected else None,
        "datasketch": getattr(datasketch, "__version__", "?"),
    }
    for k, v in figures.items():
        result.setdefault(k, v)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
