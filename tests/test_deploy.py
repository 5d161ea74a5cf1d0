"""deploy/ holds what runs fairsweep on a GPU cluster; nothing here can build an image or start a cluster, so
these tests check what can be checked: the files parse, agree with each other and with the repository (the
pip target, the commands, the sweep file, the Ray version pyproject allows), the ray up config passes Ray's
own schema, and the token, the GPUs and the shared storage are where they must be."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from functools import lru_cache

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import REPO

DEPLOY = REPO / "deploy"


@lru_cache(maxsize=1)
def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _ray_bound() -> Requirement:
    (req,) = [Requirement(d) for d in _pyproject()["project"]["dependencies"] if Requirement(d).name == "ray"]
    return req


@lru_cache(maxsize=1)
def _rayjob() -> tuple[dict, dict[str, dict]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "rayjob.yaml").read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, [d.get("kind") for d in docs]
    claims = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    return jobs[0], claims


@lru_cache(maxsize=1)
def _cli_help() -> str:
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "launch", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _pods(job: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of the head, every worker group and the submitter."""
    spec = job["spec"]
    pods = [("head", spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"])]
    pods += [(f"worker group {g['groupName']}", g["template"]["spec"]) for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    return pods + [("submitter", spec["submitterPodTemplate"]["spec"])]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ----------------------------------------------------------------------------------------- RayJob


def test_rayjob_is_a_kuberay_v1_job_running_fairsweep_launch_on_a_repository_sweep() -> None:
    job, _ = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"]
    assert "fairsweep launch" in entry
    argv = shlex.split(entry.split("&&")[-1])
    assert argv[:2] == ["fairsweep", "launch"]
    sweep = REPO / argv[2]
    assert sweep.is_file(), f"the entrypoint's sweep {argv[2]} is not in the repository"
    flags = {a.split("=", 1)[0] for a in argv[3:] if a.startswith("--")}
    assert {"--storage", "--tracking-uri"} <= flags
    unknown = [f for f in flags if f not in _cli_help()]
    assert not unknown, f"flags fairsweep launch does not take: {unknown}"
    assert argv[argv.index("--tracking-uri") + 1].startswith("http://")  # a server: only the driver writes it


def test_rayjob_shares_one_storage_path_on_every_pod_and_the_sweeps_data_is_mounted() -> None:
    job, claims = _rayjob()
    argv = shlex.split(job["spec"]["entrypoint"].split("&&")[-1])
    storage = argv[argv.index("--storage") + 1]
    data_root = yaml.safe_load((REPO / argv[2]).read_text())["dataset"]["options"].get("root")
    for where, pod in _pods(job)[:-1]:  # the submitter only runs `ray job submit`
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
        for path in (storage, data_root):
            owner = [m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
            assert owner, f"{where}: {path} is on no mounted volume (mounts: {sorted(mounts)})"
            claim = mounts[owner[0]].get("persistentVolumeClaim", {}).get("claimName")
            assert claim in claims, f"{where}: {path} is not on a PersistentVolumeClaim defined in rayjob.yaml"
            assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], f"{claim} must be shared by every node"


def test_rayjob_workers_ask_for_gpus_and_the_head_runs_only_the_driver() -> None:
    job, _ = _rayjob()
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        res = container["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
        assert res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == res["limits"]["nvidia.com/gpu"]
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"


def test_rayjob_takes_the_ray_token_from_a_secret_on_every_pod() -> None:
    job, _ = _rayjob()
    secrets = set()
    for where, pod in _pods(job):
        for container in pod["containers"]:
            env = _env(container)
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
            token = env.get("RAY_AUTH_TOKEN", {})
            assert "value" not in token, f"{where}: a literal token in the manifest"
            ref = token.get("valueFrom", {}).get("secretKeyRef")
            assert ref and ref.get("name") and ref.get("key"), f"{where}: RAY_AUTH_TOKEN must come from a Secret"
            secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1, f"every pod must read the same token: {secrets}"


def test_rayjob_ray_version_and_images_match_pyproject_and_each_other() -> None:
    job, _ = _rayjob()
    assert _ray_bound().specifier.contains(job["spec"]["rayClusterSpec"]["rayVersion"])
    images = {c["image"] for _, pod in _pods(job) for c in pod["containers"]}
    assert len(images) == 1, images  # the submitter runs the same Ray as the cluster


# ----------------------------------------------------------------------------------------- ray up


@lru_cache(maxsize=1)
def _cluster() -> dict:
    return yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())


def test_ray_up_config_passes_rays_own_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_cluster()))  # raises on an unknown key or a wrong type
    bad = {**_cluster(), "availble_node_types": {}}
    with pytest.raises(Exception):
        validate_config(prepare_config(bad))


def test_ray_up_config_has_a_cpu_head_and_a_gpu_worker_type() -> None:
    cfg = _cluster()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [name for name, t in types.items() if name != cfg["head_node_type"] and (
        t.get("resources", {}).get("GPU", 0) > 0
        or re.match(r"^(g4|g5|g6|p3|p4|p5)", t["node_config"].get("InstanceType", "")))]
    assert gpu_types, "no GPU worker node type"
    assert all(types[t]["max_workers"] >= 1 for t in gpu_types)
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])
    assert all("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)


def test_ray_up_config_enables_token_auth_and_mounts_shared_storage_in_the_container() -> None:
    cfg = _cluster()
    options = " ".join(cfg["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in options
    token_path = re.search(r"--env RAY_AUTH_TOKEN_PATH=(\S+)", options).group(1)
    assert token_path in cfg["file_mounts"], "the token file Ray reads must be copied to every node"
    assert "--volume /shared:/shared" in options
    assert any("/shared" in c and "mount" in c for c in cfg["initialization_commands"])
    job, _ = _rayjob()
    assert cfg["docker"]["image"] == {c["image"] for _, p in _pods(job) for c in p["containers"]}.pop()


# ----------------------------------------------------------------------------------------- images


def _dockerfile(name: str) -> tuple[str, list[str]]:
    text = (DEPLOY / name).read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return text, lines


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_copy_what_exists_and_install_this_package(name: str) -> None:
    text, lines = _dockerfile(name)
    for line in lines:
        if line.startswith("COPY"):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            for src in parts[:-1]:
                assert (REPO / src).exists(), f"{name}: COPY {src} is not in the repository"
    pip = [ln for ln in lines if "pip install" in ln]
    assert pip and re.search(r"pip install (--\S+ \S+ )*\.( |$)", pip[0]), f"{name}: no `pip install .`: {pip}"
    assert "fairsweep" in _pyproject()["project"]["scripts"]
    for cmd in re.findall(r"(?<![/\w])fairsweep ([a-z]+)", " ".join(ln for ln in lines if ln.startswith(("RUN", "CMD")))):
        assert re.search(rf"\b{cmd}\b", _cli_top_help()), f"{name}: `fairsweep {cmd}` is not a command"
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore  # the context is the repository root


@lru_cache(maxsize=1)
def _cli_top_help() -> str:
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_base_images_have_the_python_and_ray_pyproject_allows() -> None:
    requires = _pyproject()["project"]["requires-python"]
    _, cpu = _dockerfile("Dockerfile")
    (base,) = [ln.split()[1] for ln in cpu if ln.startswith("FROM")]
    assert re.fullmatch(r"python:3\.\d+-slim", base)
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(requires).contains(base.split(":")[1].split("-")[0] + ".0")
    _, gpu = _dockerfile("Dockerfile.gpu")
    default = re.search(r"ARG RAY_IMAGE=(\S+)", "\n".join(gpu)).group(1)
    assert [ln for ln in gpu if ln.startswith("FROM")] == ["FROM ${RAY_IMAGE}"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu", default)
    assert m, default
    assert _ray_bound().specifier.contains(m.group(1)), f"{default} is outside pyproject's {_ray_bound()}"
    assert SpecifierSet(requires).contains(f"3.{m.group(2)}.0")
    assert Version(m.group(1)).release[:2] == (2, 60)  # the build's own check (`startswith('2.60.')`) agrees
