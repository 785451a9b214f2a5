"""Static checks of the cluster configs in cluster/ (no network, no Ray cluster, no Kubernetes).

- The cluster-launcher YAML is validated with Ray's own code and schema: defaults filled in first
  (``prepare_config``; a partial YAML fails ``validate_config`` with a misleading version-mismatch error), then
  ``validate_config`` (jsonschema against ray/autoscaler/ray-schema.json).  A misspelt field must be rejected.
- No KubeRay CRD schema is available offline, so ``kuberay_problems`` checks the fields that matter for these
  sweeps one by one; mutated manifests show that each check can fail.
- The Dockerfile and the launcher pin the versions that pyproject.toml, the Makefile and the installed Ray use.
- .rayignore is applied with Ray's own upload filter to a fake tree.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "ray-cluster-gpu.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster-gpu.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob-sweep.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"

RAY_VERSION = ray.__version__
GPU = "nvidia.com/gpu"
DATASET_DIR = "/data/ogbench"
STORAGE_PATH = "/data/ray_results"
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader, node, deep=False):
    keys = [loader.construct_object(key_node, deep=deep) for key_node, _ in node.value]
    duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
    if duplicates:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.load(f, Loader=_StrictLoader)


def test_yaml_loader_rejects_duplicate_keys():
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        yaml.load("a: 1\na: 2\n", Loader=_StrictLoader)


def pyproject_pins() -> dict[str, str]:
    """name -> exact version for every ``==`` pin in pyproject's dependencies (extras dropped from the name)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*", dep)
        if match:
            pins[match[1].lower()] = match[3]
    return pins


# ----------------------------------------------------------------------------------------------------------------
# Cluster launcher
# ----------------------------------------------------------------------------------------------------------------


