"""Bad input fails fast, before any work starts, with a message saying what to change: a cluster too
small for the config, an unreachable cluster address, a prompt file that is missing, empty or
unreadable."""

import json
import re
import socket

import pytest
import torch

from dmdr_rl.config import ConfigError, RewardSpec, load_config
from dmdr_rl.distributed import check_node_fit, check_reachable, check_resources, resources_needed, train_distributed
from dmdr_rl import run
from dmdr_rl.prompts import PromptSource


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_resources_needed_counts_learners_rollouts_and_started_reward_apps():
    cfg = load_config("toy-dmdr", ["trainer.backend=ray", "ray.learner_workers=2", "ray.rollout_actors=3",
                                   "ray.rollout_cpus=0.5"])
    cfg.rewards = [RewardSpec(name="toy-align", placement="serve", serve={"replicas": 2, "num_cpus": 1, "num_gpus": 0.25}),
                   RewardSpec(name="toy-align", label="toy-align-2", placement="serve", serve={"attach": True, "app": "other"})]
    assert resources_needed(cfg) == (2 * 1 + 3 * 0.5 + 2 * 1, 0.5)
    # the message names only what asks for some: here the first reward app's GPUs, not the learner's or rollouts'
    with pytest.raises(ConfigError, match=r"asks for 0.5 GPUs \(rewards.0.serve.num_gpus=0.25 x 2 replica\(s\)\) but "
                                          r"the cluster has 0: lower those values"):
        check_resources(cfg, {"CPU": 16})
    with pytest.raises(ConfigError, match=r"asks for 5.5 CPUs \(ray.learner_workers=2 x ray.learner_cpus=1, "
                                          r"ray.rollout_actors=3 x ray.rollout_cpus=0.5, rewards.0.serve.num_cpus=1 x 2 "
                                          r"replica\(s\)\) but the cluster has 4"):
        check_resources(cfg, {"CPU": 4, "GPU": 1})
    check_resources(cfg, {"CPU": 6, "GPU": 1})


def test_a_run_that_must_wait_for_busy_resources_says_so(capsys):
    cfg = load_config("toy-dmdr", ["trainer.backend=ray"])
    check_resources(cfg, {"CPU": 2}, {"CPU": 1})  # e.g. a deployed reward app holds the other CPU
    assert "asks for 2 CPUs and 1 of the cluster's 2 are free now" in capsys.readouterr().out
    check_resources(cfg, {"CPU": 2}, {"CPU": 2})
    assert "WARNING" not in capsys.readouterr().out
    # none free: Ray's available_resources() then has no CPU entry at all (seen with reward apps holding both)
    check_resources(cfg, {"CPU": 2}, {"memory": 1e9, "object_store_memory": 1e8})
    assert "asks for 2 CPUs and 0 of the cluster's 2 are free now" in capsys.readouterr().out


def test_too_few_cpus_say_the_fix_for_a_ray_the_run_starts_and_for_one_it_joins():
    cfg = load_config("toy-dmdr", ["trainer.backend=ray", "ray.rollout_actors=2"])
    with pytest.raises(ConfigError, match=r"asks for 3 CPUs .* but the cluster has 2: .*raise ray.local_cpus"):
        check_resources(cfg, {"CPU": 2})
    with pytest.raises(ConfigError, match=r"but the cluster has 2: lower those values, or give the cluster more: add "
                                          r"nodes, or start it with more logical CPUs \(`ray start --head --num-cpus N`"):
        check_resources(cfg, {"CPU": 2}, started_here=False)  # (a submitted job, or a `ray start` cluster joined)


