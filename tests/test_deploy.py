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
KUBERAY = DEPLOY / "kuberay"


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
    cluster = {doc["kind"]: doc for doc in _documents(KUBERAY / "raycluster-ft.yaml")}
    redis = {doc["kind"]: doc for doc in _documents(KUBERAY / "redis.yaml")}
    assert cluster["RayCluster"]["spec"]["gcsFaultToleranceOptions"]["redisAddress"] == "redis:6379"
    assert redis["Service"]["metadata"]["name"] == "redis" and "--appendonly" in str(redis["StatefulSet"])
    # a password from the Secret on both sides, and the append-only file on a volume
    password = {"secretKeyRef": {"name": "redis-password", "key": "password"}}
    assert cluster["RayCluster"]["spec"]["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"] == password
    server = redis["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    assert "--requirepass" in server["args"] and {"name": "data", "mountPath": "/data"} in server["volumeMounts"]
    # the Secret is created once by hand (applying the files again must not reset a password Redis still holds)
    assert not [doc for doc in _kuberay_documents() if doc["kind"] == "Secret"]
    assert "kubectl create secret generic redis-password" in (KUBERAY / "redis.yaml").read_text()
    # nothing runs on the head, so reward replicas and actors outlive its restart
    assert cluster["RayCluster"]["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def _kuberay_documents():
    return [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in _documents(path)]


def _ray_clusters():
    """(name, RayCluster spec, the labels every one of its pods carries) of each RayCluster and RayJob."""
    for doc in _kuberay_documents():
        if doc["kind"] == "RayCluster":
            yield doc["metadata"]["name"], doc["spec"], {"ray.io/cluster": doc["metadata"]["name"]}
        elif doc["kind"] == "RayJob":
            spec = doc["spec"]["rayClusterSpec"]
            # KubeRay names a RayJob's RayCluster itself: its pods are found by the labels their templates set
            templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
            common = set.intersection(*(set(t.get("metadata", {}).get("labels", {}).items()) for t in templates))
            yield doc["metadata"]["name"], spec, dict(common)


def _entrypoint_config(job):
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[3] == "--preset"
    return load_config(argv[4], argv[5:])


def _pod_specs(spec):
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_every_name_a_kuberay_manifest_references_is_defined_or_created_by_hand():
    docs = _kuberay_documents()
    defined = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    text = "\n".join(path.read_text() for path in KUBERAY.glob("*.yaml")) + (DEPLOY / "README.md").read_text()
    secrets = {node["secretKeyRef"]["name"] for node in _walk(docs) if "secretKeyRef" in node}
    claims = {node["persistentVolumeClaim"]["claimName"] for node in _walk(docs) if "persistentVolumeClaim" in node}
    hosts = {cluster["gcsFaultToleranceOptions"]["redisAddress"].split(":")[0]
             for _, cluster, _ in _ray_clusters() if "gcsFaultToleranceOptions" in cluster}
    for doc in docs:
        if doc["kind"] == "RayJob":  # store.url=redis://HOST:PORT/DB
            hosts.add(_entrypoint_config(doc).store.url.split("//")[1].split(":")[0])
    assert secrets == {"redis-password"} and claims == {"dmdr-runs"} and hosts == {"redis"}
    for secret in secrets:  # a Secret in a manifest would be reset by every apply: created by hand, documented
        assert ("Secret", secret) in defined or f"kubectl create secret generic {secret} " in text, secret
    for claim in claims:
        assert ("PersistentVolumeClaim", claim) in defined, claim
    for host in hosts:
        assert ("Service", host) in defined, host


def test_the_deploy_readme_applies_what_the_ray_manifests_need_first():
    readme = (DEPLOY / "README.md").read_text()
    applied = [line.split("deploy/kuberay/")[1].split()[0] for line in readme.splitlines()
               if line.startswith("kubectl apply -f deploy/kuberay/")]
    assert sorted(applied) == sorted(path.name for path in KUBERAY.glob("*.yaml"))
    secret = readme.index("kubectl create secret generic redis-password")
    assert secret < readme.index("kubectl apply -f deploy/kuberay/redis.yaml")
    for first in ("redis.yaml", "pvc.yaml", "networkpolicy.yaml"):
        for then in ("rayjob.yaml", "raycluster-ft.yaml"):
            assert applied.index(first) < applied.index(then), (first, then)


def test_every_ray_pod_mounts_the_shared_runs_volume_at_output_dir():
    claims = {doc["metadata"]["name"]: doc for doc in _kuberay_documents() if doc["kind"] == "PersistentVolumeClaim"}
    for name, cluster, _ in _ray_clusters():
        for group, pod in _pod_specs(cluster):
            mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            assert "/runs" in mounts, (name, group)
            claim = volumes[mounts["/runs"]]["persistentVolumeClaim"]["claimName"]
            # learner rank 0 writes output.dir from any pod: one claim that pods on several nodes mount at once
            assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"], claim
            assert pod["securityContext"]["fsGroup"] == 100, (name, group)  # the image's gid
    for doc in _kuberay_documents():
        if doc["kind"] == "RayJob":
            assert _entrypoint_config(doc).output_dir.is_relative_to("/runs")


def test_gpu_workers_start_only_when_the_entrypoint_asks_for_gpus():
    for doc in _kuberay_documents():
        if doc["kind"] != "RayJob":
            continue
        cfg = _entrypoint_config(doc)
        gpus = cfg.ray.learner_gpus + cfg.ray.rollout_gpus + sum(
            spec.serve.num_gpus for spec in cfg.rewards if spec.placement == "serve")
        gpu_pods = sum(g["replicas"] for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                       if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"]))
        assert (gpu_pods > 0) == (gpus > 0), (gpus, gpu_pods)


def test_the_ray_head_is_reached_only_by_its_cluster_the_operator_and_labelled_clients():
    policies = [doc for doc in _kuberay_documents() if doc["kind"] == "NetworkPolicy"]
    for name, cluster, labels in _ray_clusters():
        assert labels, name  # something to select the cluster's pods by
        assert cluster["authOptions"] == {"mode": "token"}, name
        mine = [p for p in policies if p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
                and p["spec"]["podSelector"].get("matchLabels")]
        assert len(mine) == 1, name
        policy = mine[0]["spec"]
        assert policy["policyTypes"] == ["Ingress"]
        same_cluster, *others = policy["ingress"]
        assert same_cluster == {"from": [{"podSelector": {"matchLabels": policy["podSelector"]["matchLabels"]}}]}
        for rule in others:  # everyone else: the job API and the client port, and only from selected pods
            assert {port["port"] for port in rule["ports"]} <= {8265, 10001}, (name, rule)
            assert all(peer.get("podSelector", {}).get("matchLabels") for peer in rule["from"]), (name, rule)
    redis = [p for p in policies if p["spec"]["podSelector"] == {"matchLabels": {"app": "redis"}}]
    assert len(redis) == 1 and [port["port"] for rule in redis[0]["spec"]["ingress"] for port in rule["ports"]] == [6379]
    # the Ray pods, and KubeRay's Redis-cleanup Job (a copy of the head pod labelled redis-cleanup), which deletes a
    # fault-tolerant cluster's GCS keys when it is deleted: no other pod
    (node_types,) = [expression["values"] for rule in redis[0]["spec"]["ingress"] for peer in rule["from"]
                     for expression in peer["podSelector"]["matchExpressions"] if expression["key"] == "ray.io/node-type"]
    assert sorted(node_types) == ["head", "redis-cleanup", "worker"]


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
    for preset in ("sd3-medium-dmdr", "sd3-medium-dmdr-grpo", "sd35-large-dmdr", "sd3-medium-dmdr-srpo", "sd35-large-dmdr-srpo"):
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
