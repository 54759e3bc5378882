"""Offline checks of the cluster definitions in ``clusters/`` and the pipeline they are made for.

No cloud SDK, no network, no Ray instance. The cluster-launcher YAMLs go through Ray's own code path of ``ray up``
up to the first cloud call: ``prepare_config`` (merges the provider's packaged ``defaults.yaml``, merges
``setup_commands`` into the head/worker lists, fills per-node-type min/max workers; for aws and gcp it only reads
files) and ``validate_config`` (``ray-schema.json`` plus the head-type and max-workers checks). What ``ray up`` does
next needs the cloud: filling node resources from EC2 instance types (boto3, network) and the provider bootstrap
(key pairs, subnets, IAM). Hence the node types here declare their resources instead of relying on detection.

The KubeRay manifests go through ``_derive_autoscaling_config_from_ray_cr``, the function the KubeRay autoscaler
runs on the RayCluster it fetches: it reads each group's Ray resources (``rayStartParams``, container limits) the way
the autoscaler does, and ends with the same ``validate_config``.
"""
from __future__ import annotations

import ast
import copy
import functools
import math
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from raydet.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
KUBERAY = CLUSTERS / "kuberay"
PIPELINE = ROOT / "pipelines" / "cluster" / "faster_rcnn_r50_fpn_1x_coco_gpu_cluster.yaml"
LAUNCHERS = {"aws-gpu.yaml": "aws", "gcp-gpu.yaml": "gcp"}   # file -> provider type
CLUSTER_NAMES = [*LAUNCHERS, "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
SHARED = "/mnt/shared"   # where every node of every cluster mounts the dataset and the run directories
STANDARD = {"CPU", "GPU", "memory", "object_store_memory"}
# GPUs per EC2 instance type, for the types a cluster file may use (add a row when using a new type).
EC2_GPUS = {"g4dn.xlarge": 1, "g4dn.2xlarge": 1, "g4dn.12xlarge": 4, "g5.xlarge": 1, "g5.2xlarge": 1,
            "g5.12xlarge": 4, "g5.48xlarge": 8, "g6.xlarge": 1, "g6e.xlarge": 1, "p3.2xlarge": 1, "p3.16xlarge": 8,
            "p4d.24xlarge": 8, "p5.48xlarge": 8}


# ------------------------------------------------------------------------------------------------------ loading
@functools.lru_cache(maxsize=None)
def _read(relpath: str):
    with open(CLUSTERS / relpath, encoding="utf-8") as f:
        return yaml.safe_load(f)


def raw(relpath: str) -> dict:
    """The file as written (a fresh copy: tests may mutate it)."""
    return copy.deepcopy(_read(relpath))


def launcher_validated(config: dict) -> dict:
    """What ``ray up`` validates offline: defaults merged, then Ray's schema and consistency checks."""
    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def kuberay_validated(spec: dict, name: str = "raydet") -> dict:
    """The autoscaling config the KubeRay autoscaler derives from a RayCluster spec (validated by Ray inside)."""
    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name, "namespace": "default"},
          "spec": spec}
    return _derive_autoscaling_config_from_ray_cr(copy.deepcopy(cr))


def ray_cluster_spec(relpath: str) -> dict:
    doc = raw(relpath)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@functools.lru_cache(maxsize=None)
def _autoscaling(relpath: str) -> dict:
    if relpath in LAUNCHERS:
        return launcher_validated(raw(relpath))
    return kuberay_validated(ray_cluster_spec(relpath))


def autoscaling(relpath: str) -> dict:
    """Validated autoscaler view of any of the cluster definitions: node types with their Ray resources."""
    return copy.deepcopy(_autoscaling(relpath))


def worker_types(config: dict) -> dict:
    return {name: nt for name, nt in config["available_node_types"].items() if name != config["head_node_type"]}


@functools.lru_cache(maxsize=None)
def _pipeline_scaling(path: str) -> dict:
    return dict(load_config(path).get("scaling"))


def scaling(path=PIPELINE) -> dict:
    return copy.deepcopy(_pipeline_scaling(str(path)))


