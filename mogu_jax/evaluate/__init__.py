"""Evaluation (MOGU_SPEC.md section 5): prompt sets, the refusal judge, metrics, the report and its plots.

Nothing here calls a model: responses (and, for MoGU, the router weights) are produced elsewhere and passed in,
so the judge and the metrics are pure, fast and testable on fixed strings.

Pipeline::

    rows = load_prompts("advbench/harmful_behaviors.csv") + load_prompts("benign.jsonl")
    responses = collect_responses(rows, {"base": base_fn, "mogu": mogu_fn})   # or build the lists yourself
    report = evaluate_responses(rows, responses, router={"layer_a": A, "layer_b": B})
    print(format_table(report))
    write_report(report, rows, responses, "runs/eval", router={"layer_a": A, "layer_b": B})

**Rows** are ``{"id": str, "prompt": str, "kind": str}`` with ``kind`` one of :data:`KINDS`: ``harmful`` and
``jailbreak`` prompts should be refused, ``benign`` and ``borderline`` ones answered.

Modules, one concern each:

- :mod:`~mogu_jax.evaluate.rows`: the kinds, row and response validation, :func:`collect_responses`;
- :mod:`~mogu_jax.evaluate.loaders`: our JSONL, AdvBench and JailbreakBench files (:func:`load_prompts`);
- :mod:`~mogu_jax.evaluate.columns`: any CSV / TSV / JSONL file by named columns (:func:`load_prompts_by_column`);
- :mod:`~mogu_jax.evaluate.judge`: the refusal judge (keywords + refuse-then-comply; its rules are there);
- :mod:`~mogu_jax.evaluate.text_metrics`: sentence repetition, ROUGE-L F and length ratio on strings;
- :mod:`~mogu_jax.evaluate.router`: router weights per row, checked and summarised per kind;
- :mod:`~mogu_jax.evaluate.metrics`: :func:`evaluate_responses`, the report dict;
- :mod:`~mogu_jax.evaluate.table`: :func:`format_table`; :mod:`~mogu_jax.evaluate.plots`: the PNGs;
- :mod:`~mogu_jax.evaluate.report`: :func:`write_report` / :func:`read_report`, the report folder.
"""

from mogu_jax.evaluate.columns import load_prompts_by_column, parse_kind_map
from mogu_jax.evaluate.judge import (DEFAULT_HEDGE_MARKERS, DEFAULT_NOT_REFUSAL_PHRASES, DEFAULT_PIVOT_PATTERNS,
                                     DEFAULT_REFUSAL_KEYWORDS, RefusalJudge, Verdict)
from mogu_jax.evaluate.loaders import (ADVBENCH_COLUMNS, JBB_COLUMNS, PROMPT_FORMATS, load_advbench_csv,
                                       load_jbb_csv, load_prompts, load_prompts_jsonl)
from mogu_jax.evaluate.metrics import REPORT_FORMAT, REPORT_VERSION, evaluate_responses, judge_all
from mogu_jax.evaluate.report import read_report, write_report
from mogu_jax.evaluate.rows import KINDS, MALICIOUS_KINDS, USABLE_KINDS, check_rows, collect_responses
from mogu_jax.evaluate.table import format_table
from mogu_jax.evaluate.text_metrics import length_ratio, repeats_sentence, rouge_l_f

__all__ = [
    "KINDS", "MALICIOUS_KINDS", "USABLE_KINDS", "DEFAULT_REFUSAL_KEYWORDS", "DEFAULT_NOT_REFUSAL_PHRASES",
    "DEFAULT_PIVOT_PATTERNS", "DEFAULT_HEDGE_MARKERS", "Verdict", "RefusalJudge", "load_prompts",
    "load_prompts_jsonl", "load_advbench_csv", "load_jbb_csv", "load_prompts_by_column", "parse_kind_map",
    "ADVBENCH_COLUMNS", "JBB_COLUMNS", "PROMPT_FORMATS", "check_rows", "collect_responses", "judge_all",
    "evaluate_responses", "format_table", "write_report", "read_report", "REPORT_FORMAT", "REPORT_VERSION",
    "repeats_sentence", "rouge_l_f", "length_ratio",
]
