#!/usr/bin/env python3
"""Scores a deduplicated output against the plan of benches/dedup/gen.py (standard
library only).

    python3 benches/dedup/score.py --plan DIR/plan.jsonl --corpus DIR/corpus.jsonl \\
        --kept OUT/train.jsonl [--kept MORE.jsonl ...] [--threshold 0.5] [--label NAME]

--kept takes the JSONL files of kept records (`{"text": ...}` lines, in any order);
repeat it for several files (e.g. train, validation and test splits). Each kept text is
matched back to the corpus by its normalised form (lower case, whitespace collapsed):
originals and near duplicates have unique normalised texts, and an original shares its
normalised text only with its exact duplicates, so a kept member of such an exact group
stands for the whole group, whichever member it was. Prints one JSON line.

The figures (also used by reference.py, which imports `score`) treat each cluster, an
original with its exact and near duplicates, as a whole, because a deduplicator that
reads the records in file order keeps whichever member comes first:

* exact_recall: exact duplicates removed / exact duplicates planned, where in a group
  of g byte- or case/whitespace-equal members, g - max(kept, 1) count as removed;
* near_recall: near duplicates removed / near duplicates planned. A near duplicate that
  is dropped counts; so does one that is kept in place of its original when no member
  of the original's exact group is kept (the cluster still keeps one record);
* lost_clusters: clusters none of whose members is kept, i.e. a record dropped
  although nothing like it survives: the false positives;
* near_precision: near removals / (near removals + lost clusters), the share of the
  records removed beyond exact duplicates that were really near duplicates;
* precision: (exact + near removals) / all records removed;
* near_recall_jaccard_ge / _lt: near_recall split by the planned record's exact
  Jaccard similarity to its original, at --threshold.
"""

import argparse
import json
import sys

ORIGINAL, EXACT, NEAR = 0, 1, 2
KINDS = {"original": ORIGINAL, "exact": EXACT, "near": NEAR}


def normalise(text):
    return " ".join(text.lower().split())


def read_plan(path):
    """(kind bytes, cluster list, jaccard dict line -> J) from plan.jsonl."""
    kind = bytearray()
    cluster = []
    jaccard = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            p = json.loads(line)
            if p["line"] != i:
                sys.exit(f"score.py: {path}:{i + 1}: line {p['line']} out of order")
            kind.append(KINDS[p["kind"]])
            cluster.append(p["cluster"])
            if "jaccard" in p:
                jaccard[i] = p["jaccard"]
    return kind, cluster, jaccard


