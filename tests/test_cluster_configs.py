"""Static checks of the cluster configs in cluster/ (no network, no Ray cluster, no Kubernetes).

- The cluster-launcher YAML is validated with Ray's own code and schema: defaults filled in first
  (``prepare_config``; a partial YAML fails ``validate_config`` with a misleading version-mismatch error), then
  ``validate_config`` (jsonschema against ray/autoscaler/ray-schema.json).  A misspelt field must be rejected.
- No KubeRay CRD schema is available offline, so ``kuberay_problems`` checks the fields that matter for these
  sweeps one by one; mutated manifests show that each check can fail.
- The Dockerfile and the launcher pin the versions that pyproject.toml, the Makefile and the installed Ray use.
- MLflow's basic auth: the launcher's head and kuberay/mlflow-server.yaml run `mlflow server --app-name basic-auth`
  with its secret key and admin from a private file / a Secret, the same auth settings (default_permission that
  lets nobody write what it was not granted), and the Ray pods and nodes get the sweep user from a Secret / the
  environment of `ray start`, never from a literal or a runtime_env.  No password or secret key is written in any
  of these files.  tests/test_mlflow_auth.py runs the launcher's MLflow commands and the ConfigMap's auth config.
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
MLFLOW_SERVER = CLUSTER / "kuberay" / "mlflow-server.yaml"
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


def load_yaml_docs(path: Path) -> list:
    with open(path) as f:
        return [doc for doc in yaml.load_all(f, Loader=_StrictLoader) if doc is not None]


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
    # The head's tracking server runs MLflow's basic-auth app: the install must bring it (pyproject's mlflow[auth]).
    assert "mlflow.server.auth" in commands and "flask_wtf" in commands


# MLflow's basic auth (cluster/README.md §3).  The secrets: what must never be written into a config file.
SECRET_NAMES = ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD")
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
AUTH_ENV = "/data/mlflow/auth.env"  # the server's secret key and admin: read by the server only
SWEEPS_ENV = "/data/mlflow/sweeps.env"  # the sweep user: read into the environment of `ray start` on every node
# default_permission is what a logged-in user gets on what it neither owns nor was granted: neither of these lets
# it write there.  (Requests without valid credentials get 401 whatever it says.)
SAFE_DEFAULT_PERMISSIONS = {"READ", "NO_PERMISSIONS"}


def launcher_mlflow_commands(config: dict) -> list[str]:
    """The head commands that concern MLflow, in order: write auth.env, write basic_auth.ini, start the server
    (tests/test_mlflow_auth.py runs them)."""
    commands = [c for c in config.get("head_start_ray_commands", []) if "/data/mlflow" in c and "ray start" not in c]
    assert len(commands) == 3, commands
    return commands


def launcher_auth_ini(config: dict) -> tuple[str, str]:
    """(the basic_auth.ini text that the head writes, the path it writes it to)."""
    match = re.fullmatch(r"printf '([^']*)'\s*>\s*(\S+)", launcher_mlflow_commands(config)[1])
    assert match, launcher_mlflow_commands(config)[1]
    return match[1].replace("\\n", "\n"), match[2]


def secret_literal_problems(text: str, where: str) -> list[str]:
    """``NAME=value`` / ``NAME: value`` with a written-out value for any secret; a value that the text generates
    (``{secrets.token_...}``) or expands (``$VAR``) is fine."""
    problems = []
    for name in SECRET_NAMES:
        for match in re.finditer(rf"{name}\s*[=:]\s*(\S*)", text):
            if not re.match(r"(\{secrets\.token_\w+\(\d+\)\}|\$)", match[1]):
                problems.append(f"{where}: {name} is given a literal value ({match[0][:60]!r})")
    return problems


def auth_ini_problems(text: str, where: str) -> list[str]:
    import configparser

    ini = configparser.ConfigParser()
    ini.read_string(text)
    if "mlflow" not in ini:
        return [f"{where}: basic_auth.ini needs an [mlflow] section"]
    problems = []
    permission = ini["mlflow"].get("default_permission")
    if permission not in SAFE_DEFAULT_PERMISSIONS:
        problems.append(f"{where}: default_permission {permission!r} lets users write what they were not granted; "
                        f"use one of {sorted(SAFE_DEFAULT_PERMISSIONS)}")
    database = ini["mlflow"].get("database_uri", "")
    if not (database.startswith("sqlite:////") or database.split(":", 1)[0] in ("postgresql", "mysql")):
        problems.append(f"{where}: database_uri {database!r} must be absolute (sqlite:////...) or a database server")
    for key in ("admin_password", "admin_username"):
        if ini["mlflow"].get(key):
            problems.append(f"{where}: {key} belongs in the private file / Secret, not in basic_auth.ini")
    return problems


def launcher_mlflow_problems(config: dict, text: str) -> list[str]:
    """``text``: the YAML file as written (comments included: no secret belongs there either)."""
    problems = secret_literal_problems(text, "launcher")
    try:
        write_env, write_ini, start = launcher_mlflow_commands(config)
        ini_text, ini_path = launcher_auth_ini(config)
    except AssertionError as error:
        return problems + [f"launcher: the head's MLflow commands are not the expected three: {error}"]
    if not re.search(rf"umask 077\b.*> ?{re.escape(AUTH_ENV)}", write_env) or f"chmod 600 {AUTH_ENV}" not in write_env:
        problems.append(f"launcher: {AUTH_ENV} must be created with umask 077 and kept at chmod 600")
    problems += auth_ini_problems(ini_text, "launcher")
    argv = start[start.find("mlflow server"):].split()
    if "mlflow server" not in start or not any(argv[i:i + 2] == ["--app-name", "basic-auth"] for i in range(len(argv))):
        problems.append("launcher: the head's `mlflow server` must run with --app-name basic-auth")
    before = start[:start.find("mlflow server")]
    if not re.search(rf"set -a && \. {re.escape(AUTH_ENV)} && set \+a", before):
        problems.append(f"launcher: the server must read its secret key and admin from {AUTH_ENV} (set -a; . file)")
    if f"MLFLOW_AUTH_CONFIG_PATH={ini_path}" not in before:
        problems.append(f"launcher: the server needs MLFLOW_AUTH_CONFIG_PATH={ini_path} (the ini the head writes)")
    if "-e MLFLOW_" in " ".join(config.get("docker", {}).get("run_options", [])):
        problems.append("launcher: no MLflow variable in docker run_options (docker inspect shows them)")
    # Every node's Ray starts with the sweep user in its environment: the raylet hands it to the job driver and to
    # every trial, with nothing in the job's runtime_env (whose env_vars Ray's runtime-env agent logs).
    source = f"if [ -f {SWEEPS_ENV} ]; then set -a; . {SWEEPS_ENV}; set +a; fi;"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config.get(key, []) if "ray start" in c]
        if not starts or not all(source in c and c.index(source) < c.index("ray start") for c in starts):
            problems.append(f"launcher: {key}: `ray start` must run with {SWEEPS_ENV} read first ({source!r})")
    if AUTH_ENV in " ".join(c for key in ("head_start_ray_commands", "worker_start_ray_commands")
                              for c in config.get(key, []) if "ray start" in c):
        problems.append(f"launcher: {AUTH_ENV} (the admin) must not reach Ray's environment, only the server's")
    return problems


def test_launcher_runs_mlflow_with_basic_auth_and_no_secret_in_the_file():
    assert launcher_mlflow_problems(load_yaml(LAUNCHER), LAUNCHER.read_text()) == []


def _edit_head_command(marker: str, change):
    """A mutation that rewrites the head command containing ``marker``; the YAML text stays as it is."""
    def mutate(config: dict, text: str) -> str:
        commands = config["head_start_ray_commands"]
        index = next(i for i, c in enumerate(commands) if marker in c)
        commands[index] = change(commands[index])
        return text
    return mutate


def _add_run_option_with_password(config: dict, text: str) -> str:
    config["docker"]["run_options"].append("-e MLFLOW_TRACKING_PASSWORD=abc")
    return text.replace("    - -e MUJOCO_GL=egl", "    - -e MUJOCO_GL=egl\n    - -e MLFLOW_TRACKING_PASSWORD=abc")


def _inline_admin_password(config: dict, text: str) -> str:
    _edit_head_command("mlflow server", lambda s: s.replace(f"set -a && . {AUTH_ENV} && set +a",
                                                            "MLFLOW_AUTH_ADMIN_PASSWORD=hunter2hunter2"))(config, text)
    return text.replace(f"set -a && . {AUTH_ENV} && set +a", "MLFLOW_AUTH_ADMIN_PASSWORD=hunter2hunter2")


def _drop_sweeps_env_from_workers(config: dict, text: str) -> str:
    config["worker_start_ray_commands"] = [re.sub(r"if \[ -f .*?fi;", "", c)
                                           for c in config["worker_start_ray_commands"]]
    return text


# name -> (mutation of (config, its text) returning the new text, what the problem must say)
LAUNCHER_AUTH_MUTATIONS = {
    "no-basic-auth": (_edit_head_command("mlflow server", lambda s: s.replace("--app-name basic-auth ", "")),
                      "--app-name basic-auth"),
    "admin-password-inline": (_inline_admin_password, "MLFLOW_AUTH_ADMIN_PASSWORD is given a literal value"),
    "tracking-password-in-run-options": (_add_run_option_with_password, "no MLflow variable in docker run_options"),
    "secret-key-inline": (lambda c, t: t.replace("={secrets.token_hex(32)}", "=0123456789abcdef"),
                          "MLFLOW_FLASK_SERVER_SECRET_KEY is given a literal value"),
    "password-in-a-comment": (lambda c, t: t + "\n# MLFLOW_TRACKING_PASSWORD: s3cret-s3cret\n",
                              "MLFLOW_TRACKING_PASSWORD is given a literal value"),
    "default-permission-edit": (
        _edit_head_command("printf '[mlflow]", lambda s: s.replace("default_permission = READ",
                                                                   "default_permission = EDIT")),
        "default_permission 'EDIT'"),
    "admin-password-in-ini": (
        _edit_head_command("printf '[mlflow]", lambda s: s.replace("\\ndatabase_uri",
                                                                   "\\nadmin_password = x\\ndatabase_uri")),
        "admin_password belongs"),
    "relative-auth-db": (
        _edit_head_command("printf '[mlflow]", lambda s: s.replace("sqlite:////data/mlflow/", "sqlite:///")),
        "database_uri"),
    "auth-env-not-private": (_edit_head_command("auth.env.new", lambda s: s.replace(f"; chmod 600 {AUTH_ENV}", "")),
                             "chmod 600"),
    "no-config-path": (_edit_head_command("mlflow server", lambda s: s.replace("MLFLOW_AUTH_CONFIG_PATH=", "X=")),
                       "MLFLOW_AUTH_CONFIG_PATH"),
    "workers-without-the-sweep-user": (_drop_sweeps_env_from_workers, "worker_start_ray_commands"),
    "admin-in-rays-environment": (_edit_head_command("ray start", lambda s: s.replace(SWEEPS_ENV, AUTH_ENV)),
                                  "must not reach Ray's environment"),
}


@pytest.mark.parametrize("mutation", sorted(LAUNCHER_AUTH_MUTATIONS))
def test_launcher_auth_checker_catches_mistakes(mutation):
    mutate, expected = LAUNCHER_AUTH_MUTATIONS[mutation]
    config = load_yaml(LAUNCHER)
    text = mutate(config, LAUNCHER.read_text())
    problems = launcher_mlflow_problems(config, text)
    assert any(expected in p for p in problems), problems


# ----------------------------------------------------------------------------------------------------------------
# KubeRay
# ----------------------------------------------------------------------------------------------------------------


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


SECRET_LIKE = re.compile(r"PASSWORD|SECRET|TOKEN")


def _secret_ref(container: dict, name: str) -> tuple[str, str] | None:
    """(Secret name, key) that env ``name`` of ``container`` comes from; None unless it is a required secretKeyRef."""
    for entry in container.get("env", []):
        if entry["name"] == name:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if "value" in entry or not ref or ref.get("optional") or not ref.get("name") or not ref.get("key"):
                return None
            return ref["name"], ref["key"]
    return None


def _env_secret_problems(pod_spec: dict, where: str) -> list[str]:
    """No container of the pod gets a password, secret key or token as a literal ``value``."""
    return [f"{where}: env {e['name']} of container {c.get('name')!r} is a literal; take it from a Secret "
            "(valueFrom.secretKeyRef)"
            for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", [])
            for e in c.get("env", []) if SECRET_LIKE.search(e["name"]) and "value" in e]


def _credential_problems(container: dict, where: str) -> tuple[list[str], set]:
    """The MLflow sweep user comes from a required Secret; returns (problems, the (Secret, key) pairs used)."""
    problems, refs = [], set()
    for name in CREDENTIALS:
        ref = _secret_ref(container, name)
        if ref is None:
            problems.append(f"{where}: env {name} must come from a Secret (valueFrom.secretKeyRef, not optional)")
        else:
            refs.add((name, *ref))
    return problems, refs


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
    elif "@" in env["MLFLOW_TRACKING_URI"]:
        problems.append(f"{where}: MLFLOW_TRACKING_URI must not carry credentials (the trials log the URI)")
    problems += _credential_problems(ray_container, where)[0] + _env_secret_problems(pod_spec, where)
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
    head_refs = _credential_problems((head_pod.get("containers") or [{}])[0], "")[1]

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
        refs = _credential_problems((pod.get("containers") or [{}])[0], "")[1]
        if refs and head_refs and refs != head_refs:  # the trials and the driver must log as the same user
            problems.append(f"{name}: MLflow credentials from {sorted(refs)}, not the same Secret as the head's "
                            f"{sorted(head_refs)}")
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
    # The runtime env is stored in plain text in the RayJob and in the job's info (`ray job list` shows it).
    leaked = sorted(k for k in env_vars if SECRET_LIKE.search(k) or k in CREDENTIALS)
    if leaked:
        problems.append(f"RayJob: runtimeEnvYAML env_vars must not hold credentials ({leaked}); the pods get them "
                        "from a Secret")
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


def _head_container(doc):
    return _head_spec(doc)["template"]["spec"]["containers"][0]


def _env_entry(container, name):
    return next(e for e in container["env"] if e["name"] == name)


def _set_env(container, name, source: dict):
    entry = _env_entry(container, name)
    entry.pop("value", None)
    entry.pop("valueFrom", None)
    entry.update(source)


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
    "mlflow-password-literal": (
        lambda d: _set_env(_gpu_container(d), "MLFLOW_TRACKING_PASSWORD", {"value": "s3cret-s3cret"}),
        "env MLFLOW_TRACKING_PASSWORD must come from a Secret"),
    "mlflow-user-missing": (
        lambda d: _head_container(d).update(env=[e for e in _head_container(d)["env"]
                                                 if e["name"] != "MLFLOW_TRACKING_USERNAME"]),
        "head: env MLFLOW_TRACKING_USERNAME must come from a Secret"),
    "mlflow-secret-optional": (
        lambda d: _env_entry(_gpu_container(d), "MLFLOW_TRACKING_PASSWORD")["valueFrom"]["secretKeyRef"].update(
            optional=True),
        "env MLFLOW_TRACKING_PASSWORD must come from a Secret"),
    "mlflow-secret-differs": (
        lambda d: _env_entry(_gpu_container(d), "MLFLOW_TRACKING_PASSWORD")["valueFrom"]["secretKeyRef"].update(
            name="other-secret"),
        "not the same Secret as the head's"),
    "token-literal": (lambda d: _head_container(d)["env"].append({"name": "RAY_AUTH_TOKEN", "value": "abc"}),
                      "env RAY_AUTH_TOKEN of container 'ray-head' is a literal"),
    "credentials-in-uri": (
        lambda d: _set_env(_gpu_container(d), "MLFLOW_TRACKING_URI", {"value": "http://u:p@mlflow:5000"}),
        "must not carry credentials"),
}

RAYJOB_MUTATIONS = {
    "no-shutdown": (lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes"),
    "other-script": (lambda d: d["spec"].update(entrypoint="python experiments/train.py"), "sweep.py"),
    "no-storage-path": (
        lambda d: d["spec"].update(entrypoint="python experiments/sweep.py --dataset-dir /data/ogbench"),
        "--storage-path",
    ),
    "no-working-dir": (lambda d: d["spec"].update(runtimeEnvYAML="env_vars: {MUJOCO_GL: egl}"), "working_dir"),
    "password-in-runtime-env": (
        lambda d: d["spec"].update(runtimeEnvYAML=d["spec"]["runtimeEnvYAML"].replace(
            "  MUJOCO_GL: egl", "  MUJOCO_GL: egl\n  MLFLOW_TRACKING_PASSWORD: s3cret-s3cret")),
        "must not hold credentials"),
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
# The MLflow server for KubeRay (kuberay/mlflow-server.yaml)
# ----------------------------------------------------------------------------------------------------------------

SERVER_SECRETS = ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD")


def _docs_by_kind(docs: list) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for doc in docs:
        kinds.setdefault(doc.get("kind"), []).append(doc)
    return kinds


def configmap_auth_ini(docs: list | None = None) -> str:
    """The basic_auth.ini of the server's ConfigMap, the file its MLFLOW_AUTH_CONFIG_PATH names."""
    docs = load_yaml_docs(MLFLOW_SERVER) if docs is None else docs
    kinds = _docs_by_kind(docs)
    (deployment,) = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    path = _env(container)["MLFLOW_AUTH_CONFIG_PATH"]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = next(c for c in kinds["ConfigMap"] if c["metadata"]["name"] == volume["configMap"]["name"])
    return configmap["data"][path[len(mount["mountPath"].rstrip("/")) + 1:]]


