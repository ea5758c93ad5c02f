"""eval.json and eval.md for one evaluated checkpoint."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out_dir: str | Path, result: dict) -> tuple[Path, Path]:
    """``result`` holds ``checkpoint``, ``data``, ``format``, ``metrics`` and ``samples``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "eval.json"
    json_path.write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    data = ", ".join(f"`{f}`" for f in result["data"])
    lines = [
        f"# Evaluation of `{result['checkpoint']}`",
        "",
        *([f"Data: {data} (format `{result['format']}`)", ""] if data else []),
        "| metric | value |",
        "|---|---|",
    ]
    for name, value in result["metrics"].items():
        if name == "choice_subjects":
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else f"{value}"
        lines.append(f"| {name} | {shown} |")
    subjects = result["metrics"].get("choice_subjects")
    if subjects:
        lines += ["", "## Multiple choice by subject", "", "| subject | questions | accuracy | per byte | chance |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, block in subjects.items():
            lines.append(f"| {name} | {block['questions']} | {block['accuracy']:.4f} | "
                         f"{block['accuracy_per_byte']:.4f} | {block['chance']:.4f} |")  # fmt: skip
    if result["samples"]:
        lines += ["", "## Samples", ""]
    for sample in result["samples"]:
        output = sample["output"].replace("\n", " ⏎ ")
        lines.append(f"- **{sample['prompt']}** → {output}")
    md_path = out_dir / "eval.md"
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return json_path, md_path
