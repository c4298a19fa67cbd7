"""Benchmark `mpm unimm build --generator template` on COCO-scale annotation files, beside a parse-only baseline.

    python benchmarks/bench_unimm.py [--num-images 118287]

1. Writes COCO-scale files in the official schemas (cached in benchmarks/_work/unimm-<n>/): 118,287 images with
   5 captions each (~591k), ~444k VQAv2 questions with 10 answers each, ~9.9k OK-VQA, ~16.9k A-OKVQA, and
   123,287 Visual Dialog dialogs of 10 rounds with 100 answer options per round (as VisDial 1.0 has; 5,000 of
   these images are in Visual Dialog only).
2. Runs the whole build as a user would (`mpm unimm build ... --generator template`) in a child process and
   reports its wall time, peak memory (the child's max RSS) and the build's own split into reading (JSON
   parsing), merging, generating (+ validating) and writing.
3. Baseline, in another child process: only parsing the same files with the standard library's json (what any
   tool must at least do). Prints the ratio of the build to it.
Targets (issue 3): under 120 s and under 6 GB peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "benchmarks" / "_work"
PYTHON = str(REPO / ".venv" / "bin" / "python")

PARSE_ONLY = """
import json, sys
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        json.load(f)
"""


MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one command, measured by a wrapper process of its own."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd[:4])} ...\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return wall, int(result.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=118_287)
    args = parser.parse_args()
    from unimm_chat.synthetic import write_annotations

    folder = WORK / f"unimm-{args.num_images}"
    marker = folder / "done"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"writing COCO-scale annotation files into {folder} ...", flush=True)
        visdial_only = round(args.num_images * 5000 / 118_287)
        write_annotations(folder, args.num_images, visdial_only_images=visdial_only, visdial_answer_table=337_527)
        marker.touch()
    files = sorted(p for p in folder.glob("*.json"))
    sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in files}
    names = {
        "coco_captions": "captions_train2017.json",
        "vqav2_questions": "v2_OpenEnded_mscoco_train2014_questions.json",
        "vqav2_annotations": "v2_mscoco_train2014_annotations.json",
        "okvqa_questions": "OpenEnded_mscoco_train2014_questions.json",
        "okvqa_annotations": "mscoco_train2014_annotations.json",
        "aokvqa": "aokvqa_v1p0_train.json",
        "visdial": "visdial_1.0_train.json",
    }
    out = WORK / "unimm-build"
    shutil.rmtree(out, ignore_errors=True)
    flags = [a for key, name in names.items() for a in (f"--{key.replace('_', '-')}", str(folder / name))]
    print(f"files (MB): {sizes}", flush=True)

    base_wall, base_peak = child([PYTHON, "-c", PARSE_ONLY, *map(str, files)])
    wall, peak = child(
        [
            str(REPO / ".venv" / "bin" / "mpm"),
            "unimm",
            "build",
            *flags,
            "--generator",
            "template",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    stats = json.loads((out / "stats.json").read_text())
    phases = stats["timings_s"]
    print(f"\n{'run':44s}{'wall s':>8s}{'peak MB':>9s}")
    print(f"{'baseline: parse the files with json (stdlib)':44s}{base_wall:>8.1f}{base_peak:>9.0f}")
    print(f"{'mpm unimm build --generator template':44s}{wall:>8.1f}{peak:>9.0f}")
    print(f"  build phases (s): {phases}  (the rest is start-up and exit)")
    print(f"  build / parse-only baseline: {wall / base_wall:.2f}x wall, {peak / base_peak:.2f}x memory")
    print(f"  {stats['images']:,} images -> {stats['dialogues']:,} dialogues, {stats['turns_per_dialogue']['mean']} exchanges, "
          f"{stats['tokens']['total']:,} tokens; most used phrasing in {stats['phrasing']['max_share_of_dialogues']:.1%} of dialogues")  # fmt: skip
    print(f"  targets: wall {wall:.0f} s < 120 s: {'met' if wall < 120 else 'MISSED'}; "
          f"peak {peak / 1024:.2f} GB < 6 GB: {'met' if peak < 6 * 1024 else 'MISSED'}")  # fmt: skip
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "num_images": args.num_images,
        "file_sizes_mb": sizes,
        "baseline_parse_only": {"wall_s": round(base_wall, 1), "peak_mb": round(base_peak)},
        "build": {
            "wall_s": round(wall, 1),
            "peak_mb": round(peak),
            "phases_s": phases,
            "peak_by_phase_mb": stats["peak_memory_mb"],
        },
        "dialogues": stats["dialogues"],
    }
    (WORK / "unimm_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