def test_an_unreachable_or_malformed_address_is_refused_before_ray_starts():
    port = _closed_port()
    with pytest.raises(ConfigError, match=rf"ray.address='127.0.0.1:{port}': no Ray cluster answers there"):
        check_reachable(f"127.0.0.1:{port}", "ray.address", timeout_s=2)
    with pytest.raises(ConfigError, match="is not host:port"):
        check_reachable("my-cluster", "RAY_ADDRESS")
    check_reachable("auto", "ray.address")  # resolved by Ray itself
    with pytest.raises(ConfigError, match="no Ray cluster answers there"):  # not mistaken for "local"
        check_reachable(f"localhost:{port}", "ray.address", timeout_s=2)
    with pytest.raises(ConfigError, match="no Ray cluster answers there"):
        check_reachable(f"[::1]:{port}", "ray.address", timeout_s=2)
    # the dashboard's URL (what `ray job submit --address` takes) is not where a run joins
    for refused in (lambda: check_reachable("http://127.0.0.1:8265", "RAY_ADDRESS"),
                    lambda: load_config("toy-dmdr", ["ray.address=http://127.0.0.1:8265"])):
        with pytest.raises(ConfigError, match=r"a URL is not a cluster address: give the host:port `ray start --head` printed"):
            refused()
    # Ray Client would run the driver away from the coordinator's node: submitting the job is the way
    with pytest.raises(ConfigError, match=r"RAY_ADDRESS='ray://head:10001': Ray Client .*ray job submit"):
        check_reachable("ray://head:10001", "RAY_ADDRESS")
    with pytest.raises(ConfigError, match=r"ray.address: .*Ray Client .*ray job submit"):
        load_config("toy-dmdr", ["ray.address=ray://head:10001"])
    # a run trained through Ray Client before: its config.yaml still loads to sample, evaluate and export it
    assert load_config("toy-dmdr", ["ray.address=ray://head:10001"], for_sampling=True).ray.address == "ray://head:10001"


def test_an_http_server_at_the_address_is_refused_as_not_a_cluster():
    """The dashboard's port (8265) accepts the connection, and ray.init would then wait on it for minutes; a
    server that answers a GET with HTTP/2 frames (a GCS) or not at all passes."""
    import http.server
    import threading

    def serve(handler_class):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    class Http2Frames(http.server.BaseHTTPRequestHandler):  # what a GCS sends back: a SETTINGS frame
        def handle(self):
            self.request.sendall(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00")

    dashboard, gcs = serve(Quiet), serve(Http2Frames)
    try:
        with pytest.raises(ConfigError, match=r"an HTTP server answers there, not a Ray cluster .*dashboard, on 8265"):
            check_reachable(f"127.0.0.1:{dashboard.server_address[1]}", "ray.address")
        check_reachable(f"127.0.0.1:{gcs.server_address[1]}", "ray.address")
    finally:
        dashboard.shutdown()
        gcs.shutdown()


def test_an_address_where_ray_init_finds_no_cluster_is_a_config_error(monkeypatch):
    """Something answers at the address but is not a Ray cluster's GCS: ray.init's ConnectionError (after its
    own retries) becomes the run's one-line error, naming the field."""
    import ray

    from dmdr_rl import distributed

    def refuse(**_):
        raise ConnectionError("Could not find any running Ray instance.\nmore lines")

    monkeypatch.setattr(ray, "init", refuse)
    cfg = load_config("toy-dmdr", ["trainer.backend=ray", "ray.address=10.0.0.9:6379"])
    with pytest.raises(ConfigError, match=r"ray.address='10.0.0.9:6379': no Ray cluster could be joined there \(Could not "
                                          r"find any running Ray instance.\): give the address `ray start --head` printed"):
        distributed._join(cfg, "10.0.0.9:6379")


def test_each_learner_rollout_actor_and_reward_replica_must_fit_on_one_node():
    """Totals that hold the run do not place it: a 2-GPU rollout actor never fits on two 1-GPU nodes."""
    cfg = load_config("toy-dmdr", ["trainer.backend=ray", "ray.rollout_gpus=2", "ray.rollout_actors=1"])
    two_small = [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}]
    check_resources(cfg, {"CPU": 16, "GPU": 2})  # the totals are enough
    with pytest.raises(ConfigError, match=r"a rollout actor \(ray.rollout_cpus, ray.rollout_gpus\) asks for 1 CPUs and 2 "
                                          r"GPUs, more than any one node .*the largest: 8 CPUs and 1 GPUs"):
        check_node_fit(cfg, two_small)
    check_node_fit(cfg, [{"CPU": 8, "GPU": 1}, {"CPU": 4, "GPU": 2}])  # one node is large enough
    cfg = load_config("toy-dmdr", ["trainer.backend=ray", "ray.learner_cpus=12"])
    with pytest.raises(ConfigError, match=r"a learner worker .* asks for 12 CPUs"):
        check_node_fit(cfg, two_small)
    cfg = load_config("toy-dmdr", ["rewards.0.placement=serve", "rewards.0.serve.num_gpus=1.5"])  # a local run's app
    with pytest.raises(ConfigError, match=r"a replica of rewards.0 \(rewards.0.serve.num_cpus, num_gpus\) asks for 1 CPUs "
                                          r"and 1.5 GPUs"):
        check_node_fit(cfg, two_small)
    check_node_fit(cfg.model_copy(update={"rewards": []}), two_small)


