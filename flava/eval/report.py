"""The evaluation report people read: Markdown (``report.md``) and the same content as HTML (``report.html``)."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import markdown

from flava.eval.aggregate import DOMAINS, TASK_DOMAINS


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_markdown(metrics: dict[str, Any], info: dict[str, Any], plots: dict[str, str]) -> str:
    lines = ["# FLAVA evaluation report", ""]
    for key, value in info.items():
        lines.append(f"- **{key}**: `{value}`")
    lines += ["", "## Macro averages", "", "| domain | score |", "|---|---|"]
    macro = metrics["macro"]
    for domain in (*DOMAINS, "overall"):
        if domain in macro:
            lines.append(f"| {domain} | {_fmt(macro[domain])} |")
    lines += ["", "## Tasks", "", "| task | domain | score | chance | above chance |", "|---|---|---|---|---|"]
    for task, score in metrics["tasks"].items():
        chance = metrics["chance"].get(task)
        lines.append(
            f"| {task} | {TASK_DOMAINS[task]} | {_fmt(score)} | {_fmt(chance)} | "
            f"{'yes' if chance is not None and score > chance else 'no'} |"
        )
    for section in ("zeroshot", "retrieval", "linear_probe", "text_cls", "vqa"):
        values = metrics.get(section)
        if not values:
            continue
        lines += ["", f"### {section}", "", "| metric | value |", "|---|---|"]
        for key, value in values.items():
            if not isinstance(value, dict):
                lines.append(f"| {key} | {_fmt(value)} |")
    if "benchmarks" in metrics:
        lines += ["", "## Paper benchmarks", "", "| benchmark | result |", "|---|---|"]
        for name, values in metrics["benchmarks"].items():
            if "skipped" in values:
                result = f"skipped: {values['skipped']}"
            else:
                result = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items() if not isinstance(v, dict))
            lines.append(f"| {name} | {result} |")
    attributes = (metrics.get("zeroshot") or {}).get("attributes")
    if attributes:
        lines += ["", "### zeroshot per attribute", "",
                  "| attribute | measure | overall | chance | by value |", "|---|---|---|---|---|"]
        for name, block in attributes.items():
            named = "by_value" in block
            values = block["by_value"] if named else block["top1_by_value"]
            lines.append(f"| {name} | {'attribute accuracy' if named else 'top-1'} | "
                         f"{_fmt(block['accuracy']) if named else ''} | {_fmt(block['chance']) if named else ''} | "
                         + ", ".join(f"{v} {_fmt(a)}" for v, a in values.items()) + " |")
    if plots:
        lines += ["", "## Plots", ""]
        for title, rel in plots.items():
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def render_html(markdown_text: str, title: str = "FLAVA evaluation report") -> str:
    body = markdown.markdown(markdown_text, extensions=["tables"])
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n{body}\n</body></html>\n"
    )


def write_reports(out_dir: Path, metrics: dict[str, Any], info: dict[str, Any], plots: dict[str, str]) -> dict:
    text = render_markdown(metrics, info, plots)
    (out_dir / "report.md").write_text(text)
    (out_dir / "report.html").write_text(render_html(text))
    return {"markdown": str(out_dir / "report.md"), "html": str(out_dir / "report.html")}
