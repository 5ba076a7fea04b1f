"""Reward models as Ray Serve apps on a local Ray: gradients across the process boundary equal the
in-process ones, a DMDR step is unchanged by the placement, requests are batched and fail alone,
the HTTP endpoint, scaling under load, and errors that name the app."""

import socket
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from dmdr_rl import dmdr  # noqa: E402
from dmdr_rl.config import RewardSpec, load_config  # noqa: E402
from dmdr_rl.trainer import LocalTrainer  # noqa: E402
from reward_servers import RewardInputError, RewardServerError, reward_model  # noqa: E402
from reward_servers import http  # noqa: E402
from reward_servers.models.testing import save_tiny_clip  # noqa: E402
from reward_servers.serve import reward_app, start_reward_apps, stop_reward_apps  # noqa: E402

PROMPTS = ["a large green diamond in the top left", "a red diamond below a purple circle",
           "a small purple triangle in the top right", "a purple triangle right of a green square"]
TINY = ["trainer.batch_size=4", "trainer.cold_start=0", "dmd.ratio=1", "student.steps=2", "output.log_every=1",
        "output.sample_every=1000", "output.checkpoint_every=1000", "trainer.lr_generator=1e-3", "trainer.lr_critic=1e-3"]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


USER_MODULE = ("class Brightness:\n    differentiable = True\n\n    def __init__(self, gain=1.0):\n"
               "        self.gain = gain\n\n    def score(self, images, prompts):\n"
               "        return self.gain * images.mean(dim=(1, 2, 3))\n\n\n"
               "class Raises(Brightness):  # a bug in the model\n"
               "    def score(self, images, prompts):\n"
               "        return 1 / 0\n")


@pytest.fixture(scope="module")
def local_serve(tmp_path_factory):
    # a user's reward module, outside the package, in the job's runtime_env (as `ray job submit --working-dir`)
    module = tmp_path_factory.mktemp("user-code") / "served_user_reward.py"
    module.write_text(USER_MODULE)
    ray.init(num_cpus=4, log_to_driver=False, runtime_env={"py_modules": [str(module)]})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def _run_config(tmp_path, specs, port, extra=()):
    cfg = load_config("toy-dmdr", [*TINY, f"output.dir={tmp_path}", f"ray.http_port={port}", *extra])
    cfg.rewards = list(specs)
    return cfg


def _serve_spec(name, **serve_options):
    return RewardSpec(name=name, weight=0.3, shaping="hinge", margin=-0.05, placement="serve",
                      serve={"num_cpus": 0.5, **serve_options})


def _images(n=4, seed=0):
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["toy-align", "pickscore"])
def test_remote_gradient_equals_the_in_process_gradient(tmp_path, local_serve, tiny_clip_dir, name):
    kwargs = {"path": str(tiny_clip_dir), "processor_path": str(tiny_clip_dir), "local_files_only": True} \
        if name == "pickscore" else {}
    served = _serve_spec(name, max_batch_size=4).model_copy(update={"kwargs": kwargs})
    local = served.model_copy(update={"placement": "local"})
    started = start_reward_apps(_run_config(tmp_path, [served], local_serve))
    try:
        grads, losses = [], []
        for spec in (local, served):
            images = _images().requires_grad_(True)
            loss, _ = dmdr.WeightedReward(reward_model(spec), spec.model_copy(update={"shaping": "linear"})).loss(images, PROMPTS)
            loss.backward()
            grads.append(images.grad)
            losses.append(loss.item())
        assert grads[0].abs().max() > 0
        assert losses[1] == pytest.approx(losses[0], rel=1e-6)
        assert (grads[1] - grads[0]).norm() <= 1e-5 * grads[0].norm()
    finally:
        stop_reward_apps(started)