def test_train_distributed_with_an_unreachable_address_fails_fast(tmp_path):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance is already up in this process")
    cfg = load_config("toy-dmdr", ["trainer.backend=ray", f"ray.address=127.0.0.1:{_closed_port()}",
                                   f"output.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="no Ray cluster answers there"):
        train_distributed(cfg)
    assert not ray.is_initialized()


@pytest.mark.parametrize("content, message", [
    ("", "contains no prompts"),
    ("\n   \n", "contains no prompts"),
    (b"\xff\xfe\x00bad", "cannot read"),
])
def test_empty_or_unreadable_prompt_files_say_what_to_do(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ConfigError, match=f"data.prompts: .*{message}"):
        PromptSource(str(path), 0)


def test_missing_files_tables_without_a_prompt_column_and_unknown_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(ConfigError, match="does not exist"):
        PromptSource(str(tmp_path / "nope.txt"), 0)
    pq.write_table(pa.table({"caption": ["a red circle"]}), tmp_path / "p.parquet")
    with pytest.raises(ConfigError, match="no 'prompt' column \\(columns: caption\\)"):
        PromptSource(str(tmp_path / "p.parquet"), 0)
    (tmp_path / "p.csv").write_text("prompt\n")
    with pytest.raises(ConfigError, match="contains no prompts"):
        PromptSource(str(tmp_path / "p.csv"), 0)
    with pytest.raises(ConfigError, match="give toy:held-in, toy:held-out, or a prompt file"):
        PromptSource("laion:aesthetic", 0)


def test_prompt_files_give_seeded_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = [f"a red circle {i}" for i in range(50)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    pq.write_table(pa.table({"prompt": prompts, "id": list(range(50))}), tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text("\n".join(f'{{"prompt": "{p}"}}' for p in prompts) + "\n")
    batches = [PromptSource(str(tmp_path / name), 7).batch(3, 8) for name in ("p.txt", "p.parquet", "p.jsonl")]
    assert batches[0] == batches[1] == batches[2] and set(batches[0]) <= set(prompts)
    assert PromptSource(str(tmp_path / "p.txt"), 7).batch(4, 8) != batches[0]


def test_the_main_job_exits_with_the_message_before_loading_anything(tmp_path, capsys):
    from dmdr_rl.run import main

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "toy-dmdr", f"data.prompts={tmp_path / 'empty.txt'}", f"output.dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    assert "contains no prompts" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_csv_prompt_column_is_text_even_when_its_prompts_look_like_numbers(tmp_path):
    (tmp_path / "years.csv").write_text("prompt,id\n1984,1\n007,2\n")
    assert sorted(PromptSource(str(tmp_path / "years.csv"), 0).prompts) == ["007", "1984"]
    (tmp_path / "other.csv").write_text("caption\n1984\n")
    with pytest.raises(ConfigError, match="no 'prompt' column \\(columns: caption\\)"):
        PromptSource(str(tmp_path / "other.csv"), 0)


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("a red circle\nabc\n".encode("utf-8-sig"))
    assert PromptSource(str(path), 0).prompts == ["a red circle", "abc"]


def test_a_mistyped_toy_split_names_the_field():
    with pytest.raises(ConfigError, match=r"data.prompts: unknown prompt split 'heldin'; allowed: held-in, held-out"):
        PromptSource("toy:heldin", 0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "toy-dmd", "--num-images", "1"], "--num-images must be >= 2"),
        (["--preset", "toy-dmdr", "--dry-run", "rewards.0.name=:Foo"], r"rewards.0.name: reward model ':Foo': cannot import"),
        (["--preset", "toy-dmdr", "--dry-run", "rewards.0.name=toy-algin"], r"rewards.0.name: unknown reward model 'toy-algin'"),
        (["--preset", "toy-dmdr", "--dry-run", "model.backbone=nope"], r"model.backbone: unknown backbone 'nope'"),
        (["--preset", "toy-dmdr", "--dry-run", "model.resolution=64"], r"model.resolution must be 32 for the toy backbone"),
        # a hub model whose files are not here: the SD3 family's geometry (VAE factor 8 x patch 2)
        (["--preset", "sd3-medium-dmdr", "--dry-run", "model.resolution=1000"],
         r"model.resolution=1000 is not a multiple of 16 \(VAE factor 8 x transformer patch size 2\); use e.g. 992 or 1008"),
        (["--preset", "toy-dmd", "--dry-run", "student.lora.targets=[]"], r"student.lora.targets: List should have at least 1 item"),
        (["--preset", "toy-dmd", "--dry-run", "critic.lora.targets=[to_q,nope]"],
         r"critic.lora.targets: LoRA target module\(s\) \['nope'\] do not exist in SD3Transformer2DModel"),
        # a LoRA target the model lacks: one line naming the fields, not a traceback
        (["--preset", "toy-dmd", "student.lora.targets=[nope]", "trainer.max_steps=1", "output.dir=/tmp/dmdr-test-no-target"],
         r"error: LoRA target module\(s\) \['nope'\] of adapter 'generator' do not exist .* student.lora.targets"),
        (["--preset", "toy-dmdr", "--dry-run", "trainer.resume_from=/nonexistent"],
         r"trainer.resume_from=/nonexistent: no trainer checkpoint there"),
        # a model that cannot load: one line naming the fix, not a traceback
        (["--preset", "toy-dmdr", "model.backbone=sd3", "model.path=/nonexistent/sd3", "model.resolution=32",
          "output.dir=/tmp/dmdr-test-no-such-model"], r"^error: model.path='/nonexistent/sd3' is not a directory here"),
    ],
)
def test_the_main_job_refuses_flags_and_plugins_it_cannot_use(argv, message, capsys):
    with pytest.raises(SystemExit) as caught:
        run.main(argv)
    assert caught.value.code == 2 and re.search(message, capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_the_dry_run_of_a_local_run_refuses_a_gpu_this_machine_lacks(capsys):
    with pytest.raises(SystemExit):
        run.main(["--preset", "toy-dmdr", "--dry-run", "trainer.device=cuda"])
    assert "trainer.device=cuda but torch sees no CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_the_dry_run_of_a_ray_run_says_a_local_ray_here_cannot_place_its_gpus(capsys, monkeypatch):
    """The run would refuse it only after starting Ray; a cluster it is given (ray.address) is not this machine."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run.main(["--preset", "toy-dmdr", "--dry-run", "trainer.backend=ray", "ray.rollout_gpus=0.5"])
    assert ("warning: the run asks for 0.5 GPU(s) and this machine has 0: a Ray the run starts here cannot place "
            "them") in capsys.readouterr().out
    for quiet in (["ray.rollout_gpus=0"], ["ray.rollout_gpus=0.5", "ray.address=head:6379"]):
        run.main(["--preset", "toy-dmdr", "--dry-run", "trainer.backend=ray", *quiet])
        assert "this machine has" not in capsys.readouterr().out


def test_the_dry_run_shows_how_the_generator_trains(capsys):
    run.main(["--preset", "toy-dmdr", "--dry-run", "trainer.micro_batch_size=8", "model.gradient_checkpointing=true",
              "student.lora=null", "dmd.weight=0.5", "model.compile=true"])
    assert ("generator full fine-tune, dmd.weight=0.5; batch 32 in micro-batches of 8, gradient checkpointing, "
            "compiled blocks (default; the first steps compile)") in capsys.readouterr().out


def test_the_dry_run_shows_the_rl_stages_batch_and_refuses_one_the_learner_ranks_cannot_share(capsys):
    run.main(["--preset", "toy-dmdr", "--dry-run", "trainer.batch_size_rl=16"])
    assert "; batch 32 (then 16 after the cold start), fp32" in capsys.readouterr().out
    run.main(["--preset", "toy-dmd", "--dry-run", "trainer.batch_size_rl=8"])  # (a cold start as long as the run)
    printed = capsys.readouterr().out
    assert "; batch 32, fp32" in printed and ("warning: trainer.batch_size_rl=8 has no effect: trainer.cold_start=600 >= "
                                              "trainer.max_steps=600") in printed
    with pytest.raises(SystemExit):
        run.main(["--preset", "toy-dmdr", "--dry-run", "trainer.backend=ray", "ray.learner_workers=2", "ray.learner_cpus=0.5",
                  "trainer.batch_size_rl=15"])
    assert ("trainer.batch_size_rl=15 must divide evenly over ray.learner_workers=2 (each rank trains on an equal shard)"
            in capsys.readouterr().err)


def test_the_dry_run_prints_warnings(capsys):
    run.main(["--preset", "toy-dmdr", "--dry-run", "trainer.max_steps=10"])
    assert "warning: trainer.cold_start=300 >= trainer.max_steps=10" in capsys.readouterr().out
    run.main(["--preset", "toy-dmdr", "--dry-run", "critic.samples=step"])
    assert "warning: critic.samples=step with student.sampler=ode: " in capsys.readouterr().out
    run.main(["--preset", "toy-dmdr", "--dry-run", "critic.samples=step", "student.sampler=sde"])
    assert "critic.samples" not in capsys.readouterr().out
    run.main(["--preset", "toy-dmdr", "--dry-run", "rewards.0.placement=serve", "rewards.0.serve.attach=true",
              "rewards.0.max_images_per_call=8"])
    assert "rewards.0.max_images_per_call has no effect on an attached app (reward-toy-align)" in capsys.readouterr().out


def test_the_dry_run_checks_what_a_local_run_would_read(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a purple elephant\na red circle\n")
    (tmp_path / "words.txt").write_text("a red circle left of a blue square\na red circle\n")  # known words, no scene
    for argv, message in (
        ([f"data.prompts={tmp_path / 'p.txt'}"], r"data.prompts: the toy backbone's text encoder cannot take this "
                                                 r"prompt: unknown word\(s\) \['elephant'\]"),
        ([f"data.prompts={tmp_path / 'words.txt'}"], r"data.prompts: the toy-align reward cannot read this prompt: "
                                                     r"prompt 'a red circle' uses known words but not the toy grammar"),
        ([f"data.prompts={tmp_path / 'none.txt'}"], r"data.prompts: .*none.txt does not exist"),
    ):
        with pytest.raises(SystemExit):
            run.main(["--preset", "toy-dmdr", "--dry-run", *argv])
        assert re.search(message, capsys.readouterr().err)
    # a Ray job's driver may run elsewhere (ray job submit): there a missing file is left to the run
    run.main(["--preset", "toy-dmdr", "--dry-run", "trainer.backend=ray", f"data.prompts={tmp_path / 'none.txt'}"])
    assert "not on this machine: checked when the run starts" in capsys.readouterr().out


def test_options_may_come_between_the_overrides(tmp_path, capsys):
    run.main(["--preset", "toy-dmdr", "trainer.max_steps=2", "--dry-run", f"output.dir={tmp_path / 'x'}"])
    out = capsys.readouterr().out
    assert f"outputs: {tmp_path / 'x'}" in out and "2 generator steps" in out


def test_a_prompt_is_one_line_of_text_whatever_the_file_holds(tmp_path):
    """Only a newline ends a .txt prompt (str.splitlines also split at U+0085, U+2028 and form feeds); a quoted
    CSV prompt with a newline stays whole where pyarrow's 1 MiB read blocks would end (a large file); a JSONL
    prompt longer than a block is read; a duplicated or non-text prompt column is refused by name."""
    (tmp_path / "p.txt").write_text("a red circle\x85above a blue square\nsecond\u2028part\r\nlast\n", newline="")
    assert PromptSource(str(tmp_path / "p.txt"), 0).prompts == ["a red circle\x85above a blue square",
                                                                 "second\u2028part", "last"]
    quoted = [f"prompt number {i} line one\nline two of {i}" for i in range(40_000)]  # about 2 MB
    (tmp_path / "big.csv").write_text("prompt\n" + "".join(f'"{p}"\n' for p in quoted))
    assert PromptSource(str(tmp_path / "big.csv"), 0).prompts == quoted
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "red " * 400_000}) + '\n{"prompt": "short"}\n')
    assert [len(p) for p in PromptSource(str(tmp_path / "long.jsonl"), 0).prompts] == [1_599_999, 5]
    (tmp_path / "dup.csv").write_text("prompt,prompt\na,b\n")
    with pytest.raises(ConfigError, match="has 2 'prompt' columns"):
        PromptSource(str(tmp_path / "dup.csv"), 0)
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, column in (("dict", pa.array(["a", "b"]).dictionary_encode()), ("view", pa.array(["a", "b"], pa.string_view()))):
        pq.write_table(pa.table({"prompt": column}), tmp_path / f"{name}.parquet")  # text all the same
        assert PromptSource(str(tmp_path / f"{name}.parquet"), 0).prompts == ["a", "b"]
    (tmp_path / "ints.jsonl").write_text('{"prompt": 1}\n{"prompt": 2}\n')
    with pytest.raises(ConfigError, match="'prompt' column holds int64, not text"):
        PromptSource(str(tmp_path / "ints.jsonl"), 0)


def test_an_output_dir_that_is_a_file_or_under_one_is_refused_before_anything_starts(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    for out, message in ((tmp_path / "prompts.txt", "is a file"),
                         (tmp_path / "prompts.txt" / "run", f"is under {tmp_path / 'prompts.txt'}, which is a file")):
        for dry in (["--dry-run"], []):
            with pytest.raises(SystemExit):
                run.main(["--preset", "toy-dmdr", *dry, "trainer.backend=local", f"output.dir={out}"])
            assert f"error: output.dir={out} {message}, not a directory: choose another output.dir" in capsys.readouterr().err


def test_the_dry_run_counts_a_prompt_files_prompts_and_the_rows_without_one(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle"}\n{"prompt": null}\n{"prompt": " "}\n'
                                      '{"prompt": "a blue square"}\n')
    run.main(["--preset", "toy-dmdr", "--dry-run", f"data.prompts={tmp_path / 'p.jsonl'}", "rewards=[]"])
    assert f"prompts: {tmp_path / 'p.jsonl'} (2 prompts, 2 rows without a prompt left out; checked)" in capsys.readouterr().out
    (tmp_path / "p.txt").write_text("a red circle\n\na blue square\n")  # (blank lines separate, they are not rows)
    run.main(["--preset", "toy-dmdr", "--dry-run", f"data.prompts={tmp_path / 'p.txt'}", "rewards=[]"])
    assert f"prompts: {tmp_path / 'p.txt'} (2 prompts; checked)" in capsys.readouterr().out