def all_containers(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


# ------------------------------------------------------------------------------------------ Ray's own validators
@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launcher_config_passes_rays_validator(name):
    config = raw(name)
    prepared = launcher_validated(config)
    assert prepared["provider"]["type"] == LAUNCHERS[name]
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    for node_type in worker_types(prepared).values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= prepared["max_workers"]
    # prepare_config merges the packaged defaults.yaml with a shallow dict.update: any command list left out would
    # silently come from the defaults (e.g. installing a nightly Ray wheel). Every one must be ours.
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "file_mounts", "auth"):
        assert key in config, f"clusters/{name}: {key} is not set; Ray would use its defaults.yaml value"


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_spec_passes_rays_autoscaler_parsing(name):
    config = autoscaling(name)
    spec = ray_cluster_spec(name)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(worker_types(config)) == set(groups)
    for group_name, node_type in worker_types(config).items():
        assert node_type["max_workers"] == groups[group_name]["maxReplicas"] > 0
    assert spec["enableInTreeAutoscaling"] is True


def _unknown_top_level_key(c):
    c["gpu_nodes"] = 8


def _fractional_node_resource(c):
    c["available_node_types"]["gpu_g5"]["resources"]["gpu_node"] = 0.5


def _misspelled_node_type_key(c):
    c["available_node_types"]["cpu_m5"]["resource"] = c["available_node_types"]["cpu_m5"].pop("resources")


def _missing_head_type(c):
    c["head_node_type"] = "no_such_type"


