"""What keying local inputs by content costs `farm plan`: a study whose SFT stage reads a 1 GB local
data file, planned with no cached digest (the file is read and hashed), then again in a new process
(its digest comes from the cache of digests, keyed by path, size, mtime, ctime and inode), against
the same study reading the bundled pairs instead (no local file: nothing to hash).

- hash: `farm.files.content_digest` of the file alone, first (reads 1 GB) and cached (one stat).
- plan: `plan_study` of the loaded trials, first and cached, and of the baseline study. "A new
  process" is the in-process table of digests emptied: only the cache file is left, as for a
  second `farm plan`. Ratios: each against the baseline's plan.
- load: `load_study` of the study with the file, for scale: validating a `name: file` source reads
  and parses every row of it, in every trial (not part of the ratios: it is the same without keys
  by content).

The file was just written, so the first read comes from the page cache: a file not in memory reads
at the disk's speed instead. The digest of a file changed less than RACY_NS ago is not cached
(another write in the same timestamp tick could go unseen), so the bench waits that long first.

Run: .venv/bin/python bench/plan_hash.py [--gb 1.0] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml
from _results import write_result

from farm.grid import read_study

ROOT = Path(__file__).resolve().parents[1]
# A cached plan of the study with the file, at most this many times the baseline's. The baseline takes
# ~1 ms, so this bounds the stat calls and the walk for local inputs, never a read of the file.
TARGET = 2.0


def write_data(path: Path, gb: float) -> int:
    """Comparison rows of ~10 KB each, `gb` GB in all, written in 8 MB blocks; returns the rows."""
    filler = "lorem ipsum dolor sit amet " * 370
    rows, block, size = 0, [], 0
    with open(path, "w", encoding="utf-8") as f:
        while size < gb * 1e9:
            line = (
                json.dumps({"prompt": f"question {rows}", "chosen": f"good answer {rows} {filler}", "rejected": f"bad answer {rows} {filler}"}) + "\n"
            )
            block.append(line)
            rows += 1
            size += len(line)
            if len(block) == 800:
                f.write("".join(block))
                block = []
        f.write("".join(block))
    return rows


def study_doc(data: Path | None) -> dict:
    doc = read_study(ROOT / "jobs" / "quickstart.yaml")  # with what it includes
    for key in ("profiles", "reference", "grid"):
        doc.pop(key, None)
    doc["name"] = "plan-hash"
    doc["report"].pop("labels")  # it names the rate axis, which this study drops
    if data:
        doc["stages"]["sft"]["data"] = {"sources": [{"name": "file", "path": str(data), "records": "comparison"}]}
    return doc


def timed(fn, repeat: int = 1):
    """(best wall seconds of `repeat` calls, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="size of the data file (default: 1 GB)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="farm-plan-hash-"))
    os.environ["FARM_CACHE"] = str(tmp / "cache")  # an empty cache of digests, before farm is imported

    from farm import files
    from farm.files import content_digest
    from farm.grid import load_study
    from farm.plan import plan_study

    data = tmp / "pairs.jsonl"
    t_write, rows = timed(lambda: write_data(data, args.gb))
    size = data.stat().st_size
    print(f"data: {size / 1e9:.2f} GB, {rows:,} rows, written in {t_write:.1f} s ({tmp})")
    time.sleep(files.RACY_NS / 1e9 + 0.1)  # older than the racy window: its digest may be cached

    with_file, without = tmp / "with-file.yaml", tmp / "baseline.yaml"
    with_file.write_text(yaml.safe_dump(study_doc(data), sort_keys=False))
    without.write_text(yaml.safe_dump(study_doc(None), sort_keys=False))
    t_load, trials = timed(lambda: load_study(with_file))
    base_trials = load_study(without)

    t_hash_first, sha = timed(lambda: content_digest(data))
    files._digests.clear()  # a new process: the cache file alone
    t_hash_cached, again = timed(lambda: content_digest(data), repeat=5)
    assert again == sha

    (tmp / "cache" / files.DIGESTS).unlink()  # the plan's first run hashes the file again
    files._digests.clear()
    t_plan_first, plans = timed(lambda: plan_study(trials))
    files._digests.clear()
    t_plan_cached, again = timed(lambda: plan_study(trials), repeat=5)
    assert again == plans
    t_base, _ = timed(lambda: plan_study(base_trials), repeat=5)

    result = {
        "file_bytes": size,
        "rows": rows,
        "hash_first_s": round(t_hash_first, 3),
        "hash_MB_per_s": round(size / 1e6 / t_hash_first, 1),
        "hash_cached_ms": round(t_hash_cached * 1e3, 3),
        "plan_first_s": round(t_plan_first, 3),
        "plan_cached_ms": round(t_plan_cached * 1e3, 1),
        "plan_baseline_ms": round(t_base * 1e3, 1),
        "ratio_first": round(t_plan_first / t_base, 2),
        "ratio_cached": round(t_plan_cached / t_base, 2),
        "target_cached": TARGET,
        "load_study_s": round(t_load, 1),
    }
    print(f"hash 1 file: first {t_hash_first:.2f} s ({result['hash_MB_per_s']:,.0f} MB/s from the page cache), cached {t_hash_cached * 1e3:.2f} ms")
    print(f"plan_study: first {t_plan_first:.2f} s, cached {t_plan_cached * 1e3:.1f} ms; baseline (no local file) {t_base * 1e3:.1f} ms")
    print(
        f"ratio against the baseline: first {result['ratio_first']}x, cached {result['ratio_cached']}x (target cached <= {TARGET}x: "
        f"{'met' if result['ratio_cached'] <= TARGET else 'NOT met'})"
    )
    print(f"for scale, load_study validating the file source (reads and parses every row): {t_load:.1f} s")
    write_result("plan_hash", result)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
