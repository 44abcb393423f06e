"""Compares two results.jsonl files row by row (keyed by run and step) in every non-timing field.

  python experiments/restructure_check/compare_rows.py BEFORE/results.jsonl AFTER/results.jsonl

Prints each differing field, whether the rows' key order differs, and the count compared.
"""
import json, sys
TIMING = {"wall_s", "images_per_s", "eval_time_s", "sample_time_s", "compile_time_s"}
def load(p):
  rows = [json.loads(l) for l in open(p) if l.strip()]
  return {(r["run"], r.get("step")): r for r in rows}
a, b = load(sys.argv[1]), load(sys.argv[2])
print("rows", len(a), len(b), "same keys:", set(a) == set(b))
diffs = 0
for k in sorted(a):
  ra, rb = a[k], b.get(k, {})
  fields = (set(ra) | set(rb)) - TIMING
  for f in sorted(fields):
    if ra.get(f) != rb.get(f):
      diffs += 1
      print("DIFF", k, f, ra.get(f), rb.get(f))
  if list(ra) != list(rb):
    print("ORDER", k)
print("non-timing fields compared:", sum(len(set(r) - TIMING) for r in a.values()), "differences:", diffs)
