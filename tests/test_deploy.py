"""deploy/: every manifest parses, names modules, presets and files that exist, and its entrypoint
starts (as a dry run) with the config it passes."""

import importlib.util
import shlex
from pathlib import Path

import pytest
import yaml

from dmdr_rl.config import load_config
from dmdr_rl.distributed import check_storage
from dmdr_rl.run import main

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_parses(path):
    assert _documents(path)


def _entrypoints():
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in _documents(path):
            if doc.get("kind") == "RayJob":
                yield path.name, doc["spec"]["entrypoint"]


@pytest.mark.parametrize("name, entrypoint", list(_entrypoints()))
def test_rayjob_entrypoints_start_with_their_config(name, entrypoint, capsys):
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and importlib.util.find_spec(argv[2]) is not None
    assert argv[2] == "dmdr_rl.run"
    main([*argv[3:], "--dry-run"])
    assert "the config is valid; nothing was started" in capsys.readouterr().out
    # these clusters have several nodes: the start's node check must pass too, and the outputs must outlive a pod
    assert argv[3] == "--preset"
    cfg = load_config(argv[4], argv[5:])
    check_storage(cfg, nodes=3)
    assert cfg.output_dir.is_absolute() and not str(cfg.output_dir).startswith("/tmp")


def test_the_dry_run_refuses_what_a_real_start_would():
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "toy-dmdr", "--dry-run", "rewards.0.name=missing_module:Reward"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):  # two NCCL ranks could be packed onto one GPU
        main(["--preset", "toy-dmdr", "--dry-run", "trainer.backend=ray", "ray.learner_workers=2", "ray.learner_gpus=0.5"])


def test_one_learner_may_share_a_gpu_with_the_rollout_actors(capsys):
    main(["--preset", "toy-dmdr", "--dry-run", "trainer.backend=ray", "ray.learner_gpus=0.5", "ray.rollout_gpus=0.5"])
    assert "the config is valid; nothing was started" in capsys.readouterr().out


def test_the_fault_tolerant_cluster_points_gcs_at_its_redis():
    docs = {doc["kind"]: doc for doc in _documents(DEPLOY / "kuberay" / "raycluster-ft.yaml")}
    assert docs["RayCluster"]["spec"]["gcsFaultToleranceOptions"]["redisAddress"] == "redis:6379"
    assert docs["Service"]["metadata"]["name"] == "redis" and "--appendonly" in str(docs["StatefulSet"])
    # a password from the Secret on both sides, and the append-only file on a volume
    password = {"secretKeyRef": {"name": "redis-password", "key": "password"}}
    assert docs["RayCluster"]["spec"]["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"] == password
    redis = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    assert "--requirepass" in redis["args"] and {"name": "data", "mountPath": "/data"} in redis["volumeMounts"]
    # the Secret is created once by hand (applying the file again must not reset a password Redis still holds)
    assert "Secret" not in docs and "kubectl create secret generic redis-password" in (DEPLOY / "kuberay" / "raycluster-ft.yaml").read_text()
    # nothing runs on the head, so reward replicas and actors outlive its restart
    assert docs["RayCluster"]["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_the_image_and_the_launcher_install_the_pinned_dependencies():
    dockerfile = (DEPLOY / "Dockerfile").read_text().splitlines()
    for line in dockerfile:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    assert any("requirements-lock.txt" in line and line.startswith("RUN pip install") for line in dockerfile)
    launcher = _documents(DEPLOY / "cluster" / "cluster-launcher.yaml")[0]
    assert any("requirements-lock.txt" in command for command in launcher["setup_commands"])
    # the job API stays on the head's loopback (reached through `ray dashboard`'s SSH tunnel), and the
    # start commands use the environment's own ray (a bare `ray` is not on the PATH of a fresh node)
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    assert all(".venv/bin/ray " in command for command in starts)
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    # the head runs the autoscaler (else min_workers starts nothing), which drives EC2 through boto3, and a
    # submitted job's `python` is the environment's
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head and "export PATH=/home/ubuntu/dmdr_rl/.venv/bin:" in head
    assert any("pip install boto3" in command for command in launcher["setup_commands"])
    assert ".venv" in launcher["rsync_exclude"]


def test_the_rayjob_has_a_head_and_a_gpu_worker_group_and_ships_the_code():
    job = _documents(DEPLOY / "kuberay" / "rayjob.yaml")[0]
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] >= 1 and "headGroupSpec" in job["spec"]["rayClusterSpec"]
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == "/app"
    assert "WORKDIR /app" in (DEPLOY / "Dockerfile").read_text()
    # the image's processes do not run as root: a USER after the last step that installs anything
    steps = [line.split()[0] for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")]
    users = [i for i, step in enumerate(steps) if step == "USER"]
    assert users and users[-1] > max(i for i, step in enumerate(steps) if step in ("RUN", "COPY"))
    assert "USER root" not in (DEPLOY / "Dockerfile").read_text()
    # and a pod that mounts a volume the run writes makes it that user's group's (else root-owned on most disks)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["volumeMounts"] and head["securityContext"]["fsGroup"] == 100


def test_the_paper_serve_config_serves_every_reward_of_the_paper_presets():
    from dmdr_rl.config import load_config

    apps = {app["name"] for app in _documents(DEPLOY / "serve-rewards-paper.yaml")[0]["applications"]}
    for preset in ("sd3-medium-dmdr", "sd3-medium-dmdr-grpo", "sd35-large-dmdr"):
        served = {spec.app_name for spec in load_config(preset).rewards if spec.placement == "serve"}
        assert served and served <= apps, (preset, served - apps)


def test_a_cluster_of_several_nodes_needs_shared_checkpoint_storage(capsys):
    from dmdr_rl.config import ConfigError, load_config
    from dmdr_rl.distributed import check_storage

    cfg = load_config("toy-dmdr", ["trainer.backend=ray"])
    check_storage(cfg, 1)  # one node: <output.dir>/ray_train is fine
    with pytest.raises(ConfigError, match="3 nodes.*set ray.storage_path .*store.url"):
        check_storage(cfg, 3)
    check_storage(load_config("toy-dmdr", ["trainer.backend=ray", "ray.storage_path=s3://bucket/dmdr"]), 3)
    assert "no store.url" in capsys.readouterr().out
    check_storage(load_config("toy-dmdr", ["trainer.backend=local"]), 3)  # no Ray Train, nothing to store
