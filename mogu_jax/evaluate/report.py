"""The report folder: ``report.json`` (the dict of :func:`~mogu_jax.evaluate.metrics.evaluate_responses`),
``report.md``, ``responses.jsonl`` (every prompt with each system's response and verdict) and the plots, written
atomically; :func:`read_report` reads it back."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

from mogu_jax.errors import MoguError
from mogu_jax.evaluate.judge import RefusalJudge
from mogu_jax.evaluate.metrics import check_report, evaluate_responses, usability_per_row
from mogu_jax.evaluate.plots import plot_refusal_rates, plot_router_layers
from mogu_jax.evaluate.router import check_router
from mogu_jax.evaluate.rows import check_responses, check_rows
from mogu_jax.evaluate.table import display_name, num, pct
from mogu_jax.evaluate.text_metrics import REPEAT_TIMES, most_repeated_sentence
from mogu_jax.io_utils import atomic_dir


def _judge_line(report: Mapping[str, Any]) -> str:
    j = report["judge"]
    names = [display_name(s) for s in report["systems"]]
    return (f"{report['n_rows']} prompts; systems: {', '.join(names)}. Judge: {len(j['keywords'])} refusal "
            f"keywords, scope `{j['scope']}`" + (f" (first {j['opening_chars']} characters)"
                                                if j["scope"] == "opening" else "")
            + (f", hollow-refusal detection on (pivots: {', '.join(j['pivot_patterns'])}; more than "
               f"{j['max_content_chars']} characters of content after the refusal)" if j["detect_hollow"]
               else ", hollow-refusal detection off") + ".")


def _rates_table(report: Mapping[str, Any]) -> list[str]:
    systems = list(report["systems"])
    names = [display_name(s) for s in systems]
    cols = ["kind", "n"]
    for label in ("clean refusal", "ASR", "over-refusal", "hollow", "repeated"):
        cols += [f"{n} {label}" for n in names]
    md = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|"]
    for k in report["kinds"]:
        ms = [report["metrics"][s][k] for s in systems]
        cells = [k, str(ms[0]["n"])]
        cells += [pct(m["clean_refusal_rate"]) for m in ms]
        cells += [pct(m.get("asr")) for m in ms]
        cells += [pct(m.get("over_refusal_rate")) for m in ms]
        cells += [pct(m["hollow_rate"]) for m in ms]
        cells += [pct(m.get("repetition_rate")) for m in ms]
        md.append("| " + " | ".join(cells) + " |")
    return md + [""]


def _usability_section(report: Mapping[str, Any]) -> list[str]:
    u = report.get("usability")
    if not u:
        return []
    md = ["## Usability", "",
          f"How close each system's answers to benign/borderline prompts stay to the {u['reference']} model's "
          "answers to the same prompts: ROUGE-L F over word tokens (1 = the same words in the same order) and the "
          "answer-length ratio (words / base words), median (mean) over the kind's prompts.", "",
          "| kind | n | system | ROUGE-L F median | ROUGE-L F mean | length ratio median | length ratio mean |",
          "|---|---:|---|---:|---:|---:|---:|"]
    for name, per_kind in u["systems"].items():
        for k in u["kinds"]:
            s = per_kind[k]
            md.append(f"| {k} | {s['n']} | {display_name(name)} | {num(s['rouge_l']['median'])} | "
                      f"{num(s['rouge_l']['mean'])} | {num(s['length_ratio']['median'])} | "
                      f"{num(s['length_ratio']['mean'])} |")
    return md + [""]


def _router_section(report: Mapping[str, Any]) -> list[str]:
    rr = report.get("router")
    if not rr:
        return []
    md = ["## Router", "", "Mean router weights over layers and tokens: `a` (unwilling branch) should dominate "
          "on harmful/jailbreak prompts, `b` (glad branch) on benign ones.", "",
          "| kind | mean a | mean b | share b > a |", "|---|---:|---:|---:|"]
    for k in report["kinds"]:
        md.append(f"| {k} | {rr['mean_a'][k]:.3f} | {rr['mean_b'][k]:.3f} | {pct(rr['b_gt_a_rate'][k])} |")
    return md + [""]


def _markdown(report: Mapping[str, Any], plots: list[str]) -> str:
    md = ["# MoGU evaluation report", "", _judge_line(report), ""]
    md.append("Clean refusal: refusal keyword and no hollow continuation. ASR: share not cleanly refused "
              "(harmful/jailbreak). Over-refusal: share opening with a refusal, clean or hollow "
              f"(benign/borderline). Repeated: share of responses with one sentence {REPEAT_TIMES} or more times "
              "(a refusal or answer that loops instead of ending). `-`: not applicable to the kind.")
    md.append("")
    md += _rates_table(report) + _usability_section(report) + _router_section(report)
    if plots:
        md += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    md += ["## Responses", "", "Every prompt with each system's response, verdict, repetition, closeness to the "
           "base answer and (for MoGU) router means: [responses.jsonl](responses.jsonl).", ""]
    return "\n".join(md)


def _response_records(rows: list[dict], resps: Mapping[str, list[str]], judge: RefusalJudge,
                      router: Optional[Mapping[str, Any]]):
    """One ``responses.jsonl`` record per row."""
    verdicts = {name: [judge.judge(x) for x in rs] for name, rs in resps.items()}
    usability = usability_per_row(rows, resps)
    for i, row in enumerate(rows):
        rec = dict(row)
        for name in resps:
            rec[f"{name}_response"] = resps[name][i]
        rec["verdicts"] = {name: verdicts[name][i].to_dict() for name in resps}
        rec["repeated_sentence"] = {}
        for name in resps:
            sentence, times = most_repeated_sentence(resps[name][i])
            rec["repeated_sentence"][name] = {"sentence": sentence, "times": times} if times >= REPEAT_TIMES else None
        if usability:
            rec["vs_base"] = {name: vals[i] for name, vals in usability.items()}
        rec["router"] = (None if router is None else
                         {"mean_a": float(router["mean_a"][i]), "mean_b": float(router["mean_b"][i])})
        yield rec


def _check_matches(report: Mapping[str, Any], rows: list[dict], responses_by_system, router, judge) -> None:
    again = evaluate_responses(rows, responses_by_system, router, judge=judge)
    if (again["metrics"] != report["metrics"] or again["systems"] != list(report["systems"])
            or again["usability"] != report.get("usability", again["usability"])):
        raise MoguError("the report does not match these rows and responses (its metrics differ when recomputed); "
                        "pass the rows and responses the report was made from")
    if router is not None and again["router"] != report.get("router"):
        raise MoguError("the report's router section does not match this router data")


def write_report(report: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                 responses_by_system: Mapping[str, Sequence[str]], out_dir: str | os.PathLike, *,
                 router: Optional[Mapping[str, Any]] = None, overwrite: bool = False, plots: bool = True) -> str:
    """Write ``report.json``, ``report.md``, ``responses.jsonl`` and (``plots=True``, needs matplotlib)
    ``refusal_rates.png`` and ``router_layers.png`` (only with per-layer router data) into ``out_dir``.

    The verdicts in ``responses.jsonl`` are recomputed with the report's judge settings, and the metrics they give
    must equal the report's (so the files cannot disagree). ``router`` is the same per-row router data given to
    :func:`evaluate_responses` (for the per-row means in ``responses.jsonl``). Everything is written into a hidden
    temp folder beside ``out_dir`` and renamed at the end; an existing non-empty ``out_dir`` is refused unless
    ``overwrite=True``. Returns the absolute path of ``out_dir``.
    """
    check_report(report)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise MoguError(f"output {out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise MoguError(f"output directory {out_dir} exists and is not empty; choose another directory or "
                            "pass overwrite=True")
    rows = check_rows(rows)
    judge = RefusalJudge.from_config(report["judge"])
    _check_matches(report, rows, responses_by_system, router, judge)
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise MoguError("the report plots need matplotlib: pip install matplotlib, or pass plots=False") from None
    resps = check_responses(rows, responses_by_system)
    r = check_router(router, len(rows))
    rr = report.get("router")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        written = []
        if plots:
            plot_refusal_rates(report, os.path.join(tmp, "refusal_rates.png"))
            written.append("refusal_rates.png")
            if rr and rr.get("layer_a"):
                plot_router_layers(report, os.path.join(tmp, "router_layers.png"))
                written.append("router_layers.png")
        with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
            f.write("\n")
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as f:
            f.write(_markdown(report, written))
        with open(os.path.join(tmp, "responses.jsonl"), "w", encoding="utf-8") as f:
            for rec in _response_records(rows, resps, judge, r):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out_dir


def read_report(path: str | os.PathLike) -> dict:
    """Read ``report.json`` (a path to the file or to a report folder)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "report.json")
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        raise MoguError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise MoguError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    check_report(report)
    return report