def test_a_dmdr_step_with_a_served_reward_matches_in_process(tmp_path, local_serve):
    """The same losses and the same generator gradient (what the optimizer then applies) either way.
    Weights after Adam are not compared: Adam's first step is sign(g), which turns float rounding in
    near-zero gradient entries into full-size differences."""
    spec = _serve_spec("toy-align")
    runs = {}
    for placement in ("local", "serve"):
        cfg = _run_config(tmp_path / placement, [spec.model_copy(update={"placement": placement})], local_serve,
                          ["trainer.max_steps=2"])
        started = start_reward_apps(cfg)
        try:
            trainer = LocalTrainer(cfg)
            generator_params = set(trainer.backbone.trainable_parameters(dmdr.GENERATOR))
            gradients = []

            def capture(params):
                if params and params[0] in generator_params:
                    gradients.append(torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]).clone())

            trainer.learner.reduce_gradients = capture
            metrics = [trainer.train_iteration() for _ in range(2)]
        finally:
            stop_reward_apps(started)
        runs[placement] = (metrics, gradients)
    (local_metrics, local_grads), (served_metrics, served_grads) = runs["local"], runs["serve"]
    assert len(local_grads) == len(served_grads) == 2
    for a, b in zip(local_metrics, served_metrics):
        for key in ("loss/generator", "loss/dmd", "loss/reward/toy-align", "reward/toy-align"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    for a, b in zip(local_grads, served_grads):
        assert (b - a).norm() <= 1e-5 * a.norm()


def test_concurrent_requests_are_batched_and_a_bad_request_fails_alone(tmp_path, local_serve):
    spec = _serve_spec("toy-align", max_batch_size=8, batch_wait_timeout_s=0.2)
    started = start_reward_apps(_run_config(tmp_path, [spec], local_serve))
    try:
        handle = serve.get_app_handle(spec.app_name)
        prompts = [PROMPTS] * 5 + [["a red circle"] * 4]  # the last: not the toy grammar, the model raises
        responses = [handle.score.remote(_images(seed=i), p) for i, p in enumerate(prompts)]
        results = []
        for response in responses:
            try:
                results.append(response.result(timeout_s=60))
            except Exception as err:  # noqa: BLE001 - inspected below
                results.append(err)
        assert all(isinstance(r, dict) and r["scores"].shape == (4,) for r in results[:5])
        assert isinstance(results[5], ValueError) and "toy grammar" in str(results[5])
        info = handle.info.remote().result(timeout_s=30)
        assert info["images"] == 20  # the five good requests, each scored once
        assert info["max_batch_images"] > 4  # at least two requests were merged into one model call
    finally:
        stop_reward_apps(started)


def test_http_endpoint_scores_npy_and_png_and_rejects_bad_input(tmp_path, local_serve):
    import io

    import requests
    from PIL import Image

    spec = _serve_spec("toy-align")
    started = start_reward_apps(_run_config(tmp_path, [spec], local_serve))
    url = f"http://127.0.0.1:{local_serve}/{spec.app_name}/score"
    try:
        images = _images()
        expected = serve.get_app_handle(spec.app_name).score.remote(images, PROMPTS).result(timeout_s=60)["scores"]
        answer = http.decode_answer(requests.post(url, json=http.encode_request(images, PROMPTS), timeout=60).json())
        torch.testing.assert_close(answer["scores"], expected)
        answer = http.decode_answer(requests.post(url, json=http.encode_request(images, PROMPTS, grad=True), timeout=60).json())
        assert answer["grads"].shape == images.shape and answer["grads"].abs().sum() > 0
        pngs = []
        for image in (images[:2] * 255).round().to(torch.uint8):
            buffer = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        answer = requests.post(url, json=http.encode_request(None, PROMPTS[:2], png=pngs), timeout=60).json()
        assert len(answer["scores"]) == 2
        bad = requests.post(url, json=http.encode_request(images * 2, PROMPTS), timeout=60)
        assert bad.status_code == 422 and "[0, 1]" in bad.json()["detail"]
        bad = requests.post(url, json=http.encode_request(images, PROMPTS[:3]), timeout=60)
        assert bad.status_code == 422 and "4 images but 3 prompts" in bad.json()["detail"]
        # a prompt the model cannot read is the client's mistake too, not a model failure
        bad = requests.post(url, json=http.encode_request(images[:1], ["a red circle"]), timeout=60)
        assert bad.status_code == 422 and "uses known words but not the toy grammar" in bad.json()["detail"]
        bad = requests.post(url, data=b"not json", timeout=60)
        assert bad.status_code == 422 and "not a score request: body: Invalid JSON" in bad.json()["detail"]
    finally:
        stop_reward_apps(started)
    # a body larger than the pixel limit allows is refused before it is read whole
    small = _serve_spec("toy-align", app="reward-small", http_max_pixels=1024)
    started = start_reward_apps(_run_config(tmp_path, [small], local_serve))
    try:
        limit = http.max_body_bytes(1024)
        big = requests.post(f"http://127.0.0.1:{local_serve}/reward-small/score", data=b"x" * (limit + 1), timeout=60)
        assert big.status_code == 413 and f"larger than {limit:,} bytes" in big.json()["detail"]
    finally:
        stop_reward_apps(started)


def test_scaling_a_reward_app_from_one_to_two_replicas_and_back_during_training_fails_no_request(tmp_path, local_serve):
    spec = _serve_spec("toy-align")
    cfg = _run_config(tmp_path, [spec], local_serve, ["trainer.max_steps=100000"])  # stopped below
    started = start_reward_apps(cfg)
    try:
        trainer = LocalTrainer(cfg)
        client = trainer.learner.rewards[0].model.client
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(summary=trainer.train()), daemon=True)
        thread.start()
        while client.requests < 5 and thread.is_alive():
            time.sleep(0.05)
        before = client.requests
        def scale(replicas: int) -> tuple[int, dict]:
            """Redeploys the app at `replicas` (serve.run returns once they run): the requests made by then, and the
            replicas' states once 10 more were."""
            serve.run(reward_app(spec.model_copy(update={"serve": spec.serve.model_copy(update={"replicas": replicas})})),
                      name=spec.app_name, route_prefix=f"/{spec.app_name}")
            at = client.requests
            while client.requests < at + 10 and thread.is_alive():
                time.sleep(0.05)
            return at, dict(serve.status().applications[spec.app_name].deployments[spec.app_name].replica_states)

        scaled_up_at, up = scale(2)
        scaled_down_at, down = scale(1)  # a replica stops while requests go on (rewards[].serve.shutdown_wait_loop_s)
        trainer.cfg.trainer.max_steps = trainer.generator_step + 1  # end the run
        thread.join(timeout=600)
        assert outcome["summary"]["generator_steps"] >= scaled_down_at
        assert up.get("RUNNING") == 2 and down.get("RUNNING") == 1
        assert before < scaled_up_at < scaled_down_at < client.requests  # requests before, during and after each
        assert client.failed_attempts == 0  # (not even one the client retried)
    finally:
        stop_reward_apps(started)


