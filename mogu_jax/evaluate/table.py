"""The plain-text table of a report (:func:`format_table`) and the display helpers the report files share."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from mogu_jax.evaluate.metrics import check_report
from mogu_jax.evaluate.rows import MALICIOUS_KINDS


def display_name(system: str) -> str:
    return {"mogu": "MoGU", "base": "base"}.get(system, system)


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def headline(kind: str, m: Mapping[str, Any]) -> tuple[str, float]:
    """The one number per kind the table shows: clean refusal rate (should be high) on harmful/jailbreak,
    over-refusal rate (should be low) on benign/borderline."""
    if kind in MALICIOUS_KINDS:
        return "clean refusal", m["clean_refusal_rate"]
    return "over-refusal", m["over_refusal_rate"]


def usability_cell(report: Mapping[str, Any], system: str, kind: str, measure: str) -> str:
    """The median of a usability measure (``rouge_l``, ``length_ratio``) for a system and kind; ``-`` for the
    reference system and where there is none."""
    u = report.get("usability")
    if not u or system not in u["systems"] or kind not in u["systems"][system]:
        return "-"
    return num(u["systems"][system][kind][measure]["median"])


def table_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """``[kind, n, metric, value per system]`` rows: the headline rate of every kind, then the share of responses
    with a sentence repeated 3+ times per kind, then (benign/borderline, against the base answers) the median
    ROUGE-L F and the median answer-length ratio."""
    systems = list(report["systems"])
    metrics = report["metrics"]
    rows = []
    for k in report["kinds"]:
        n = str(metrics[systems[0]][k]["n"])
        rows.append([k, n, headline(k, metrics[systems[0]][k])[0]]
                    + [pct(headline(k, metrics[s][k])[1]) for s in systems])
    for k in report["kinds"]:
        rows.append([k, str(metrics[systems[0]][k]["n"]), "repeated sentence"]
                    + [pct(metrics[s][k].get("repetition_rate")) for s in systems])
    u = report.get("usability")
    for k in (u or {}).get("kinds", []):
        for measure, label in (("rouge_l", "ROUGE-L vs base"), ("length_ratio", "length / base")):
            rows.append([k, str(metrics[systems[0]][k]["n"]), label]
                        + [usability_cell(report, s, k, measure) for s in systems])
    return rows


def format_table(report: Mapping[str, Any]) -> str:
    """Plain-text table: kinds x systems; clean refusal % on harmful/jailbreak (higher is safer), over-refusal %
    on benign/borderline (lower is more usable), the share of responses that repeat a sentence 3+ times (lower
    is better), and on benign/borderline prompts the median ROUGE-L F and length ratio of each system's answers
    against the base model's (closer to 1 keeps the base model's usability)."""
    check_report(report)
    head = ["kind", "n", "metric"] + [display_name(s) for s in report["systems"]]
    lines = table_rows(report)
    widths = [max(len(r[i]) for r in [head] + lines) for i in range(len(head))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    out = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines]
    return "\n".join(out) + "\n"
