"""One rank of a multi-process fusion training, started by torchrun or the deepspeed launcher.

    torchrun --standalone --nproc_per_node N -m fusion_core.train_launch JOB.json

JOB.json (written by the fusion_training stage) names the training documents, the target model,
the teacher shard folders (one per source, in order; none for strategy 'clm'), the FusionConfig
(as JSON), the output folder, and two files rank 0 writes: `history` (one JSON line
{"step", "metrics"} per logged step, flushed as it goes, so the stage can forward it to MLflow
while training runs) and `result` (the TrainingResult as JSON, written atomically at the end).
Every rank builds the same examples from the same files, so no data is shipped between processes;
`training.train_target` splits the stream by rank.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(job_path: str) -> None:
    from fusion_core.config import FusionConfig
    from fusion_core.teacher import load_fusion_examples
    from fusion_core.training import train_target
    from fusion_core.workspace import write_json_atomic

    job = json.loads(Path(job_path).read_text())
    fusion = FusionConfig.model_validate(job["fusion"])
    examples = load_fusion_examples(Path(job["train"]), Path(job["target"]), [Path(p) for p in job["teachers"]])
    rank0 = os.environ.get("RANK", "0") == "0"
    history = Path(job["history"])

    def log(metrics: dict[str, float], step: int) -> None:
        with history.open("a") as f:
            f.write(json.dumps({"step": step, "metrics": metrics}) + "\n")

    result = train_target(Path(job["target"]), examples, fusion=fusion, out_dir=Path(job["out_dir"]),
                          source_names=job["sources"], log=log if rank0 else None)
    if rank0:
        write_json_atomic(Path(job["result"]), {
            "model_dir": str(result.model_dir), "steps": result.steps, "tokens_seen": result.tokens_seen,
            "metrics": result.metrics, "wall_time_s": result.wall_time_s,
            "resumed_from_step": result.resumed_from_step})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m fusion_core.train_launch JOB.json")
    main(sys.argv[1])
