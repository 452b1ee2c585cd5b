"""The reference models of the evaluation: the clm baseline and the target trained from each
source alone (the references of knowledge interference), found in the workspace or trained.

A reference is the same pipeline with another strategy, so it shares stages 1-3 and is
identified by its fusion_training stage key: one trained by any earlier run (a `clm` pipeline,
`fusion reproduce`, another strategy's references) is found and reused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fusion_core.workspace import StageOutput
from tasks.fusion_training import fusion_training, training_key
from tasks.stage import RunContext, StageResult


@dataclass(frozen=True)
class ReferenceModel:
    label: str  # "clm" or "single:<source>"
    key: str  # its fusion_training stage key
    model_dir: Path | None  # None: not trained (and evaluation.train_references is off)


def reference_labels(cfg) -> list[str]:
    """The interference references the config asks for: clm, then single:<source> per source."""
    refs = cfg.evaluation.references
    return (["clm"] if "clm" in refs else []) + (
        [f"single:{s.name}" for s in cfg.sources] if "single" in refs else [])


def reference_context(ctx: RunContext, label: str) -> RunContext:
    """`ctx` with the fusion strategy of reference `label` (clm or single:<source>)."""
    strategy, _, source = label.partition(":")
    update = {"strategy": strategy}
    if strategy == "single":
        update["single_source"] = source
    fusion = ctx.config.fusion.model_copy(update=update)
    return dataclasses.replace(ctx, config=ctx.config.model_copy(update={"fusion": fusion}), force_stages=frozenset())


def reference_models(ctx: RunContext, data: StageResult, teacher: StageResult, candidate: StageResult,
                     logger) -> list[ReferenceModel]:
    """Every reference the config names, with its model folder when one is trained.

    The reference the candidate itself is (in a clm or single pipeline) is left out. A missing
    reference is trained (the fusion_training task, tagged with the reference's label) when
    `evaluation.train_references` is on, and left out otherwise, saying how to get it.
    """
    cfg = ctx.config
    out = []
    for label in reference_labels(cfg):
        rctx = reference_context(ctx, label)
        key = training_key(rctx, teacher.key)
        if key == candidate.key:  # a model is not its own reference (a clm or single pipeline)
            continue
        stored = StageOutput(cfg.workspace.root, "fusion_training", key)
        if stored.complete():
            out.append(ReferenceModel(label, key, stored.path / "model"))
        elif cfg.evaluation.train_references:
            logger.info(f"reference {label}: training it (evaluation.train_references)")
            trained = fusion_training.with_options(task_run_name=f"fusion_training [{label}]")(
                rctx, data, teacher, reference=label)
            out.append(ReferenceModel(label, key, trained.path / "model"))
        else:
            logger.warning(f"reference {label} is not trained yet: left out of the interference metrics "
                           f"(`fusion reproduce`, or evaluation.train_references: true, trains it)")
            out.append(ReferenceModel(label, key, None))
    return out