def _persistent_path(pod: dict, container: dict, path: str) -> bool:
    """Whether ``path`` lies on a PersistentVolumeClaim mounted into ``container``."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return any(path.startswith(m["mountPath"].rstrip("/") + "/")
               and "persistentVolumeClaim" in volumes.get(m["name"], {}) for m in container.get("volumeMounts", []))


def mlflow_server_problems(docs: list, tracking_uri: str, ray_image: str) -> list[str]:
    """The manifests of the tracking server that ``tracking_uri`` (the Ray pods' MLFLOW_TRACKING_URI) names."""
    import urllib.parse

    kinds = _docs_by_kind(docs)
    problems = []
    if "Secret" in kinds:
        problems.append("mlflow-server: no Secret in a file that is in git; create it from a private file (README §3)")
    if len(kinds.get("Deployment", [])) != 1 or not kinds.get("Service"):
        return problems + ["mlflow-server: needs one Deployment and its Service"]
    deployment = kinds["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    argv = [*container.get("command", []), *container.get("args", [])]
    if argv[:2] != ["mlflow", "server"]:
        problems.append(f"mlflow-server: the container must run `mlflow server`, not {argv[:2]}")

    def flag(name):
        return argv[argv.index(name) + 1] if name in argv[:-1] else None

    if flag("--app-name") != "basic-auth":
        problems.append("mlflow-server: `mlflow server` must run with --app-name basic-auth")
    refs = set()
    for name in SERVER_SECRETS:
        ref = _secret_ref(container, name)
        if ref is None:
            problems.append(f"mlflow-server: env {name} must come from a Secret (valueFrom.secretKeyRef, not optional)")
        else:
            refs.add(ref[0])
    if len(refs) > 1:
        problems.append(f"mlflow-server: the secret key and the admin come from several Secrets {sorted(refs)}")
    problems += _env_secret_problems(pod, "mlflow-server")
    try:
        ini_text = configmap_auth_ini(docs)
    except (KeyError, StopIteration, ValueError) as error:
        return problems + [f"mlflow-server: MLFLOW_AUTH_CONFIG_PATH must name a key of a mounted ConfigMap ({error!r})"]
    problems += auth_ini_problems(ini_text, "mlflow-server")
    import configparser

    ini = configparser.ConfigParser()
    ini.read_string(ini_text)
    for what, uri in (("the auth database", ini["mlflow"].get("database_uri", "")),
                      ("--backend-store-uri", flag("--backend-store-uri") or "")):
        if uri.startswith("sqlite:///") and not _persistent_path(pod, container, uri[len("sqlite:///"):]):
            problems.append(f"mlflow-server: {what} ({uri}) must be on a PersistentVolumeClaim: users and runs "
                            "would vanish with the pod")
    artifacts = flag("--artifacts-destination") or ""
    if "://" not in artifacts and not _persistent_path(pod, container, artifacts):
        problems.append(f"mlflow-server: --artifacts-destination {artifacts!r} must be on a PersistentVolumeClaim")
    problems += _image_problems(container.get("image", ""), "mlflow-server")
    if container.get("image") != ray_image:  # one image: the server runs the MLflow that the trials use
        problems.append(f"mlflow-server: image {container.get('image')!r} differs from the Ray pods' {ray_image!r}")
    probe = container.get("readinessProbe", {}).get("httpGet", {})
    if probe.get("path") != "/health":
        problems.append("mlflow-server: readinessProbe must GET /health (the one route that needs no login)")

    target = urllib.parse.urlparse(tracking_uri)
    host, _, rest = (target.hostname or "").partition(".")
    namespace = rest.split(".")[0] if rest.endswith("svc.cluster.local") else None
    services = [s for s in kinds["Service"] if s["metadata"]["name"] == host
                and s["metadata"].get("namespace") == namespace]
    if not services:
        problems.append(f"mlflow-server: no Service {host!r} in namespace {namespace!r} for {tracking_uri}")
    else:
        service = services[0]
        ports = service["spec"].get("ports", [])
        if not any(p.get("port") == target.port for p in ports):
            problems.append(f"mlflow-server: Service {host!r} does not expose port {target.port} of {tracking_uri}")
        labels = deployment["spec"]["template"]["metadata"].get("labels", {})
        if not service["spec"].get("selector") or any(labels.get(k) != v for k, v in service["spec"]["selector"].items()):
            problems.append("mlflow-server: the Service's selector does not match the server's pod labels")
        container_ports = {p["containerPort"] for p in container.get("ports", [])}
        if not all(p.get("targetPort", p.get("port")) in container_ports and
                   p.get("targetPort", p.get("port")) == int(flag("--port") or 5000) for p in ports):
            problems.append("mlflow-server: the Service's targetPort must be the server's --port and a containerPort")
    if namespace and deployment["metadata"].get("namespace") != namespace:
        problems.append(f"mlflow-server: the Deployment must be in namespace {namespace!r}")
    allowed = (flag("--allowed-hosts") or "").split(",")
    if f"{target.hostname}:{target.port}" not in allowed:
        problems.append(f"mlflow-server: --allowed-hosts must list {target.hostname}:{target.port}, or MLflow "
                        "refuses the trials' Host header")
    return problems


def _ray_pods_tracking_uri_and_image() -> tuple[str, str]:
    head = _head_container(load_yaml(RAYCLUSTER))
    return _env(head)["MLFLOW_TRACKING_URI"], head["image"]


def test_mlflow_server_runs_basic_auth_with_secrets_from_a_secret():
    docs = load_yaml_docs(MLFLOW_SERVER)
    assert mlflow_server_problems(docs, *_ray_pods_tracking_uri_and_image()) == []
    # Both ways of running the server apply the same auth settings (the database is where each keeps its files).
    import configparser

    launcher, kuberay = configparser.ConfigParser(), configparser.ConfigParser()
    launcher.read_string(launcher_auth_ini(load_yaml(LAUNCHER))[0])
    kuberay.read_string(configmap_auth_ini(docs))
    assert {k: v for k, v in launcher["mlflow"].items() if k != "database_uri"} == {
        k: v for k, v in kuberay["mlflow"].items() if k != "database_uri"}


def test_the_ray_pods_and_the_server_agree_on_the_tracking_uri():
    uris = set()
    for doc in (load_yaml(RAYCLUSTER), load_yaml(RAYJOB)):
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
        uris |= {_env(pod["containers"][0])["MLFLOW_TRACKING_URI"] for pod in pods}
        if doc["kind"] == "RayJob":
            uris.add(yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"])
    assert len(uris) == 1, uris


def _server_container(docs):
    return _docs_by_kind(docs)["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]


def _server_args(docs):
    return _server_container(docs)["args"]


def _replace_arg(docs, old, new):
    args = _server_args(docs)
    args[args.index(old)] = new


def _store_on_emptydir(docs):
    pod = _docs_by_kind(docs)["Deployment"][0]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    volume.pop("persistentVolumeClaim")
    volume["emptyDir"] = {}


def _configmap(docs):
    return _docs_by_kind(docs)["ConfigMap"][0]["data"]


MLFLOW_SERVER_MUTATIONS = {
    "no-basic-auth": (lambda d: [_server_args(d).remove(a) for a in ("--app-name", "basic-auth")],
                      "--app-name basic-auth"),
    "secret-key-literal": (lambda d: _set_env(_server_container(d), "MLFLOW_FLASK_SERVER_SECRET_KEY",
                                              {"value": "0123456789abcdef"}),
                           "env MLFLOW_FLASK_SERVER_SECRET_KEY must come from a Secret"),
    "admin-password-optional": (
        lambda d: _env_entry(_server_container(d), "MLFLOW_AUTH_ADMIN_PASSWORD")["valueFrom"]["secretKeyRef"].update(
            optional=True),
        "env MLFLOW_AUTH_ADMIN_PASSWORD must come from a Secret"),
    "secret-in-git": (lambda d: d.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"},
                                          "stringData": {"MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-s3cret"}}),
                      "no Secret in a file that is in git"),
    "default-permission-edit": (
        lambda d: _configmap(d).update({"basic_auth.ini": _configmap(d)["basic_auth.ini"].replace(
            "default_permission = READ", "default_permission = EDIT")}),
        "default_permission 'EDIT'"),
    "admin-password-in-configmap": (
        lambda d: _configmap(d).update({"basic_auth.ini": _configmap(d)["basic_auth.ini"] + "admin_password = x\n"}),
        "admin_password belongs"),
    "config-path-elsewhere": (
        lambda d: _set_env(_server_container(d), "MLFLOW_AUTH_CONFIG_PATH", {"value": "/etc/other/auth.ini"}),
        "MLFLOW_AUTH_CONFIG_PATH must name a key of a mounted ConfigMap"),
    "auth-db-on-emptydir": (_store_on_emptydir, "the auth database"),
    "service-port": (lambda d: _docs_by_kind(d)["Service"][0]["spec"]["ports"][0].update(port=5001), "port 5000"),
    "service-namespace": (lambda d: _docs_by_kind(d)["Service"][0]["metadata"].update(namespace="default"),
                          "no Service 'mlflow' in namespace 'mlflow'"),
    "allowed-hosts": (lambda d: _replace_arg(d, next(a for a in _server_args(d) if "svc.cluster.local" in a),
                                             "localhost:5000"), "--allowed-hosts"),
    "probe": (lambda d: _server_container(d)["readinessProbe"]["httpGet"].update(path="/"), "/health"),
    "other-image": (lambda d: _server_container(d).update(image="ghcr.io/mlflow/mlflow:v3.0.0"), "differs from"),
}


@pytest.mark.parametrize("mutation", sorted(MLFLOW_SERVER_MUTATIONS))
def test_mlflow_server_checker_catches_mistakes(mutation):
    mutate, expected = MLFLOW_SERVER_MUTATIONS[mutation]
    docs = load_yaml_docs(MLFLOW_SERVER)
    mutate(docs)
    problems = mlflow_server_problems(docs, *_ray_pods_tracking_uri_and_image())
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


def test_dockerfile_installs_mlflows_auth_app():
    """The image's tracking server runs `--app-name basic-auth`, which needs mlflow's [auth] extra (Flask-WTF): it
    comes with the project's own dependencies, and the build's import check fails without it."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"mlflow\[([^\]]*\b)?auth\b", d.replace(" ", "")) for d in deps), deps
    text = DOCKERFILE.read_text()
    assert 'pip install "/home/ray/qam_ray"' in text
    check = re.search(r'python -c "import ([^;]*);', text)[1]
    assert {"flask_wtf", "mlflow.server.auth"} <= {m.strip() for m in check.split(",")}, check


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