def test_a_replica_takes_as_many_requests_at_once_as_a_batch_merges():
    for size, expected in ((8, 64), (100, 100)):  # Serve would cap a batch of 100 at the default 64 requests
        app = reward_app(_serve_spec("toy-align", max_batch_size=size))
        assert app._bound_deployment.max_ongoing_requests == expected


def test_a_reward_app_logs_no_line_per_request_unless_asked():
    """Serve's access log writes a line per request: one per rollout and learner step, into the run's console."""
    def logging(quiet: bool, **options):
        config = reward_app(_serve_spec("toy-align", **options), quiet=quiet)._bound_deployment.logging_config
        return config["enable_access_log"], config["log_level"]

    assert logging(quiet=True) == (False, "WARNING")  # a run's own app: nor its replicas' other INFO lines
    assert logging(quiet=True, access_log=True) == (True, "INFO")  # (access log lines are INFO lines)
    assert logging(quiet=False) == (False, "INFO")  # an app deployed alone (serve deploy) logs as Serve does


def test_a_reward_app_tries_a_failing_constructor_as_often_as_configured():
    def tries(**options):
        return reward_app(_serve_spec("toy-align", **options))._bound_deployment._deployment_config.max_constructor_retry_count

    assert tries() == 20  # Serve's own default (which it caps at 3 per replica)
    assert tries(constructor_retries=1) == 1


def test_a_stopping_replica_looks_for_unfinished_requests_as_often_as_configured():
    """Serve's 2 s default would be the least each app a run deletes takes; the client retries a request that
    meets a stopped replica (test_rewards: a dead or stopping replica is a transient error)."""
    def loop_s(**options):
        return reward_app(_serve_spec("toy-align", **options))._bound_deployment._deployment_config.graceful_shutdown_wait_loop_s

    assert loop_s() == 0.2 and loop_s(shutdown_wait_loop_s=1.5) == 1.5


