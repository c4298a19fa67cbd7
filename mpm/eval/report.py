"""Writing and comparing evaluation results: results.json, items.jsonl, a markdown table and a chart.

    {out}/results.json    the results (schema: mpm/eval/generative.py, and each task's module)
    {out}/items.jsonl     one line per scored item: its output, references, fidelity and per-item scores
    {out}/table.md        languages x metrics (fidelity and transfer ratio beside each generative score)
    {out}/chart.png       one panel per metric, a bar per language

`mpm eval report A/results.json B/results.json` compares runs of the same task and data in one table.
"""

from __future__ import annotations

import json
from pathlib import Path

from mpm.core.errors import DataError
from mpm.core.files import atomic_write_bytes, atomic_write_json, output_folder

# Keys of a language's results that are not metric values.
NOT_METRICS = {"items", "missing_images", "missing_predictions", "images", "questions", "captions", "mentions",
               "hallucinated", "unparsed", "judged", "answers",
               "prompts", "missing_en", "judge_judged", "judge_unparsed", "judge_failed"}  # fmt: skip


def metric_values(summary: dict) -> dict[str, float]:
    """The numeric metric values of one language's results (fidelity included), in their order."""
    return {k: v for k, v in summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in NOT_METRICS}  # fmt: skip


def write_results(results: dict, per_item: list[dict], out: str | Path) -> list[Path]:
    out = output_folder(out, "--output")
    atomic_write_json(out / "results.json", results)
    lines = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in per_item)
    atomic_write_bytes(out / "items.jsonl", lines.encode("utf-8"))
    atomic_write_bytes(out / "table.md", markdown_table(results).encode("utf-8"))
    written = [out / "results.json", out / "items.jsonl", out / "table.md"]
    if chart(results, out / "chart.png"):
        written.append(out / "chart.png")
    return written


def markdown_table(results: dict) -> str:
    """Languages as rows, metrics as columns; a generative task adds in-language scores and transfer ratios."""
    languages = results.get("languages", {})
    metrics = list(dict.fromkeys(k for s in languages.values() for k in metric_values(s)))
    ratios = {
        lang: s.get("transfer_ratio") or (results.get("transfer_ratio") or {}).get(lang) or {}
        for lang, s in languages.items()
    }  # per language, or at the top (mpm eval paint)
    ratio = [m for m in metrics if any(m in r for r in ratios.values())]
    in_language = [m for m in metrics if any(m in (s.get("in_language") or {}) for s in languages.values())]
    header = ["lang", "items", *metrics, *(f"{m} (in language)" for m in in_language),
              *(f"{m} / en" for m in ratio if m != "fidelity")]  # fmt: skip
    rows = []
    for lang, s in languages.items():
        cells = [lang, str(s.get("items", s.get("images", s.get("questions", ""))))]
        cells += [_fmt(s.get(m)) for m in metrics]
        cells += [_fmt((s.get("in_language") or {}).get(m)) for m in in_language]
        ratios = s.get("transfer_ratio") or (results.get("transfer_ratio") or {}).get(lang) or {}
        cells += [_fmt(ratios.get(m)) for m in ratio if m != "fidelity"]
        rows.append(cells)
    title = f"**{results.get('task', '?')}** {results.get('model') or results.get('predictions') or ''}".strip()
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> bool:
    """A bar per language for each metric (matplotlib); False when there is nothing numeric to draw."""
    languages = results.get("languages", {})
    metrics = list(dict.fromkeys(k for s in languages.values() for k in metric_values(s)))
    if not metrics:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(4, 0.6 * len(languages) + 2), 2.2 * len(metrics)),
                             squeeze=False)  # fmt: skip
    for ax, metric in zip(axes[:, 0], metrics):
        langs = [lang for lang, s in languages.items() if isinstance(s.get(metric), int | float)]
        ax.bar(langs, [languages[lang][metric] for lang in langs], color="#4878a8")
        ax.set_ylabel(metric)
    axes[0, 0].set_title(f"{results.get('task', '')}: per language")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def compare(paths: list[str | Path]) -> str:
    """One markdown table of several results files of the same task and data: a row per language, a column per
    run and metric."""
    runs = []
    for path in paths:
        try:
            results = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a results file ({exc})") from None
        languages = results.get("languages") if isinstance(results, dict) else None
        if not isinstance(languages, dict) or not all(isinstance(s, dict) for s in languages.values()):
            raise DataError(f"{path}: not a results file of mpm eval (no task / languages)")
        runs.append((Path(path), results))
    first_path, first = runs[0]
    for path, results in runs[1:]:
        if results.get("task") != first.get("task") or _data(results) != _data(first):
            raise DataError(
                f"{path} is a {results.get('task')} run on {results.get('data')}, {first_path} a {first.get('task')} "
                f"run on {first.get('data')}: compare results of the same benchmark"
            )
        # the same benchmark scored differently is not comparable either: other tokenizers, other items
        for key in ("tokenizers", "max_images", "fidelity_settings"):
            if results.get(key) != first.get(key):
                raise DataError(f"{path} and {first_path} were scored with other {key} ({results.get(key)} vs "
                                f"{first.get(key)}): their numbers are not comparable")  # fmt: skip
        for lang in set(results["languages"]) & set(first["languages"]):
            a, b = results["languages"][lang].get("items"), first["languages"][lang].get("items")
            if a != b:
                raise DataError(f"{path} scored {a} {lang} items, {first_path} {b}: their numbers are not comparable")
    names = [p.parent.name or str(p) for p, _ in runs]  # the results folders name the runs
    metrics = list(dict.fromkeys(k for _, r in runs for s in r["languages"].values() for k in metric_values(s)))
    langs = list(dict.fromkeys(lang for _, r in runs for lang in r["languages"]))
    header = ["lang", *(f"{m} [{n}]" for m in metrics for n in names)]
    lines = [f"**{first['task']}** on {first.get('data')}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]  # fmt: skip
    for lang in langs:
        cells = [lang] + [_fmt(r["languages"].get(lang, {}).get(m)) for m in metrics for _, r in runs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _data(results: dict):
    data = results.get("data")
    if isinstance(data, str):
        return str(Path(data).resolve())
    if isinstance(data, list):
        return [str(Path(d).resolve()) for d in data]
    return data


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