def _min_workers_above_global_max(c):
    c["available_node_types"]["gpu_g5"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("break_it, error", [
    (_unknown_top_level_key, jsonschema.ValidationError),
    (_fractional_node_resource, jsonschema.ValidationError),
    (_misspelled_node_type_key, jsonschema.ValidationError),
    (_missing_head_type, ValueError),
    (_min_workers_above_global_max, ValueError),
], ids=lambda v: getattr(v, "__name__", "").strip("_"))
def test_launcher_validator_rejects_broken_config(break_it, error):
    config = raw("aws-gpu.yaml")
    launcher_validated(copy.deepcopy(config))   # the unbroken file passes the very same call
    break_it(config)
    with pytest.raises(error):
        launcher_validated(config)


@pytest.mark.parametrize("value", [
    '"{\\"gpu_node\\": 0.5}"',   # fractional: a node declares whole units
    '{"gpu_node": 1}',          # missing the outer quotes KubeRay needs to pass it through `ray start`
], ids=["fractional", "unquoted"])
def test_kuberay_parsing_rejects_bad_custom_resources(value):
    spec = ray_cluster_spec("kuberay/raycluster.yaml")
    kuberay_validated(copy.deepcopy(spec))
    gpu_group = next(g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in str(g))
    gpu_group["rayStartParams"]["resources"] = value
    with pytest.raises((AssertionError, ValueError)):
        kuberay_validated(spec)


# ------------------------------------------------------------------------------------------------ node types
@pytest.mark.parametrize("name", CLUSTER_NAMES)
def test_gpu_node_types_declare_gpu_node_per_gpu(name):
    config = autoscaling(name)
    gpu_types = {n: t for n, t in worker_types(config).items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, f"{name}: no GPU node type"
    assert any(t["max_workers"] > 0 for t in gpu_types.values())
    for type_name, node_type in gpu_types.items():
        res = node_type["resources"]
        assert isinstance(res["GPU"], int) and isinstance(res.get("gpu_node"), int), (name, type_name, res)
        # one unit per GPU: every GPU gets one training worker, none gets two
        assert res["gpu_node"] == res["GPU"], (name, type_name, res)
        assert "cpu_node" not in res, f"{name}: {type_name} would take decode actors off the CPU-only nodes"


@pytest.mark.parametrize("name", CLUSTER_NAMES)
def test_cpu_only_node_type_declares_cpu_node(name):
    config = autoscaling(name)
    cpu_types = {n: t for n, t in worker_types(config).items() if "cpu_node" in t["resources"]}
    assert cpu_types, f"{name}: no node type declares cpu_node"
    for type_name, node_type in cpu_types.items():
        res = node_type["resources"]
        assert isinstance(res["cpu_node"], int) and res["cpu_node"] >= 1, (name, type_name, res)
        assert res.get("GPU", 0) == 0 and "gpu_node" not in res, (name, type_name, res)
        assert res["CPU"] >= 1 and node_type["max_workers"] > 0, (name, type_name, node_type)


@pytest.mark.parametrize("name", CLUSTER_NAMES)
def test_head_takes_no_training_or_decoding(name):
    config = autoscaling(name)
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    assert head.get("CPU") == 0 and head.get("GPU", 0) == 0, head
    assert not set(head) - STANDARD, f"{name}: the head declares custom resources {set(head) - STANDARD}"


def test_aws_gpu_counts_match_instance_types():
    for type_name, node_type in raw("aws-gpu.yaml")["available_node_types"].items():
        instance = node_type["node_config"]["InstanceType"]
        gpus = node_type["resources"].get("GPU", 0)
        if gpus or instance.split(".")[0][0] in "gp":
            assert instance in EC2_GPUS, f"{type_name}: add {instance} to EC2_GPUS"
            assert gpus == EC2_GPUS[instance], f"{type_name}: {instance} has {EC2_GPUS[instance]} GPUs, not {gpus}"


def test_gcp_node_types_are_fully_declared():
    # GCP reports no machine resources to Ray: CPU (and GPU) must be declared; GPU VMs need accelerators attached
    # and onHostMaintenance TERMINATE (they cannot live-migrate).
    config = raw("gcp-gpu.yaml")
    assert isinstance(config["provider"].get("project_id"), str) and config["provider"]["project_id"]
    for type_name, node_type in config["available_node_types"].items():
        res, node_config = node_type["resources"], node_type["node_config"]
        assert isinstance(res.get("CPU"), int), f"{type_name}: declare CPU"
        accelerators = node_config.get("guestAccelerators", [])
        assert sum(a["acceleratorCount"] for a in accelerators) == res.get("GPU", 0), type_name
        if accelerators:
            assert all(a["acceleratorType"].startswith("nvidia-") for a in accelerators)
            assert {"onHostMaintenance": "TERMINATE"} in node_config.get("scheduling", []), type_name


# ------------------------------------------------------------------------------------------- setup and start
@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launcher_setup_installs_raydet_into_the_path_of_ray(name):
    config = raw(name)
    # the repository is synced to the nodes...
    remote = {remote for remote, local in config["file_mounts"].items()
              if (ROOT / local).resolve() == ROOT and (ROOT / local / "pyproject.toml").is_file()}
    assert remote, f"{name}: file_mounts does not sync the repository root"
    assert 'name = "raydet"' in (ROOT / "pyproject.toml").read_text()
    # ...and installed from there, together with the Ray version of this checkout
    setup = config["setup_commands"]
    installs = [c for c in setup if "pip install" in c and any(re.search(rf"-e\s+{re.escape(r)}(\s|$)", c)
                                                                for r in remote)]
    assert installs, f"{name}: no setup command pip-installs the synced repository"
    assert re.search(r"ray\[default[^\]]*\]==", installs[0])
    # the venv it installs into is first on PATH for every Ray command (and so for a job's `python`)
    venv = re.search(r"--python\s+(\S+)/bin/python", installs[0]).group(1)
    assert any("~/.bashrc" in c and "PATH" in c and venv.replace("~", "$HOME") + "/bin" in c for c in setup)
    # the head's autoscaler needs the provider's SDK
    sdk = {"aws": "boto3", "gcp": "google-api-python-client"}[LAUNCHERS[name]]
    assert any(sdk in c and "install" in c for c in config["head_setup_commands"]), f"{name}: head lacks {sdk}"


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launcher_start_commands(name):
    config = raw(name)
    head = " ; ".join(config["head_start_ray_commands"])
    worker = " ; ".join(config["worker_start_ray_commands"])
    assert re.search(r"\bray start --head\b", head)
    # without it the head runs no autoscaler and the GPU / CPU node types never launch
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert re.search(r"\bray start --address=\$RAY_HEAD_IP:6379\b", worker)
    assert config["head_start_ray_commands"][0].strip() == "ray stop"


# ------------------------------------------------------------------------------------------------- KubeRay
@pytest.mark.parametrize("name, kind", [("kuberay/raycluster.yaml", "RayCluster"), ("kuberay/rayjob.yaml", "RayJob")])
def test_kuberay_manifest_structure(name, kind):
    doc = raw(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = ray_cluster_spec(name)
    containers = all_containers(spec)
    assert {g for g, _ in containers} == {"head"} | {g["groupName"] for g in spec["workerGroupSpecs"]}
    images = {c.get("image") for _, c in containers}
    assert len(images) == 1 and None not in images, f"every Ray container runs the same raydet image: {images}"
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
    # rayStartParams values are passed to `ray start` as strings
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values())


def test_kuberay_groups_request_gpus_and_declare_custom_resources():
    spec = ray_cluster_spec("kuberay/raycluster.yaml")
    derived = worker_types(autoscaling("kuberay/raycluster.yaml"))
    for group in spec["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        gpus = int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        declared = set(derived[group["groupName"]]["resources"]) - STANDARD
        assert "resources" in group["rayStartParams"], group["groupName"]
        if gpus:
            assert declared == {"gpu_node"} and derived[group["groupName"]]["resources"]["GPU"] == gpus
        else:
            assert declared == {"cpu_node"}
    assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
               for g in spec["workerGroupSpecs"])


def test_rayjob_runs_raydet_train_on_the_raycluster_spec():
    job = raw("kuberay/rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "raydet.train"], argv
    assert (ROOT / argv[3]).is_file(), f"entrypoint pipeline {argv[3]} is not in the repository"
    assert (ROOT / argv[3]).resolve() == PIPELINE
    # the relative pipeline path resolves in the job's working_dir: the image's copy of the repository
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    workdir = re.search(r"^WORKDIR\s+(\S+)", (KUBERAY / "Dockerfile").read_text(), re.M).group(1)
    assert runtime_env["working_dir"] == workdir
    assert job["rayClusterSpec"] == raw("kuberay/raycluster.yaml")["spec"], \
        "rayjob.yaml's rayClusterSpec differs from raycluster.yaml's spec"


def test_ray_versions_agree():
    pins = {name: re.search(r"ray\[default[^\]]*\]==([\w.]+)", " ".join(raw(name)["setup_commands"])).group(1)
            for name in LAUNCHERS}
    pins.update({name: ray_cluster_spec(name)["rayVersion"] for name in CLUSTER_NAMES if name.startswith("kuberay")})
    pins["kuberay/Dockerfile"] = re.search(r"^FROM\s+rayproject/ray:([\d.]+)", (KUBERAY / "Dockerfile").read_text(),
                                           re.M).group(1)
    assert len(set(pins.values())) == 1, pins
    # the cluster must run the Ray of the machine that launches it and submits jobs
    assert next(iter(pins.values())).split(".")[:2] == ray.__version__.split(".")[:2], (pins, ray.__version__)


# ------------------------------------------------------------------------------------- storage and pipeline
def test_every_node_mounts_the_shared_storage():
    data = load_config(PIPELINE).data
    for key in ("ann_file", "img_prefix"):
        assert data["data"]["train"][key].startswith(SHARED + "/"), data["data"]["train"][key]
    assert data["work_dir"].startswith(SHARED + "/"), "Ray Train's checkpoints need storage every node sees"
    for name in LAUNCHERS:
        assert any("mount" in c and f" {SHARED}" in c for c in raw(name)["setup_commands"]), name
    pvc = yaml.safe_load((KUBERAY / "pvc.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    for name in CLUSTER_NAMES:
        if not name.startswith("kuberay"):
            continue
        spec = ray_cluster_spec(name)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            claims = {v["name"] for v in pod["volumes"]
                      if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]}
            for container in pod["containers"]:
                assert any(m["mountPath"] == SHARED and m["name"] in claims for m in container["volumeMounts"])


def test_cluster_pipeline_scaling_keys_exist():
    # the pipeline's ScalingSettings, read from the source (importing raydet pulls in torch: seconds)
    tree = ast.parse((ROOT / "raydet" / "commands" / "sections.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ScalingSettings")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    sc = scaling()
    assert set(sc) <= fields, set(sc) - fields
    assert sc["use_gpu"] is True and sc["num_workers"] > 1
    for key in ("resources_per_worker", "data_resources"):
        for resource, amount in sc[key].items():
            assert resource not in STANDARD
            # Ray accepts fractions below 1 and whole numbers above
            assert 0 < amount <= 1 or float(amount).is_integer(), (key, resource, amount)


def _fits(resources: dict, bundle: dict) -> int:
    return min(math.floor(resources.get(k, 0) / v + 1e-9) for k, v in bundle.items() if v > 0)


def _capacity(config: dict, bundle: dict) -> int:
    """How many bundles the cluster holds at full scale (the head counts once)."""
    head = config["head_node_type"]
    return sum((1 if name == head else nt["max_workers"]) * _fits(nt["resources"], bundle)
               for name, nt in config["available_node_types"].items())


@pytest.mark.parametrize("name", CLUSTER_NAMES)
def test_cluster_declares_and_fits_the_pipelines_placement(name):
    pipeline = PIPELINE
    if name == "kuberay/rayjob.yaml":
        pipeline = ROOT / shlex.split(raw(name)["spec"]["entrypoint"])[3]
    sc = scaling(pipeline)
    config = autoscaling(name)
    declared = {r for nt in config["available_node_types"].values() for r in nt["resources"]}
    wanted = set(sc.get("resources_per_worker") or {}) | set(sc.get("data_resources") or {})
    assert wanted, "the cluster pipeline places nothing by custom resource"
    assert wanted <= declared, f"{name} declares none of {wanted - declared}"
    # Ray Train's per-worker bundle (raydet.train.scaling_config) and the decode actors' (raydet.data.ray_data)
    worker = {"CPU": sc["cpus_per_worker"], **sc["resources_per_worker"]}
    if sc["use_gpu"]:
        worker["GPU"] = sc["gpus_per_worker"]
    actor = {"CPU": sc["data_cpus_per_actor"], **sc["data_resources"]}
    # fully scaled up, the cluster holds every training worker and each one's minimum of decode actors; otherwise
    # the run waits forever for nodes the autoscaler may not add
    assert _capacity(config, worker) >= sc["num_workers"], (name, worker)
    assert _capacity(config, actor) >= sc["num_workers"] * sc["data_actors"][0], (name, actor)
    # and the custom resources keep each kind of task on its kind of node
    for type_name, nt in config["available_node_types"].items():
        if _fits(nt["resources"], worker) and nt["max_workers"]:
            assert nt["resources"].get("GPU", 0) > 0, (name, type_name)
        if _fits(nt["resources"], actor) and nt["max_workers"]:
            assert nt["resources"].get("GPU", 0) == 0, (name, type_name)


# ------------------------------------------------------------------------------------------ where runs go
WORK_ROOT = "/mnt/shared/raydet_runs"


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launcher_nodes_put_relative_work_dirs_on_the_shared_mount(name):
    """Every `ray start` (head and workers) exports RAYDET_WORK_ROOT on the mount that every node has, so a job's
    relative work_dir resolves to shared, persistent storage (not the job's package folder)."""
    from raydet.workspace import WORK_ROOT_ENV

    config = raw(name)
    setup = " ; ".join(config["setup_commands"])
    assert "/mnt/shared" in setup and "mount" in setup  # the mount the root lies on
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert re.search(rf"export {WORK_ROOT_ENV}={re.escape(WORK_ROOT)};\s*ray start", start), (key, start)


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_pods_put_relative_work_dirs_on_the_shared_volume(name):
    from raydet.workspace import WORK_ROOT_ENV

    for group, container in all_containers(ray_cluster_spec(name)):
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert env.get(WORK_ROOT_ENV) == WORK_ROOT, group
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert any(WORK_ROOT.startswith(m + "/") for m in mounts), (group, mounts)