def test_a_running_serve_keeps_its_http_address_and_the_run_says_where_it_is(tmp_path, local_serve, capsys):
    from reward_servers.serve import _http_address

    assert _http_address(_run_config(tmp_path, [], local_serve)) == ("127.0.0.1", local_serve)
    assert capsys.readouterr().out == ""
    other = _run_config(tmp_path, [], local_serve, ["ray.http_host=0.0.0.0", "ray.http_port=8123"])
    assert _http_address(other) == ("127.0.0.1", local_serve)  # serve.start(...) changed nothing: say so
    assert (f"Serve was already running with HTTP on 127.0.0.1:{local_serve}, not ray.http_host:http_port = 0.0.0.0:8123"
            in capsys.readouterr().out)


@pytest.mark.parametrize("runtime_env", [{}, {"env_vars": {"DMDR_TEST_ENV": "1"}}], ids=["job-env", "own-env"])
def test_a_users_reward_class_named_only_in_the_config_is_served(tmp_path, local_serve, runtime_env):
    # the replicas import the class themselves: its module reaches them through the run's runtime_env (a reward
    # app's own runtime_env takes no local paths: the config refuses them, see test_config), also where the app
    # has a runtime_env of its own
    spec = _serve_spec("served_user_reward:Brightness", app="reward-user", runtime_env=runtime_env).model_copy(
        update={"kwargs": {"gain": 2.0}})
    started = start_reward_apps(_run_config(tmp_path, [spec], local_serve))
    try:
        images = _images().requires_grad_(True)
        scores = reward_model(spec).score(images, PROMPTS)
        torch.testing.assert_close(scores.detach(), 2 * images.detach().mean(dim=(1, 2, 3)))
        scores.sum().backward()  # and its gradient comes back through the app
        torch.testing.assert_close(images.grad, torch.full_like(images, 2 / images[0].numel()))
    finally:
        stop_reward_apps(started)


def test_a_missing_app_is_named_in_the_error(tmp_path, local_serve):
    missing = RewardSpec(name="toy-align", placement="serve", serve={"app": "reward-nowhere", "retries": 1,
                                                                       "backoff_s": 0.0, "timeout_s": 5})
    with pytest.raises(RewardServerError, match="reward app 'reward-nowhere' did not answer info"):
        reward_model(missing)
    attached = missing.model_copy(update={"serve": missing.serve.model_copy(update={"attach": True})})
    with pytest.raises(RewardInputError, match="reward app 'reward-nowhere' is not running"):
        start_reward_apps(_run_config(tmp_path, [attached], local_serve))


def test_a_run_neither_replaces_a_running_app_nor_leaves_half_its_apps_behind(tmp_path, local_serve):
    spec = _serve_spec("toy-align")
    serve.run(reward_app(spec), name=spec.app_name, route_prefix=f"/{spec.app_name}")  # e.g. someone's `serve deploy`
    try:
        for _ in range(2):  # the first refusal released its claim on the name: the second is refused the same way
            with pytest.raises(RewardInputError, match=r"'reward-toy-align' already exists \(RUNNING\) and no run holds it: .*"
                                                       r"left over from a run whose driver was killed .* "
                                                       r"rewards.0.serve.attach=true .*serve.delete\('reward-toy-align'\)"):
                start_reward_apps(_run_config(tmp_path, [spec], local_serve))
        assert spec.app_name in serve.status().applications  # still theirs, untouched
        first = _serve_spec("toy-align", app="reward-first")
        missing = RewardSpec(name="toy-align", label="toy-align-2", placement="serve",
                             serve={"app": "reward-missing", "attach": True})
        with pytest.raises(RewardInputError, match="'reward-missing' is not running"):
            start_reward_apps(_run_config(tmp_path, [first, missing], local_serve))
        assert "reward-first" not in serve.status().applications  # started, then stopped again
    finally:
        serve.delete(spec.app_name)