def validate_launcher_config(config: dict) -> dict:
    """What `ray up` does before launching anything: fill defaults, then validate against Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    filled = prepare_config(copy.deepcopy(config))  # fillout_defaults + setup-command merge + docker checks
    validate_config(filled)
    return filled


def test_launcher_config_passes_rays_schema():
    filled = validate_launcher_config(load_yaml(LAUNCHER))
    assert filled["provider"]["type"] == "aws"
    assert filled["head_node_type"] in filled["available_node_types"]


def test_validate_config_needs_defaults_first():
    """The gotcha: a partial YAML fails plain validate_config with a misleading version-mismatch message."""
    from ray.autoscaler._private.util import validate_config

    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(load_yaml(LAUNCHER))


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c["available_node_types"]["gpu_worker"].update(resourcez={"GPU": 1}), id="resourcez"),
        pytest.param(lambda c: c.update(idle_timeout_minute=5), id="top-level-typo"),
        pytest.param(lambda c: c["docker"].update(run_option=["--shm-size=8g"]), id="docker-typo"),
        pytest.param(lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), id="fraction"),
        pytest.param(lambda c: c["available_node_types"]["gpu_worker"].pop("resources"), id="no-resources"),
    ],
)
def test_launcher_schema_rejects_mistakes(mutate):
    config = load_yaml(LAUNCHER)
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        validate_launcher_config(config)


def test_launcher_layout_image_and_environment():
    config = load_yaml(LAUNCHER)
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must advertise no CPU so that no trial runs on it"
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert workers and all(n["resources"].get("GPU", 0) >= 1 and n["resources"].get("CPU", 0) >= 1 for n in workers)
    assert all(n["max_workers"] <= config["max_workers"] for n in workers)
    assert config["idle_timeout_minutes"] > 0

    docker = config["docker"]
    assert docker["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    options = " ".join(docker.get("run_options", []))
    for role in ("head", "worker"):  # Ray's object store lives in /dev/shm: size it on both kinds of node
        assert "--shm-size=" in " ".join([options, *docker.get(f"{role}_run_options", [])]), role
    assert "-e MUJOCO_GL=egl" in options
    assert re.search(r"-e RAY_AUTH_MODE=(token|disabled)\b", options)
    assert "-v /data:/data" in options


def test_launcher_pins_and_installs_the_project():
    config = load_yaml(LAUNCHER)
    commands = "\n".join(config["setup_commands"])
    torch_version = re.search(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)[1]
    pins = pyproject_pins()
    assert f'"torch=={torch_version}"' in commands
    assert f'"ray[default,tune,rllib]=={RAY_VERSION}"' in commands and pins["ray"] == RAY_VERSION
    assert f'"gymnasium=={pins["gymnasium"]}"' in commands
    # torch goes in before anything that depends on it, the project last.
    assert commands.index("torch==") < commands.index("ray[") < commands.index("pip install -q -e /home/ray/qam_ray")
    assert config["file_mounts"]["/home/ray/qam_ray"] == "."
    assert ".rayignore" in config["rsync_filter"]


# ----------------------------------------------------------------------------------------------------------------
# KubeRay
# ----------------------------------------------------------------------------------------------------------------


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _image_problems(image: str, where: str) -> list[str]:
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    if not re.search(rf"(^|[^0-9.]){re.escape(RAY_VERSION)}($|[^0-9.])", tag):
        return [f"{where}: image tag {tag!r} does not carry Ray {RAY_VERSION}"]
    return []


def _pod_problems(pod_spec: dict, where: str, *, gpu: bool) -> list[str]:
    problems = []
    containers = pod_spec.get("containers", [])
    if not containers:
        return [f"{where}: no containers"]
    ray_container = containers[0]
    env = _env(ray_container)
    if env.get("MUJOCO_GL") != "egl":
        problems.append(f"{where}: env MUJOCO_GL must be 'egl'")
    if not env.get("MLFLOW_TRACKING_URI"):
        problems.append(f"{where}: env MLFLOW_TRACKING_URI missing")
    problems += _image_problems(ray_container.get("image", ""), where)

    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in ray_container.get("volumeMounts", [])}
    shm = mounts.get("/dev/shm")
    if shm is None or volumes.get(shm["name"], {}).get("emptyDir", {}).get("medium") != "Memory":
        problems.append(f"{where}: /dev/shm must be an emptyDir with medium Memory")
    data = mounts.get(DATASET_DIR)
    if data is None or "persistentVolumeClaim" not in volumes.get(data["name"], {}):
        problems.append(f"{where}: {DATASET_DIR} must be mounted from a PersistentVolumeClaim")
    results = mounts.get(STORAGE_PATH)
    if results is None or "persistentVolumeClaim" not in volumes.get(results["name"], {}):
        problems.append(f"{where}: {STORAGE_PATH} must be mounted from a PersistentVolumeClaim")

    resources = ray_container.get("resources", {})
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if gpu:
        if GPU not in limits:
            problems.append(f"{where}: no {GPU} limit")
        elif str(limits[GPU]) != str(requests.get(GPU)):
            problems.append(f"{where}: {GPU} requests ({requests.get(GPU)}) != limits ({limits[GPU]})")
        elif not str(limits[GPU]).isdigit() or int(limits[GPU]) < 1:
            problems.append(f"{where}: {GPU} must be a whole number >= 1")
        tolerations = pod_spec.get("tolerations", [])
        if not any(t.get("key") == GPU and t.get("effect") == "NoSchedule" for t in tolerations):
            problems.append(f"{where}: no NoSchedule toleration for {GPU}")
        if not pod_spec.get("nodeSelector"):
            problems.append(f"{where}: no nodeSelector for the GPU node pool")
    elif GPU in limits or GPU in requests:
        problems.append(f"{where}: the head must not request GPUs")
    return problems


def raycluster_spec_problems(spec: dict, where: str = "RayCluster") -> list[str]:
    """Everything these sweeps rely on in a ray.io/v1 RayClusterSpec; [] when all holds."""
    problems = []
    if spec.get("rayVersion") != RAY_VERSION:
        problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r} != installed Ray {RAY_VERSION}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}: enableInTreeAutoscaling must be true")
    if not isinstance(spec.get("autoscalerOptions", {}).get("idleTimeoutSeconds"), int):
        problems.append(f"{where}: autoscalerOptions.idleTimeoutSeconds missing")

    head = spec.get("headGroupSpec", {})
    num_cpus = head.get("rayStartParams", {}).get("num-cpus")
    if num_cpus != "0":  # rayStartParams values are strings in the CRD
        problems.append(f"{where}: head rayStartParams num-cpus must be the string '0', got {num_cpus!r}")
    head_pod = head.get("template", {}).get("spec", {})
    problems += _pod_problems(head_pod, f"{where} head", gpu=False)
    head_image = (head_pod.get("containers") or [{}])[0].get("image")

    groups = spec.get("workerGroupSpecs", [])
    if not groups:
        problems.append(f"{where}: no workerGroupSpecs")
    for group in groups:
        name = f"{where} worker group {group.get('groupName')!r}"
        if not group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 0):
            problems.append(f"{name}: needs minReplicas <= replicas <= maxReplicas")
        if group.get("maxReplicas", 0) < 1:
            problems.append(f"{name}: maxReplicas must be >= 1")
        pod = group.get("template", {}).get("spec", {})
        problems += _pod_problems(pod, name, gpu=True)
        image = (pod.get("containers") or [{}])[0].get("image")
        if image != head_image:
            problems.append(f"{name}: image {image!r} differs from the head's {head_image!r}")
    return problems


def kuberay_problems(doc: dict) -> list[str]:
    """Checks a RayCluster or RayJob manifest; returns a list of problems ([] when fine)."""
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}"]
    kind, spec = doc.get("kind"), doc.get("spec", {})
    if kind == "RayCluster":
        return raycluster_spec_problems(spec)
    if kind != "RayJob":
        return [f"kind must be RayCluster or RayJob, got {kind!r}"]

    problems = raycluster_spec_problems(spec.get("rayClusterSpec", {}), "RayJob.rayClusterSpec")
    argv = shlex.split(spec.get("entrypoint", ""))
    if argv[:2] != ["python", "experiments/sweep.py"]:
        problems.append(f"RayJob: entrypoint must run experiments/sweep.py, got {spec.get('entrypoint')!r}")

    def flag(name):
        return argv[argv.index(name) + 1] if name in argv[:-1] else None

    if flag("--dataset-dir") != DATASET_DIR:
        problems.append(f"RayJob: entrypoint needs --dataset-dir {DATASET_DIR} (the mounted data)")
    if flag("--storage-path") != STORAGE_PATH:
        problems.append(f"RayJob: entrypoint needs --storage-path {STORAGE_PATH} (the shared results volume)")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("RayJob: shutdownAfterJobFinishes must be true")
    if not isinstance(spec.get("ttlSecondsAfterFinished"), int) or spec["ttlSecondsAfterFinished"] < 0:
        problems.append("RayJob: ttlSecondsAfterFinished must be a non-negative integer")
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        problems.append(f"RayJob: unknown submissionMode {spec.get('submissionMode')!r}")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
    if not runtime_env.get("working_dir"):
        problems.append("RayJob: runtimeEnvYAML needs a working_dir")
    env_vars = runtime_env.get("env_vars", {})
    if env_vars.get("MUJOCO_GL") != "egl" or not env_vars.get("MLFLOW_TRACKING_URI"):
        problems.append("RayJob: runtimeEnvYAML env_vars need MUJOCO_GL=egl and MLFLOW_TRACKING_URI")
    return problems


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_manifest_is_complete(path):
    doc = load_yaml(path)
    assert doc["kind"] == {RAYCLUSTER: "RayCluster", RAYJOB: "RayJob"}[path]
    assert kuberay_problems(doc) == []


def test_rayjob_uses_the_raycluster_spec():
    assert load_yaml(RAYJOB)["spec"]["rayClusterSpec"] == load_yaml(RAYCLUSTER)["spec"]


def _gpu_group(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][0]["template"]["spec"]


def _gpu_container(doc):
    return _gpu_group(doc)["containers"][0]


def _head_spec(doc):
    return doc["spec"].get("rayClusterSpec", doc["spec"])["headGroupSpec"]


KUBERAY_MUTATIONS = {
    "gpu-limit-removed": (lambda d: _gpu_container(d)["resources"]["limits"].pop(GPU), "no nvidia.com/gpu limit"),
    "gpu-request-differs": (lambda d: _gpu_container(d)["resources"]["requests"].update({GPU: "2"}), "!= limits"),
    "toleration-removed": (lambda d: _gpu_group(d).pop("tolerations"), "toleration"),
    "head-num-cpus-int": (lambda d: _head_spec(d)["rayStartParams"].update({"num-cpus": 0}), "num-cpus"),
    "head-num-cpus-removed": (lambda d: _head_spec(d)["rayStartParams"].pop("num-cpus"), "num-cpus"),
    "shm-not-memory": (lambda d: _gpu_group(d)["volumes"][0]["emptyDir"].pop("medium"), "/dev/shm"),
    "worker-image-differs": (
        lambda d: _gpu_container(d).update(image=f"rayproject/ray:{RAY_VERSION}-py311-gpu-other"),
        "differs from the head",
    ),
    "old-image-tag": (lambda d: _gpu_container(d).update(image="registry.example.com/qam-ray:2.9.0"), "image tag"),
    "ray-version": (lambda d: d["spec"].get("rayClusterSpec", d["spec"]).update(rayVersion="2.59.0"), "rayVersion"),
    "mujoco-gl-missing": (lambda d: _gpu_container(d).update(env=[]), "MUJOCO_GL"),
    "api-version": (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
}

RAYJOB_MUTATIONS = {
    "no-shutdown": (lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes"),
    "other-script": (lambda d: d["spec"].update(entrypoint="python experiments/train.py"), "sweep.py"),
    "no-storage-path": (
        lambda d: d["spec"].update(entrypoint="python experiments/sweep.py --dataset-dir /data/ogbench"),
        "--storage-path",
    ),
    "no-working-dir": (lambda d: d["spec"].update(runtimeEnvYAML="env_vars: {MUJOCO_GL: egl}"), "working_dir"),
}


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
@pytest.mark.parametrize("mutation", sorted(KUBERAY_MUTATIONS))
def test_kuberay_checker_catches_broken_manifests(path, mutation):
    mutate, expected = KUBERAY_MUTATIONS[mutation]
    doc = load_yaml(path)
    mutate(doc)
    problems = kuberay_problems(doc)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("mutation", sorted(RAYJOB_MUTATIONS))
def test_rayjob_checker_catches_broken_jobs(mutation):
    mutate, expected = RAYJOB_MUTATIONS[mutation]
    doc = load_yaml(RAYJOB)
    mutate(doc)
    problems = kuberay_problems(doc)
    assert any(expected in p for p in problems), problems


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile
# ----------------------------------------------------------------------------------------------------------------


def dockerfile_args(text: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"^ARG (\w+)=(\S*)\s*$", text, re.M)}


def test_dockerfile_pins_match_pyproject_and_installed_ray():
    text = DOCKERFILE.read_text()
    args = dockerfile_args(text)
    pins = pyproject_pins()
    assert args["RAY_VERSION"] == pins["ray"] == RAY_VERSION
    assert args["GYMNASIUM_VERSION"] == pins["gymnasium"] == "1.2.2"
    torch_version = re.search(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)[1]
    assert args["TORCH_VERSION"] == torch_version
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu\s*$", text, re.M)
    assert re.search(r"^ENV MUJOCO_GL=egl\b", text, re.M)
    assert '"torch==${TORCH_VERSION}"' in text
    assert '"ray[default,tune,rllib]==${RAY_VERSION}"' in text and '"gymnasium==${GYMNASIUM_VERSION}"' in text
    # torch before everything that could pull another build of it.
    assert text.index('pip install "torch==') < text.index('pip install "ray[')


def test_dockerfile_copies_what_the_package_build_needs():
    copied = " ".join(re.findall(r"^COPY .*$", DOCKERFILE.read_text(), re.M))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for needed in ("pyproject.toml", project["readme"], "qam_ray", "experiments"):
        assert needed in copied


# ----------------------------------------------------------------------------------------------------------------
# .rayignore
# ----------------------------------------------------------------------------------------------------------------


def test_rayignore_keeps_data_out_and_the_package_in(tmp_path):
    """Apply .rayignore with the filter Ray uses for `--working-dir` uploads to a fake repo tree."""
    from ray._private.runtime_env.packaging import _dir_travel

    (tmp_path / ".rayignore").write_text((REPO / ".rayignore").read_text())
    kept = [
        "qam_ray/__init__.py",
        "qam_ray/data/replay.py",  # a bare "data/" pattern would drop this
        "qam_ray/data/qam_published_results.csv",
        "experiments/sweep.py",
        "results/benchmark_cpu.json",
        "cluster/README.md",
        "pyproject.toml",
    ]
    dropped = [
        ".venv/bin/python",
        "data/ogbench/cube-double-play-v0.npz",
        "data/ogbench/puzzle-4x4-play-100m-v0/shard-000.npz",
        "runs/quickstart/metrics.csv",
        "results/sweep.tmp",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        "mlartifacts/1/model.pt",
        "qam_ray/__pycache__/domains.cpython-311.pyc",
        ".git/HEAD",
    ]
    for rel in kept + dropped:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")

    uploaded = set()
    _dir_travel(
        tmp_path,
        [],
        lambda p: uploaded.add(p.relative_to(tmp_path).as_posix()) if p.is_file() else None,
        include_gitignore=False,
    )
    assert set(kept) <= uploaded
    assert not uploaded & set(dropped), sorted(uploaded & set(dropped))