def score(kind, cluster, jaccard, kept_lines, threshold=0.5, kept_groups=None, extra_kept=0):
    """Figures for a result given as kept line numbers (kept_lines, each a member of the
    plan) and/or as counts of kept members per exact group (kept_groups: cluster ->
    count, for texts that cannot be told apart); extra_kept counts kept records that
    match nothing. Returns a dict."""
    n = len(kind)
    group_size = {}  # cluster -> original + exact duplicates
    for i in range(n):
        if kind[i] != NEAR:
            c = cluster[i]
            group_size[c] = group_size.get(c, 0) + 1
    kept_group = dict(kept_groups or {})
    kept_near = set()
    for i in kept_lines:
        if kind[i] == NEAR:
            kept_near.add(i)
        else:
            kept_group[cluster[i]] = kept_group.get(cluster[i], 0) + 1
    overkept = sum(max(0, k - group_size[c]) for c, k in kept_group.items())

    # Near duplicates per cluster, to credit one kept near duplicate standing in for a
    # cluster whose exact group was dropped whole (the one most like the original).
    near_of = {}
    for i in range(n):
        if kind[i] == NEAR:
            near_of.setdefault(cluster[i], []).append(i)
    near_removed_lines = set()
    lost = 0
    for c, g in group_size.items():
        nears = near_of.get(c, ())
        kept_n = [i for i in nears if i in kept_near]
        near_removed_lines.update(i for i in nears if i not in kept_near)
        if kept_group.get(c, 0) == 0:
            if kept_n:
                near_removed_lines.add(max(kept_n, key=lambda i: (jaccard.get(i, 0.0), -i)))
            else:
                lost += 1
    exact_planned = sum(g - 1 for g in group_size.values())
    exact_removed = sum(g - max(min(kept_group.get(c, 0), g), 1) for c, g in group_size.items())
    near_planned = sum(1 for k in kind if k == NEAR)
    near_removed = len(near_removed_lines)
    kept = len(kept_lines) + sum((kept_groups or {}).values()) + extra_kept
    removed = n - kept

    def ratio(a, b):
        return round(a / b, 4) if b else None

    ge = [i for i in range(n) if kind[i] == NEAR and jaccard.get(i, 0.0) >= threshold]
    lt = [i for i in range(n) if kind[i] == NEAR and jaccard.get(i, 0.0) < threshold]
    return {
        "records": n,
        "kept": kept,
        "ideal_kept": len(group_size),
        "exact_planned": exact_planned,
        "exact_removed": exact_removed,
        "exact_recall": ratio(exact_removed, exact_planned),
        "near_planned": near_planned,
        "near_removed": near_removed,
        "near_recall": ratio(near_removed, near_planned),
        "lost_clusters": lost,
        "near_precision": ratio(near_removed, near_removed + lost),
        "precision": ratio(exact_removed + near_removed, removed),
        "threshold": threshold,
        "near_planned_jaccard_ge": len(ge),
        "near_recall_jaccard_ge": ratio(sum(1 for i in ge if i in near_removed_lines), len(ge)),
        "near_recall_jaccard_lt": ratio(sum(1 for i in lt if i in near_removed_lines), len(lt)),
        "repeated": overkept,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--kept", action="append", required=True, help="JSONL of kept records (repeatable)")
    ap.add_argument("--threshold", type=float, default=0.5, help="Jaccard threshold of the split of near_recall")
    ap.add_argument("--label", help="added to the JSON line as 'label'")
    ap.add_argument("--field", default="text", help="field of the kept records holding the text (default text)")
    args = ap.parse_args()

    kind, cluster, jaccard = read_plan(args.plan)
    # normalised text -> ("g", cluster) for an exact group, ("n", line) for a near duplicate
    where = {}
    i = -1
    with open(args.corpus, encoding="utf-8") as f:
        for i, line in enumerate(f):
            key = normalise(json.loads(line)["text"])
            where[key] = ("n", i) if kind[i] == NEAR else ("g", cluster[i])
    if len(kind) != i + 1:
        sys.exit(f"score.py: {args.corpus} has {i + 1} lines but {args.plan} has {len(kind)}")

    kept_lines = []
    kept_groups = {}
    unmatched = 0
    repeated = 0
    seen_near = set()
    for path in args.kept:
        with open(path, encoding="utf-8") as f:
            for n_line, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                if args.field not in rec:
                    sys.exit(f"score.py: {path}:{n_line}: no field {args.field!r} (fields: {', '.join(rec)})")
                hit = where.get(normalise(rec[args.field]))
                if hit is None:
                    unmatched += 1
                elif hit[0] == "n":
                    if hit[1] in seen_near:
                        repeated += 1
                        continue
                    seen_near.add(hit[1])
                    kept_lines.append(hit[1])
                else:
                    kept_groups[hit[1]] = kept_groups.get(hit[1], 0) + 1
    result = score(kind, cluster, jaccard, kept_lines, args.threshold, kept_groups, unmatched + repeated)
    result["unmatched"] = unmatched
    result["repeated"] += repeated
    if unmatched:
        print(f"score.py: {unmatched} kept texts match no corpus record (changed by the deduplicator?)", file=sys.stderr)
    if result["repeated"]:
        print(f"score.py: {result['repeated']} kept records are repeats beyond their group's size", file=sys.stderr)
    if args.label:
        result = {"label": args.label, **result}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