def test_a_start_interrupted_by_ctrl_c_deletes_the_app_it_was_starting(tmp_path, local_serve, monkeypatch):
    """Ctrl-C or SIGTERM (the run's KeyboardInterrupt) while serve.run waits for a slow replica: the app goes with
    the run, not left running with no owner, which would refuse the next run's start."""
    import reward_servers.serve as serving
    from ray.serve.api import _run

    def interrupted(target, name, route_prefix):
        _run(target, name=name, route_prefix=route_prefix, _blocking=False)  # deployed, its replica still starting
        raise KeyboardInterrupt

    spec = _serve_spec("toy-align", app="reward-interrupted")
    monkeypatch.setattr(serving.serve, "run", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            start_reward_apps(_run_config(tmp_path, [spec], local_serve))
        assert "reward-interrupted" not in serve.status().applications
        with pytest.raises(ValueError):  # and the claim on its name is released
            ray.get_actor("reward-app-claim:reward-interrupted", namespace=serving.CLAIMS_NAMESPACE)
    finally:
        serve.delete("reward-interrupted")  # (left behind without the fix)


def test_of_two_runs_starting_an_app_of_one_name_only_one_deploys_it(tmp_path, local_serve):
    """A sweep's jobs start at once: the second's serve.run would replace the first's app in place, and the
    first to end would delete it under the other."""
    from reward_servers.serve import CLAIMS_NAMESPACE, claim_app, release_claims

    spec = _serve_spec("toy-align", app="reward-claimed")
    claim = "reward-app-claim:reward-claimed"
    claim_app("reward-claimed", "rewards.0", "output.dir=/runs/other")  # another run, mid-start
    with pytest.raises(RewardInputError, match=r"'reward-claimed' is being started or served by another run "
                                               r"\(output.dir=/runs/other\)\. .*set rewards.0.serve.attach=true"):
        start_reward_apps(_run_config(tmp_path / "a", [spec], local_serve))
    assert "reward-claimed" not in serve.status().applications
    assert ray.get(ray.get_actor(claim, namespace=CLAIMS_NAMESPACE).describe.remote()) == "output.dir=/runs/other"
    release_claims(["reward-claimed"])  # the other run ends
    started = start_reward_apps(_run_config(tmp_path / "a", [spec], local_serve))
    try:
        with pytest.raises(RewardInputError, match=rf"another run \(output.dir={tmp_path / 'a'}\)"):
            start_reward_apps(_run_config(tmp_path / "b", [spec], local_serve))
        assert "reward-claimed" in serve.status().applications  # the first run's, serving on
    finally:
        stop_reward_apps(started)
    with pytest.raises(ValueError):  # released with the app
        ray.get_actor(claim, namespace=CLAIMS_NAMESPACE)


def test_an_app_that_fails_to_start_says_why_and_is_not_left_behind(tmp_path, local_serve):
    # (one constructor try, not Serve's three: each is a process that loads transformers)
    broken = _serve_spec("pickscore", app="reward-broken", constructor_retries=1).model_copy(
        update={"kwargs": {"path": str(tmp_path / "no-such-model"), "local_files_only": True}})
    for _ in range(2):  # the second start meets no failed app left over from the first
        with pytest.raises(RewardServerError, match=r"reward app 'reward-broken' \(pickscore\) failed to start: .*no-such-model"):
            start_reward_apps(_run_config(tmp_path, [broken], local_serve))
        assert "reward-broken" not in serve.status().applications


@pytest.mark.slow
def test_the_ray_runtime_trains_with_a_served_reward_and_monitors_rollouts(tmp_path, local_serve):
    import json

    from dmdr_rl.distributed import train_distributed

    spec = _serve_spec("toy-align").model_copy(update={"monitor": True})
    cfg = _run_config(tmp_path, [spec], local_serve, ["trainer.max_steps=3", "trainer.backend=ray", "ray.max_staleness=0",
                                                     "output.checkpoint_every=3"])
    summary = train_distributed(cfg)
    assert summary["generator_steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/toy-align" in r and "rollout/reward/toy-align" in r and "time/reward/toy-align_s" in r for r in rows)
    assert spec.app_name not in serve.status().applications  # the run stopped the app it started


@pytest.mark.slow
def test_a_ray_run_whose_reward_cannot_score_ends_at_the_learners_first_try(tmp_path, local_serve, capsys):
    """The learner's start-of-run probe of the rewards finds a model's own failure (here a served one's, which its
    app answers with), which every try would meet again: the run ends with it at once, not after
    ray.same_failure_limit tries (each reloading the model)."""
    from dmdr_rl.distributed import train_distributed
    from dmdr_rl.ledger import Ledger
    from dmdr_rl.store import FileStore

    spec = _serve_spec("served_user_reward:Raises", app="reward-raises", constructor_retries=1)
    cfg = _run_config(tmp_path, [spec], local_serve, ["trainer.backend=ray", "ray.max_failures=5",
                                                     "ray.learner_workers=2", "ray.learner_cpus=0.5"])  # (both ranks end)
    with pytest.raises(RuntimeError, match=r"^the learner failed, and the run ends rather than try again: RewardModelError: "
                                           r"rewards.0 \(served_user_reward:Raises\), scoring two samples before training: "
                                           r"reward app 'reward-raises' failed in score_with_grad\(\): ZeroDivisionError: "
                                           r"division by zero \(at iteration 0, generator step 0; another try would meet it "
                                           r"again\)\. Fix the cause; "):
        train_distributed(cfg)
    assert spec.app_name not in serve.status().applications  # the run deleted the app it started
    events = [e["event"] for e in Ledger(FileStore(tmp_path)).events()]
    assert [e for e in events if e in ("start", "rewind", "learner_failed")] == ["start", "learner_failed"]
    assert "Ray Train started the learners again" not in capsys.readouterr().out  # (no second try, which ended at once)


def test_the_serve_configs_validate_and_a_run_attaches_to_a_deployed_app(tmp_path, local_serve, capsys):
    from pathlib import Path

    import yaml

    from reward_servers.serve import build_app

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    for config_file in ("serve-rewards.yaml", "serve-rewards-paper.yaml"):
        config = yaml.safe_load((deploy / config_file).read_text())
        assert config["http_options"]["host"] == "127.0.0.1"
        for application in config["applications"]:
            assert application["import_path"] == "reward_servers.serve:build_app"
            assert RewardSpec.model_validate(application["args"]).app_name == application["name"], config_file
            build_app(application["args"])  # binds the deployment; the model loads only when deployed
    application = yaml.safe_load((deploy / "serve-rewards.yaml").read_text())["applications"][0]
    serve.run(build_app(application["args"]), name=application["name"], route_prefix=application["route_prefix"])
    try:
        spec = RewardSpec(name="toy-align", weight=0.3, margin=-0.05, placement="serve",
                          serve={"app": application["name"], "attach": True})
        cfg = _run_config(tmp_path, [spec], local_serve, ["trainer.max_steps=1"])
        assert start_reward_apps(cfg) == []  # attached: nothing started, nothing to stop
        assert ("dmdr_rl: reward toy-align: attached to the running app 'reward-toy-align' (1 replica)"
                in capsys.readouterr().out)
        metrics = LocalTrainer(cfg).train_iteration()
        assert metrics["reward/toy-align"] < 0 and metrics["loss/reward/toy-align"] > 0
        wrong = spec.model_copy(update={"name": "hpsv2.1"})  # the config says HPSv2.1, the app serves toy-align
        with pytest.raises(RewardInputError, match=f"rewards.3: the attached app '{application['name']}' serves 'toy-align', "
                                                   r"not 'hpsv2.1': set rewards.3.serve.app .* or rewards.3.name to 'toy-align'"):
            reward_model(wrong, "rewards.3")
    finally:
        serve.delete(application["name"])


def test_a_claim_that_cannot_start_is_not_taken_for_another_runs(monkeypatch):
    """Our own claim actor that does not start (no node has room for it) is removed and its error raised,
    not reported as the app being another run's; a name another run holds is refused with its owner."""
    import reward_servers.serve as serving

    ours = type("Handle", (), {"_actor_id": "ours", "describe": type("M", (), {"remote": lambda self: "ref"})()})()
    theirs = type("Handle", (), {"_actor_id": "theirs", "describe": type("M", (), {"remote": lambda self: "their ref"})()})()
    holder, killed = {"actor": ours}, []

    def get(ref, timeout=None):
        if ref == "their ref":
            return "output.dir=/runs/other"
        raise ray.exceptions.GetTimeoutError("the claim did not start")

    def get_actor(name, namespace=None):
        return holder["actor"]

    monkeypatch.setattr(serving.AppClaim, "options", lambda **_: type("O", (), {"remote": lambda self, owner: ours})())
    monkeypatch.setattr(serving.ray, "get", get)
    monkeypatch.setattr(serving.ray, "get_actor", get_actor)
    monkeypatch.setattr(serving.ray, "kill", killed.append)
    with pytest.raises(ray.exceptions.GetTimeoutError):
        serving.claim_app("reward-x", "rewards.0", "output.dir=/runs/mine")
    assert killed == [ours] and "reward-x" not in serving._HELD_CLAIMS
    holder["actor"] = theirs  # (through Ray Client: ours failed to register, the name is theirs)
    with pytest.raises(RewardInputError, match=r"'reward-x' is being started or served by another run \(output.dir=/runs/other\)"):
        serving.claim_app("reward-x", "rewards.0", "output.dir=/runs/mine")


def test_stopping_the_apps_deletes_each_it_can_releases_every_claim_and_never_raises(monkeypatch, capsys):
    """It runs in the run's `finally`: an app that cannot be deleted must not leave the others behind, keep the
    claims, or replace the run's own error."""
    import reward_servers.serve as serving

    deleted, killed = [], []

    def delete(name):
        deleted.append(name)
        if name == "reward-a":
            raise RuntimeError("the Serve controller did not answer\n(its traceback)")

    def kill(handle):
        killed.append(handle._actor_id)
        if handle._actor_id == "claim-b":
            raise ConnectionError("Ray is shutting down")

    def get_actor(name, namespace=None):  # the claim's name is free
        raise ValueError(name)

    monkeypatch.setattr(serving.serve, "delete", delete)
    monkeypatch.setattr(serving.ray, "kill", kill)
    monkeypatch.setattr(serving.ray, "get_actor", get_actor)
    for app in ("reward-a", "reward-b", "reward-c"):
        monkeypatch.setitem(serving._HELD_CLAIMS, app, type("Claim", (), {"_actor_id": f"claim-{app[-1]}"})())
    stop_reward_apps(["reward-a", "reward-b", "reward-c"])
    assert deleted == ["reward-a", "reward-b", "reward-c"] and killed == ["claim-a", "claim-b", "claim-c"]
    assert not {"reward-a", "reward-b", "reward-c"} & serving._HELD_CLAIMS.keys()
    out = capsys.readouterr().out
    assert ("could not delete reward app 'reward-a' (RuntimeError: the Serve controller did not answer); delete it "
            """with `python -c "from ray import serve; serve.delete('reward-a')"`""") in out
    assert "could not release the claim on reward app name 'reward-b' (ConnectionError: Ray is shutting down)" in out


def test_attaching_says_so_with_the_apps_replicas_and_a_missing_app_says_how_to_deploy_one_of_its_name(monkeypatch):
    """(Without Ray: serve.status() as Serve answers it.)"""
    from types import SimpleNamespace

    import reward_servers.serve as serving

    def app(status, *replica_counts):
        return SimpleNamespace(status=status, deployments={
            f"d{i}": SimpleNamespace(replica_states={"RUNNING": running, "STARTING": 1}) for i, running in enumerate(replica_counts)})

    applications = {"reward-toy-align": app("RUNNING", 2), "reward-rescaling": app("DEPLOYING", 1),
                    "reward-broken": app("DEPLOY_FAILED", 0)}
    monkeypatch.setattr(serving.serve, "status", lambda: SimpleNamespace(applications=applications))
    spec = RewardSpec(name="toy-align", placement="serve", serve={"attach": True})
    assert serving.attached_line(spec, serving._require_running(spec.app_name, "rewards.0")) == (
        "dmdr_rl: reward toy-align: attached to the running app 'reward-toy-align' (2 replicas)")
    rescaling = RewardSpec(name="toy-align", label="mine", placement="serve", serve={"app": "reward-rescaling", "attach": True})
    assert serving.attached_line(rescaling, serving._require_running("reward-rescaling", "rewards.1")) == (
        "dmdr_rl: reward mine: attached to the running app 'reward-rescaling' (1 replica; the app is DEPLOYING)")
    with pytest.raises(RewardInputError, match=(
            r"reward app 'reward-nowhere' is not running, and rewards.2.serve.attach is true; running apps: reward-toy-align, "
            r"reward-rescaling, reward-broken. Deploy a Serve config with an application named 'reward-nowhere' \(`serve "
            r"deploy CONFIG.yaml`; deploy/serve-rewards.yaml is an example, whose app is 'reward-toy-align'\), or set "
            r"rewards.2.serve.attach=false to let the run start it")):
        serving._require_running("reward-nowhere", "rewards.2")
    with pytest.raises(RewardInputError, match=r"'reward-broken' is not running \(it is DEPLOY_FAILED\)"):
        serving._require_running("reward-broken", "rewards.0")
