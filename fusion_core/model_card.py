"""The fused model's card (README.md of an exported folder, the registered version's description):
what it was fused from and how, on what data, how it was trained, how it scores beside its
references, its knowledge interference, and the config that made it. Pure: no MLflow, no Prefect.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from fusion_core.config import PipelineConfig, config_to_yaml
from fusion_core.reporting import fmt, markdown_table

# The scores a registered version carries as tags (`score.<metric>`), as `fusion compare --headline` shows them.
HEADLINE_SUFFIXES = (".bits_per_byte", ".acc_norm", ".exact_match.strict-match", "humaneval.pass_at_1")
INTERFERENCE_UNITS = {"bpb": "bits per byte (mean relative drop)", "acc": "accuracy (mean drop in points)"}
CONFIG_HEADING = "## Config"
DESCRIPTION_LIMIT = 5000  # MLflow's model version description column: VARCHAR(5000) on PostgreSQL and MySQL
SPLITS = ("train", "validation", "test")


@dataclass
class CardFacts:
    """What the card says, gathered where the model is registered.

    data_metrics: the prepare_data stage's metrics (`<split>_documents.<domain>`, ...);
    training_metrics: the fusion_training stage's (steps, train_seconds, tokens_seen, loss, ...);
    metrics: the candidate's evaluation metrics and its interference (`interference.<unit>[.lo/.hi]`);
    report: the evaluate stage's report (fusion_core.eval_report: evaluation.json), None if absent.
    """

    config: PipelineConfig
    registered_model: str = ""
    version: str = ""
    run_id: str = ""
    training_key: str = ""
    source_keys: Mapping[str, str] = field(default_factory=dict)
    target_key: str = ""
    data_metrics: Mapping[str, float] = field(default_factory=dict)
    training_metrics: Mapping[str, float] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    report: Mapping[str, Any] | None = None
    start_token: tuple[str, int] | None = None
    has_selector: bool = False


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def headline_scores(metrics: Mapping[str, float]) -> dict[str, float]:
    """Held-out bits per byte, acc_norm, strict exact match, pass@1 and interference with its interval."""
    out = {}
    for k, v in sorted(metrics.items()):
        if not _finite(v) or "_stderr" in k:
            continue
        if k.startswith("interference."):
            unit, _, rest = k[len("interference."):].partition(".")
            if unit in INTERFERENCE_UNITS and rest in ("", "lo", "hi"):
                out[k] = float(v)
        elif k.startswith(("eval.", "ppl.", "humaneval.")) and k.endswith(HEADLINE_SUFFIXES):
            out[k] = float(v)
    return out


def strategy_options(cfg: PipelineConfig) -> dict[str, Any]:
    """The fusion options that made this model: those of other strategies and training left out."""
    f = cfg.fusion
    opts: dict[str, Any] = {"strategy": f.strategy, "clm_weight": f.clm_weight}
    if f.strategy == "single":
        opts["single_source"] = f.single_source
    if f.strategy in ("adaptive", "reference"):
        opts.update({f"adaptive.{k}": v for k, v in f.adaptive.model_dump(mode="json").items()})
    opts.update({"teacher.top_k": cfg.teacher.top_k, "teacher.temperature": cfg.teacher.temperature,
                 "alignment.method": cfg.alignment.method, "alignment.projection": cfg.alignment.projection,
                 "alignment.marginalize": cfg.alignment.marginalize})
    return opts


def _model_ref(model) -> str:
    data = model.model_dump(mode="json", exclude_defaults=False)
    kind = data.pop("kind")
    main = {"hf": "path", "gguf": "path", "hub": "repo_id", "package": "package", "recipe": "recipe"}.get(kind)
    head = f"{kind}: {data.pop(main)}" if main in data else kind
    rest = ", ".join(f"{k}={v}" for k, v in data.items() if v not in (None, False, {}, [], 0) or k == "seed")
    return f"`{head}`" + (f" ({rest})" if rest else "")


def _duration(seconds) -> str:
    if not _finite(seconds):
        return "-"
    seconds = float(seconds)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def _data_section(cfg: PipelineConfig, m: Mapping[str, float]) -> list[str]:
    lines = ["## Data", "", "| corpus | domain | from | held out |", "|---|---|---|---|"]
    for c in cfg.data.corpora:
        origin = c.builtin or (str(c.path) if c.path else "-")
        lines.append(f"| {c.name} | {c.domain} | `{origin}` | {'yes' if c.heldout else 'no'} |")
    domains = list(dict.fromkeys(c.domain for c in cfg.data.corpora))
    lines += ["", f"Documents per split (whole documents; validation fraction {cfg.data.validation_fraction}, "
                  f"test fraction {cfg.data.test_fraction}, split seed {cfg.data.seed}; chunks of at most "
                  f"{cfg.data.max_length} tokens):", "",
              "| split | " + " | ".join(domains) + " | documents | chunks | characters |",
              "|---|" + "---|" * (len(domains) + 3)]
    for split in SPLITS:
        counts = [m.get(f"{split}_documents.{d}") for d in domains]
        total = sum(v for v in counts if _finite(v)) if any(_finite(v) for v in counts) else None
        lines.append(f"| {split} | " + " | ".join(fmt(v) if _finite(v) else "0" for v in counts)
                     + f" | {fmt(total)} | {fmt(m.get(f'{split}_chunks'))} | {fmt(m.get(f'{split}_chars'))} |")
    return lines + [""]


def _training_section(cfg: PipelineConfig, m: Mapping[str, float]) -> list[str]:
    t = cfg.fusion.training
    rows = [("optimizer steps", fmt(m.get("steps", t.steps))), ("learning rate", f"{t.learning_rate:g} "
             f"(warmup {t.warmup_steps} steps, down to {t.min_lr_ratio:g}x)"),
            ("micro batch x accumulation x processes", f"{t.micro_batch_size} x {t.gradient_accumulation} x "
                                                       f"{t.processes * t.nnodes}"),
            ("seed", str(t.seed)), ("DeepSpeed ZeRO stage", str(t.zero_stage)), ("precision", t.precision),
            ("tokens trained on", fmt(m.get("tokens_seen"))), ("wall time", _duration(m.get("train_seconds")))]
    for k in ("loss", "clm", "kd"):
        if _finite(m.get(k)):
            rows.append((f"final {k}", fmt(m[k])))
    return ["## Training", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def _scores_section(f: CardFacts) -> list[str]:
    cfg = f.config
    e = cfg.evaluation
    where = (f"held-out text: the prepared `{e.split}` split, bits per byte per domain; lm-eval tasks: "
             f"{', '.join(e.lm_eval_tasks) or 'none'}" + (f" (first {e.limit} items each)" if e.limit else "")
             + ("; HumanEval pass@1" if e.humaneval.enabled else ""))
    lines = ["## Scores", "", f"Evaluated by the pipeline's evaluate stage ({where}); every document and prompt "
                              "starts with the start token. ↓ lower is better, ↑ higher; ★ the best.", ""]
    report = f.report or {}
    models = dict(report.get("models") or {})
    scores = dict(report.get("scores") or {})
    candidate = report.get("candidate", "candidate")
    if not scores:
        scores = {candidate: {k: v for k, v in f.metrics.items() if k.startswith(("eval.", "ppl.", "humaneval."))
                              and k.endswith(HEADLINE_SUFFIXES) and "_stderr" not in k}}
        models = {candidate: {"role": "candidate", "metrics": dict(f.metrics)}}
    labels = [lab for lab in models if lab in scores] or list(scores)
    table = {lab: dict(scores.get(lab, {})) for lab in labels}
    for lab in labels:  # the total over every domain too, first
        total = (models.get(lab) or {}).get("metrics", {}).get("ppl.all.bits_per_byte")
        if _finite(total):
            table[lab]["ppl.all.bits_per_byte"] = total
    rows = sorted({k for lab in labels for k in table[lab]},
                  key=lambda k: (k != "ppl.all.bits_per_byte", not k.startswith("ppl."), k))
    names = {lab: ("this model" if lab == candidate else f"{lab} ({(models.get(lab) or {}).get('role', '')})")
             for lab in labels}
    lines += [markdown_table(table, labels, rows, label="task", names=names), ""]
    if len(labels) > 1:
        lines += ["The references: `target` is the target before fusion; `clm` the target trained on the same data "
                  "without teachers; `single:<source>` the target trained from that source alone.", ""]
    missing = report.get("missing_references") or []
    if missing:
        lines += [f"References not evaluated (not trained yet): {', '.join(missing)}.", ""]
    return lines


def _interference_section(f: CardFacts) -> list[str]:
    lines = ["## Knowledge interference", ""]
    report = f.report or {}
    mine = (report.get("interference") or {}).get(report.get("candidate", "candidate")) or {}
    units = mine.get("units") or {}
    m = f.metrics
    if not units:  # from the metrics alone
        units = {u: {"value": m[f"interference.{u}"], "lo": m.get(f"interference.{u}.lo"),
                     "hi": m.get(f"interference.{u}.hi")}
                 for u in INTERFERENCE_UNITS if _finite(m.get(f"interference.{u}"))}
    if not units:
        return lines + ["Not measured: no reference model scored this model's tasks item by item (the references are "
                        "trained by `fusion reproduce`, or with `evaluation.train_references: true`).", ""]
    boot = report.get("bootstrap") or {}
    refs = mine.get("references") or []
    level = f"{boot['level']:.0%} " if _finite(boot.get("level")) else ""
    lines += [f"How much this model falls behind the best of the reference set R = {{{', '.join(refs) or '?'}}} on "
              f"each task, averaged per unit (0: never behind); [lo, hi] is a {level}bootstrap interval over items"
              + (f" ({boot['resamples']} resamples)" if boot.get("resamples") else "") + ".", "",
              "| unit | interference [lo, hi] | tasks hurt |", "|---|---|---|"]
    tasks = mine.get("tasks") or []
    for unit, est in units.items():
        scale, suffix = (100.0, " points") if unit == "acc" else (100.0, " %")
        interval = (f" [{est['lo'] * scale:.2f}, {est['hi'] * scale:.2f}]"
                    if _finite(est.get("lo")) and _finite(est.get("hi")) else "")
        hurt = [t for t in tasks if t.get("unit") == unit]
        hurt_text = (f"{sum(bool(t.get('hurt')) for t in hurt)} of {len(hurt)}" if hurt else
                     f"{fmt(m.get(f'interference.{unit}.tasks_hurt'))} of {fmt(m.get(f'interference.{unit}.tasks'))}")
        lines.append(f"| {INTERFERENCE_UNITS.get(unit, unit)} | {est['value'] * scale:.2f}{suffix}{interval} | "
                     f"{hurt_text} |")
    return lines + [""]


def model_card(f: CardFacts) -> str:
    """The card as markdown; its last section is the resolved config (`CONFIG_HEADING`)."""
    cfg = f.config
    title = f"{f.registered_model} version {f.version}" if f.registered_model and f.version else cfg.name
    sources = ", ".join(s.name for s in cfg.sources)
    strategy = cfg.fusion.strategy + (f":{cfg.fusion.single_source}" if cfg.fusion.strategy == "single" else "")
    lines = [f"# {title}", "",
             f"The target `{cfg.target.name}` fused from {len(cfg.sources)} source model(s) ({sources}) by "
             f"llm-fusion with the `{strategy}` strategy: it was trained on "
             f"{cfg.fusion.clm_weight:g} x next-token loss + {1 - cfg.fusion.clm_weight:g} x distillation from the "
             f"sources' aligned distributions. Pipeline `{cfg.name}`"
             + (f", MLflow run `{f.run_id}`" if f.run_id else "")
             + (f", training output `{f.training_key}`" if f.training_key else "") + ".", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
              'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
              'inputs = tokenizer("def add(a, b):", return_tensors="pt")',
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))", "```", ""]
    if f.start_token:
        token, ident = f.start_token
        lines += [f"The tokenizer puts the start token `{token}` (id {ident}) in front of every text: the model was "
                  "trained and scored on documents that begin with it, and scores worse without it. With "
                  "`add_special_tokens=False`, put it there yourself.", ""]
    lines += ["## Sources", "", "| source | model | content key |", "|---|---|---|"]
    lines += [f"| {s.name} | {_model_ref(s.model)} | {f.source_keys.get(s.name, '-')} |" for s in cfg.sources]
    lines += ["", f"Target (before fusion): `{cfg.target.name}`, {_model_ref(cfg.target.model)}"
              + (f", content key {f.target_key}" if f.target_key else "") + ".", ""]
    lines += ["## Strategy", "", "| option | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in strategy_options(cfg).items()] + [""]
    lines += _data_section(cfg, f.data_metrics)
    lines += _training_section(cfg, f.training_metrics)
    lines += _scores_section(f)
    lines += _interference_section(f)
    lines += ["## Files", "",
              "- `config.json`, `generation_config.json`, `*.safetensors`: the model (transformers).",
              "- `tokenizer.json`, `tokenizer_config.json`: its tokenizer, adding the start token.",
              "- `README.md`: this card."]
    if f.has_selector:
        lines.append("- `fusion_strategy.safetensors`: the trained selection network of the adaptive strategy and "
                     "its input statistics (the running mean and variance that standardise each source's score "
                     "before the gate). It only chose, during training, which sources' distributions the model "
                     "learned from on each sequence; it is not part of the model and not needed to run it "
                     "(transformers ignores it).")
    lines += ["", CONFIG_HEADING, "", "The resolved config (defaults filled in) that produced this model:", "",
              "```yaml", config_to_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


def card_description(card: str, limit: int = DESCRIPTION_LIMIT, *, where: str = "README.md of the registered "
                                                                               "model's artifacts") -> str:
    """The card as a registered version's description: whole when it fits `limit` characters,
    else without its config section (pointing to `where`), else cut with a note."""
    if len(card) <= limit:
        return card
    head = card.split(f"\n{CONFIG_HEADING}\n", 1)[0].rstrip()
    note = f"\n\n{CONFIG_HEADING}\n\nThe config and the rest of this card: {where}.\n"
    if len(head) + len(note) <= limit:
        return head + note
    cut = f"\n\n(cut here: the description holds {limit} characters; the whole card: {where})\n"
    return card[: limit - len(cut)].rstrip() + cut
