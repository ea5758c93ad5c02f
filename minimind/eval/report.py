"""eval.json and eval.md for one evaluated checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from minimind import storage


def write_report(out_dir: str | Path, result: dict) -> tuple[str, str]:
    """``result`` holds ``checkpoint``, ``data``, ``format``, ``metrics`` and ``samples``; ``out_dir`` is local
    or a URI. Returns the paths of eval.json and eval.md."""
    json_path = storage.join(out_dir, "eval.json")
    storage.write_text(json_path, json.dumps(result, ensure_ascii=False, indent=2))
    data = ", ".join(f"`{f}`" for f in result["data"])
    lines = [
        f"# Evaluation of `{result['checkpoint']}`",
        "",
        *([f"Data: {data} (format `{result['format']}`)", ""] if data else []),
        "| metric | value |",
        "|---|---|",
    ]
    for name, value in result["metrics"].items():
        if name in ("choice_subjects", "choice_contamination"):
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else f"{value}"
        lines.append(f"| {name} | {shown} |")
    subjects = result["metrics"].get("choice_subjects")
    if subjects:
        checked = "choice_contamination" in result["metrics"]
        lines += ["", "## Multiple choice by subject", "",
                  "| subject | questions | accuracy | per byte | chance |" + (" contaminated |" if checked else ""),
                  "|---|---|---|---|---|" + ("---|" if checked else "")]  # fmt: skip
        for name, block in subjects.items():
            marked = f" {block['contaminated']} (scores not trustworthy) |" if block.get("contaminated") else " 0 |"
            lines.append(f"| {name} | {block['questions']} | {block['accuracy']:.4f} | "
                         f"{block['accuracy_per_byte']:.4f} | {block['chance']:.4f} |"
                         + (marked if checked else ""))  # fmt: skip
    contamination = result["metrics"].get("choice_contamination")
    if contamination:
        lines += ["", "## Contamination (13-character windows of each question found in the training corpora)", "",
                  "| question file | questions | contaminated | share |", "|---|---|---|---|"]  # fmt: skip
        for path, block in contamination.items():
            lines.append(f"| `{path}` | {block['questions']} | {block['contaminated']} | {block['share']:.1%} |")
    if result["samples"]:
        lines += ["", "## Samples", ""]
    for sample in result["samples"]:
        output = sample["output"].replace("\n", " ⏎ ")
        lines.append(f"- **{sample['prompt']}** → {output}")
    md_path = storage.join(out_dir, "eval.md")
    storage.write_text(md_path, "\n".join(lines) + "\n")
    return json_path, md_path
