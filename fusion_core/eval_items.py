"""Per-item evaluation results: one record per scored document or question, the file that
holds them (`items.jsonl`), and the per-task item tables that knowledge interference and the
strategy study bootstrap over (fusion_core.interference).

A record is a JSON object, one per line:

    {"unit": "perplexity", "kind": "document", "id": "<document id>", "domain": "code",
     "bits": 812.5, "bytes": 640, "tokens": 231}
        NLL of the document in bits (every token after the start token scored once) and its
        UTF-8 bytes: bits per byte of a set of documents = sum bits / sum bytes;
    {"unit": "lm_eval:<task>", "kind": "question", "task": "eval.<task>", "id": "<doc_id>",
     "scores": {"acc": 1.0, "acc_norm": 0.0}}
        lm-eval's per-sample metric values, a filtered metric named as in the flat metrics
        ("exact_match.strict-match");
    {"unit": "humaneval", "kind": "question", "task": "humaneval", "id": "HumanEval/0",
     "scores": {"pass_at_1": 1.0}}

Pure library: no MLflow, no Prefect.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from fusion_core.bootstrap import TaskItems
from fusion_core.interference import PRIMARY_METRICS

ITEMS_FILE = "items.jsonl"
DOCUMENT = "document"
QUESTION = "question"


def document_records(unit: str, docs: Iterable, tokens: Iterable[int], nll_nats: Iterable[float]) -> list[dict]:
    """Records of scored documents (objects with `.domain`, `.text` and, when they have one, `.id`;
    the position stands in for a missing id), given the tokens scored in each and its total NLL
    in nats: NLL in bits, UTF-8 bytes, scored tokens."""
    out = []
    for k, (doc, n, nll) in enumerate(zip(docs, tokens, nll_nats, strict=True)):
        out.append({"unit": unit, "kind": DOCUMENT, "id": str(getattr(doc, "id", None) or f"#{k}"),
                    "domain": doc.domain, "bits": float(nll) / math.log(2),
                    "bytes": len(doc.text.encode("utf-8")), "tokens": int(n)})
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def lm_eval_records(unit: str, results: Mapping) -> list[dict]:
    """Records of lm-eval's per-sample output (`results["samples"]`, from `log_samples=True`):
    one per (task, doc_id), the numeric metric values of every filter merged, named like
    `flatten_lm_eval_metrics` names them (`<metric>` for filter "none", else `<metric>.<filter>`)."""
    from fusion_core.evaluation import sanitize_metric_name

    out: dict[tuple[str, str], dict] = {}
    for task, samples in (results.get("samples") or {}).items():
        for sample in samples or ():
            flt = sample.get("filter", "none")
            rec = out.setdefault((task, str(sample["doc_id"])), {
                "unit": unit, "kind": QUESTION, "task": sanitize_metric_name(f"eval.{task}"),
                "id": str(sample["doc_id"]), "scores": {}})
            for metric in sample.get("metrics") or ():
                value = _number(sample.get(metric))
                if value is not None:
                    rec["scores"][metric if flt == "none" else f"{metric}.{flt}"] = value
    return list(out.values())


def humaneval_records(unit: str, samples: Iterable[Mapping]) -> list[dict]:
    """Records of HumanEval's samples: pass@1 of each problem's one greedy completion."""
    return [{"unit": unit, "kind": QUESTION, "task": "humaneval", "id": str(s["task_id"]),
             "scores": {"pass_at_1": float(s["status"] == "passed")}} for s in samples]


def write_items(path: Path, records: Iterable[Mapping]) -> int:
    """Write records as JSON lines; returns how many."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
            n += 1
    return n


def items_text(records: Iterable[Mapping]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records)


def read_items(path: Path) -> list[dict]:
    """The records of an items file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def task_items(records: Iterable[Mapping]) -> dict[str, TaskItems]:
    """`{task score name: TaskItems}` from records: per document domain `ppl.<domain>.bits_per_byte`
    (bits and bytes per document); per question task its primary metric (`eval.<task>.acc_norm`,
    else `.acc`, `.exact_match.strict-match`, `.exact_match`; `humaneval.pass_at_1`), taken
    only from questions that all have it. Names match `interference.primary_scores`.
    Raises ValueError for a repeated id within a task."""
    from fusion_core.evaluation import sanitize_metric_name

    docs: dict[str, list[Mapping]] = {}
    questions: dict[str, list[Mapping]] = {}
    for rec in records:
        if rec.get("kind") == DOCUMENT:
            docs.setdefault(rec["domain"], []).append(rec)
        elif rec.get("kind") == QUESTION:
            questions.setdefault(rec["task"], []).append(rec)
    out: dict[str, TaskItems] = {}
    for domain, rows in sorted(docs.items()):
        name = sanitize_metric_name(f"ppl.{domain}.bits_per_byte")
        out[name] = TaskItems(tuple(r["id"] for r in rows), tuple(r["bits"] for r in rows),
                              tuple(r["bytes"] for r in rows))
    for task, rows in sorted(questions.items()):
        metrics = ("pass_at_1",) if task == "humaneval" else PRIMARY_METRICS
        metric = next((m for m in metrics if rows and all(m in r["scores"] for r in rows)), None)
        if metric is not None:
            out[f"{task}.{metric}"] = TaskItems(tuple(r["id"] for r in rows),
                                                tuple(r["scores"][metric] for r in rows))
    return out
