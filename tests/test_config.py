import re

import pytest

from dmdr_rl.config import ConfigError, RunConfig, available_presets, load_config


def test_presets_exist_and_validate():
    assert {"toy-dmd", "toy-dmdr", "toy-rl-only"} <= set(available_presets())
    for preset in available_presets():
        assert isinstance(load_config(preset), RunConfig)
    assert load_config("toy-rl-only").dmd.weight == 0
    assert load_config("toy-dmdr").rewards[0].name == "toy-align"


def test_the_paper_presets_carry_the_reference_hyperparameters():
    medium, large = load_config("sd3-medium-dmdr"), load_config("sd35-large-dmdr")
    assert (medium.model.backbone, medium.student.steps, medium.student.shift, medium.dmd.real_cfg) == ("sd3", 4, 3.0, 7.0)
    assert (medium.student.lora.rank, medium.student.lora.alpha, medium.critic.lora.rank) == (64, 128, 32)
    assert (medium.trainer.cold_start, medium.dmd.dynamic_steps, medium.dmd.ratio) == (2000, 2000, 5)
    assert (medium.trainer.lr_generator, medium.trainer.lr_critic) == (1e-6, 5e-7)
    assert (medium.trainer.lr_generator_rl, medium.trainer.lr_critic_rl) == (5e-7, 2e-7)
    assert (medium.trainer.weight_decay_generator, medium.trainer.weight_decay_critic) == (0.01, 0.0)  # the paper's code
    assert medium.model.kwargs == large.model.kwargs == {"max_sequence_length": 128}  # the paper's code's T5 length
    assert load_config("flux-dev-dmdr").model.kwargs == {"guidance": 3.5, "max_sequence_length": 512}  # FLUX.1's own
    assert [(r.name, r.weight) for r in medium.rewards] == [("open-clip-score", 0.3), ("hpsv2.1", 0.3)]
    for preset in (medium, large, load_config("sd3-medium-dmdr-grpo")):  # the paper's code's HPSv2.1 prompts
        assert [r.prompt_template for r in preset.rewards] == ["{prompt}", "Realistic photo {prompt}"]
    assert (medium.trainer.precision, medium.trainer.optimizer) == ("bf16", "adamw8bit")
    assert (large.model.resolution, large.student.shift, large.dmd.real_cfg) == (1024, 5.0, 4.0)
    assert (large.trainer.lr_generator, large.trainer.lr_critic, large.trainer.lr_generator_rl,
            large.trainer.lr_critic_rl) == (1e-6, 2e-8, 1e-7, 5e-9)
    assert [r.weight for r in large.rewards] == [0.1, 0.1]
    for preset in (medium, large):  # what DESIGN section 2 gives for both runs
        assert (preset.critic.lora.rank, preset.critic.lora.alpha) == (32, 32)
        assert (preset.critic.fake_scale, preset.critic.real_scale0) == (2.0, 0.5)
        assert (preset.dmd.cfg_jitter, preset.dmd.renoise_beta, preset.dmd.cfg_max_tau) == (0.5, (4.0, 1.5), 1.0)
        assert [(r.shaping, r.margin) for r in preset.rewards] == [("hinge", 0.7), ("hinge", 0.7)]
        assert (preset.student.lora.rank, preset.student.lora.alpha, preset.trainer.grad_clip) == (64, 128, 1.0)
        assert (preset.trainer.precision, preset.trainer.optimizer, preset.dmd.ratio) == ("bf16", "adamw8bit", 5)



def test_the_sd3_grpo_preset_is_the_paper_recipe_with_only_the_policy_gradients_changes():
    paper, grpo = load_config("sd3-medium-dmdr"), load_config("sd3-medium-dmdr-grpo")
    changed = {"name", "student", "rewards", "rl", "ray"}
    for section in set(type(paper).model_fields) - changed:
        assert getattr(grpo, section) == getattr(paper, section), section
    assert grpo.student.model_copy(update={"sampler": "ode"}) == paper.student and grpo.student.sampler == "sde"
    assert grpo.ray.model_copy(update={"max_staleness": paper.ray.max_staleness}) == paper.ray
    assert grpo.ray.max_staleness == 0
    assert (grpo.rl.mode, grpo.rl.transitions, grpo.prompt_group) == ("grpo", "all", 4)
    assert [(r.name, r.weight, r.shaping) for r in grpo.rewards] == [("open-clip-score", 0.3, "linear"), ("hpsv2.1", 0.3, "linear")]
    assert all(grpo.scored_on_rollout(spec) for spec in grpo.rewards)
    assert not [note for note in grpo.warnings() if "rl.mode=grpo" in note]  # no hinge, no staleness warning

def test_dotted_overrides_are_typed():
    cfg = load_config("toy-dmdr", ["student.steps=1", "dmd.renoise_beta=[3, 1.2]", "rewards.0.weight=0.5", "ray.address=null"])
    assert cfg.student.steps == 1 and cfg.dmd.renoise_beta == (3.0, 1.2)
    assert cfg.rewards[0].weight == 0.5 and cfg.ray.address is None
    assert load_config("toy-dmd", ["student.lora=null"]).student.lora is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["student.steps=0"], r"student.steps: Input should be greater than or equal to 1 \(got 0\)"),
        (["student.sampler=dpm"], r"student.sampler: Input should be 'ode' or 'sde' \(got 'dpm'\)"),
        (["student.stepz=2"], r"unknown config key 'student.stepz': student has steps, shift, sampler, lora"),
        (["trainer.backend=slurm"], r"trainer.backend: .*'local' or 'ray'"),
        (["dmd.renoise_beta=[0, 1]"], r"both Beta parameters must be > 0"),
        (["rewards.3.weight=1"], r"not an index into a list of 1"),
        (["studentsteps"], r"must look like section.key=value"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("toy-dmdr", overrides)


def test_a_password_never_shows_in_an_error_and_a_yaml_typo_lists_the_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("toy-dmdr", ["store.url=http://:s3cret@host"])
    assert "s3cret" not in str(err.value) and "***" in str(err.value)
    typo = tmp_path / "typo.yaml"
    typo.write_text("base: toy-dmdr\ntrainer: {lr_gen: 1.0e-4}\n")
    with pytest.raises(ConfigError, match=r"trainer.lr_gen: unknown key; trainer has backend, max_steps"):
        load_config(str(typo))
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: {lr: [1, }\n")
    with pytest.raises(ConfigError, match=r"cannot read .*broken.yaml as a YAML config"):
        load_config(str(broken))
    # a section (or key) written twice: PyYAML would keep the last one and drop the first's values without a word
    repeated = tmp_path / "repeated.yaml"
    repeated.write_text("base: toy-dmdr\ntrainer:\n  max_steps: 4\ntrainer:\n  cold_start: 2\n")
    with pytest.raises(ConfigError, match=r"repeated.yaml as a YAML config: the key 'trainer' is given twice in one "
                                          r"mapping \(lines 2 and 4\): merge them into one$"):
        load_config(str(repeated))
    repeated.write_text("base: toy-dmdr\ntrainer: {max_steps: 4, max_steps: 5}\n")  # on one line
    with pytest.raises(ConfigError, match=r"the key 'max_steps' is given twice in one mapping \(line 2\)"):
        load_config(str(repeated))
    with pytest.raises(ConfigError, match=r"override 'rewards': the key 'weight' is given twice in one mapping"):
        load_config("toy-dmdr", ["rewards=[{name: toy-align, weight: 1, weight: 2}]"])
    from dmdr_rl.config import load_yaml  # YAML's merge keys (`<<: *anchor`) are no repetition, however nested

    assert load_yaml("b: &b {x: 1}\na: {i: &i {<<: *b, x: 2}}\nc: {<<: *i}\nd: [{<<: *b, y: 3}]\n")["d"] == [{"x": 1, "y": 3}]
    assert load_yaml('1: a\n"1": b\n') == {1: "a", "1": "b"}  # (a number and a text are two keys)
    empty = tmp_path / "empty.yaml"  # a section's key with nothing under it (YAML: null), or a number in its place
    empty.write_text("base: toy-dmdr\nstudent:\n")
    with pytest.raises(ConfigError, match=r"student: is null, which an empty key in YAML also reads as: give the section's fields, or remove"):
        load_config(str(empty))
    with pytest.raises(ConfigError, match=r"trainer: is a section: give its fields as a mapping \(trainer.KEY=VALUE"):
        load_config("toy-dmdr", ["trainer=3"])
    with pytest.raises(ConfigError, match=r"student.lora: is a section: .*, or null \(got 3\)"):  # (null: full fine-tune)
        load_config("toy-dmdr", ["student.lora=3"])
    assert load_config("toy-dmdr", ["model.path=None", "trainer.device=cuda:1"]).model.path is None


def test_a_run_name_that_cannot_be_a_directory_and_a_store_key_is_refused_unless_a_finished_run_is_read(tmp_path):
    for name in ("a/b", "my run", "-x", "../up", "run:1"):
        with pytest.raises(ConfigError, match=r"name: a run's name becomes a directory name .* use letters, digits"):
            load_config("toy-dmdr", [f"name={name}"])
    assert load_config("toy-dmdr", ["name=toy.v2+lr3e-4_seed1"]).output_dir.name == "toy.v2+lr3e-4_seed1"
    (tmp_path / "config.yaml").write_text("base: toy-dmdr\nname: my run\n")  # written before the rule: still read
    assert load_config(tmp_path / "config.yaml", for_sampling=True).name == "my run"


def test_an_unknown_key_suggests_the_one_meant(tmp_path):
    for override, meant in (("resume_from=runs/a", "trainer.resume_from"), ("max_steps=5", "trainer.max_steps"),
                            ("student.max_steps=5", "trainer.max_steps"), ("trainer.max_step=5", "trainer.max_steps"),
                            ("student.stepz=2", "student.steps"), ("critic.rnk=4", "critic.lora.rank"),
                            ("rank=4", "student.lora.rank or critic.lora.rank")):
        with pytest.raises(ConfigError, match=rf"unknown config key '{override.split('=')[0]}': .*; did you mean {meant}\?$"):
            load_config("toy-dmdr", [override])
    with pytest.raises(ConfigError) as err:
        load_config("toy-dmdr", ["zzz=1"])  # nothing like it: no guess
    assert "did you mean" not in str(err.value)
    # a list item's key: among that item's own keys (rewards.0.path is most likely a kwarg, not model.path)
    for override, meant in (("rewards.0.wieght=1", "rewards.0.weight"), ("rewards.0.nme=x", "rewards.0.name"),
                            ("rewards.0.serve.replica=2", "rewards.0.serve.replicas")):
        with pytest.raises(ConfigError, match=rf"; did you mean {re.escape(meant)}\?$"):
            load_config("toy-dmdr", [override])
    with pytest.raises(ConfigError) as err:
        load_config("toy-dmdr", ["rewards.0.path=/models/x"])
    assert "did you mean" not in str(err.value)
    misplaced = tmp_path / "misplaced.yaml"
    misplaced.write_text("base: toy-dmdr\nresume_from: runs/a\n")
    with pytest.raises(ConfigError, match=r"resume_from: unknown key; the top level has .*; did you mean trainer.resume_from\? "):
        load_config(str(misplaced))


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown preset 'toy-fast'; available: .*toy-dmdr"):
        load_config("toy-fast")


def test_a_missing_base_is_named_with_the_file_that_names_it(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: toy-dmdrr\ntrainer: {max_steps: 5}\n")
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\n")
    for given in (child, tmp_path / "grandchild.yaml"):  # one file among several: the one that says `base: toy-dmdrr`
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(child))}: base: unknown preset 'toy-dmdrr'; available: "
                                              r".*toy-rl-only; did you mean toy-dmdr or "):
            load_config(given)
    child.write_text("base: zzzz\n")  # no close name: no guess
    with pytest.raises(ConfigError, match=r": base: unknown preset 'zzzz'; available: [a-z0-9, -]+$"):
        load_config(child)
    child.write_text("base: toy-dmdr.yaml\n")  # a file beside it that is not there (the preset it looks like is said)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(child))}: base: config file "
                                          rf"'{re.escape(str(tmp_path / 'toy-dmdr.yaml'))}' does not exist \(the preset "
                                          r"is base: toy-dmdr\)$"):
        load_config(child)


def test_a_run_needs_a_loss():
    with pytest.raises(ConfigError, match="no reward has weight > 0 .none is configured"):
        load_config("toy-rl-only", ["rewards=[]"])
    with pytest.raises(ConfigError, match="no reward has weight > 0 .monitored rewards only log"):
        load_config("toy-rl-only", ["rewards.0.weight=0", "rewards.0.monitor=true"])
    assert load_config("toy-rl-only", ["rewards.0.weight=0.1"]).dmd.weight == 0


def test_a_preset_inherits_its_base_section_by_section(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: toy-dmdr\nname: child\nstudent: {steps: 1}\ntrainer: {max_steps: 7}\n")
    cfg, parent = load_config(child), load_config("toy-dmdr")
    assert (cfg.name, cfg.student.steps, cfg.trainer.max_steps) == ("child", 1, 7)
    assert cfg.student.lora == parent.student.lora and cfg.trainer.cold_start == parent.trainer.cold_start
    assert cfg.rewards == parent.rewards
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text("base: child.yaml\nrewards: []\ndmd: {weight: 1.0}\n")
    cfg = load_config(grandchild, ["trainer.max_steps=9"])
    assert (cfg.name, cfg.student.steps, cfg.trainer.max_steps, cfg.rewards) == ("child", 1, 9, [])


def test_an_error_in_an_inherited_value_names_the_file_that_set_it(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("base: toy-dmdr\nstudent: {steps: 0}\ntrainer: {max_stepz: 3}\n"
                    "rewards:\n  - {name: toy-align, weight: -1}\n  - {name: toy-align, label: other, weight: -2}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ndmd: {real_cfg: -1}\n")

    def problems(overrides=()):
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path / "child.yaml", overrides)
        return {line.strip().split(":")[0]: line for line in str(err.value).splitlines()[1:]}

    inherited = f"; set in {base} (inherited with base:)"
    lines = problems()
    assert all(lines[key].endswith(inherited) for key in ("student.steps", "trainer.max_stepz", "rewards.0.weight"))
    assert inherited not in lines["dmd.real_cfg"]  # the file named: it says nothing more
    lines = problems(["student.steps=-1", "rewards.0.weight=-3"])  # set on the command line instead
    assert inherited not in lines["student.steps"] + lines["rewards.0.weight"] and lines["rewards.1.weight"].endswith(inherited)


def test_one_step_presets_differ_from_their_bases_only_in_steps_and_name():
    for one_step, base in (("toy-dmd-1step", "toy-dmd"), ("toy-dmdr-1step", "toy-dmdr")):
        a, b = load_config(one_step).model_dump(), load_config(base).model_dump()
        assert a["student"].pop("steps") == 1 and b["student"].pop("steps") == 4
        assert a.pop("name") == one_step
        b.pop("name")
        assert a == b


def test_a_cycle_of_bases_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_two_served_rewards_may_not_share_an_app(tmp_path):
    preset = tmp_path / "two.yaml"
    preset.write_text("base: toy-dmdr\nrewards:\n  - {name: toy-align, placement: serve}\n"
                      "  - {name: toy-align, placement: serve, kwargs: {path: /elsewhere}}\n")
    with pytest.raises(ConfigError, match="two served rewards would share a Serve app \\('reward-toy-align'\\)"):
        load_config(str(preset))
    with pytest.raises(ConfigError, match=r"rewards.0 and rewards.1 are both called 'toy-align'.*rewards.1.label="):
        load_config(str(preset), ["rewards.1.serve.app=reward-other"])  # apart, but their metrics would not be
    labelled = load_config(str(preset), ["rewards.1.label=toy-align-elsewhere"])  # and an app of its own by default
    assert [(r.key, r.app_name) for r in labelled.rewards] == [("toy-align", "reward-toy-align"),
                                                               ("toy-align-elsewhere", "reward-toy-align-elsewhere")]
    with pytest.raises(ConfigError, match=r"rewards.1.label: String should match pattern"):
        load_config(str(preset), ["rewards.1.label=toy/align"])  # (metric names use /)


def test_text_fields_keep_the_override_as_written_and_other_fields_parse_yaml():
    cfg = load_config("toy-dmdr", ["name=2024", "output.dir={name}-seed1", "ray.address=10:20", "data.prompts= @p.txt",
                                   "rewards.0.kwargs={gain: 2}", "dmd.renoise_beta.1=2", "model.path='my model'"])
    assert (cfg.name, cfg.output.dir, cfg.ray.address, cfg.data.prompts) == ("2024", "{name}-seed1", "10:20", "@p.txt")
    assert cfg.model.path == "my model"  # one pair of quotes is YAML's, not the value's
    assert cfg.output_dir.name == "2024-seed1" and cfg.rewards[0].kwargs == {"gain": 2}
    assert cfg.dmd.renoise_beta == (4.0, 2.0)
    assert load_config("toy-dmdr", ["store.url=null", "model.path=~"]).store.url is None
    assert load_config("toy-dmdr", ["ray.address=NULL"]).ray.address is None
    assert load_config("toy-dmdr", ["student.lora.targets=[to_q, to_k]"]).student.lora.targets == ["to_q", "to_k"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("student.steps.x=1", r"student.steps is a value \(4\), not a section with keys"),
        ("name.x=1", r"name is a value \('toy-dmdr'\), not a section"),
        ("output.dir=runs/{name}-{seed}", r"output.dir: the only placeholder is \{name\}, as it is"),
        ("output.dir=runs/{name.upper}", r"output.dir: the only placeholder is \{name\}, as it is"),
        ("trainer.seed=-1", r"trainer.seed: Input should be greater than or equal to 0"),
        ("critic.fake_scale=-2", r"critic.fake_scale: Input should be greater than 0"),
        ("critic.real_scale0=-0.1", r"critic.real_scale0: Input should be greater than or equal to 0"),
        ("dmd={real_cfg: 1.5, cfg_jitter: 2}", r"dmd: cfg_jitter=2 > real_cfg=1.5 would draw negative guidance scales .*lower dmd.cfg_jitter$"),
        ("rewards.0.prompt_template=photo", r"rewards.0.prompt_template: must hold '\{prompt\}' once, where the prompt goes"),
        ("rewards.0.prompt_template='{prompt} {prompt}'", r"rewards.0.prompt_template: must hold '\{prompt\}' once"),
        ("dmd.renoise_beta=4,1.5", r"dmd.renoise_beta: .*valid tuple; write the values in brackets \(dmd.renoise_beta=\[a, b\]\)"),
        ("dmd.renoise_beta=[4]", r"dmd.renoise_beta: too few values \(no item 1\)"),
        ("model.kwargs={resolution: 64}", r"model.kwargs: 'resolution' is not a loader option here: set model.resolution"),
        ("model.kwargs={encoders: false}", r"model.kwargs: 'encoders' is not a loader option here"),
        ("rewards.0.serve.runtime_env={py_modules: [./my_rewards.py]}",
         r"runtime_env: './my_rewards.py' is a local path, .*run from the directory that holds it, or submit with"),
        ("dmd.weight=0", r"dmd.weight is 0, so the generator has no loss during the cold start .*trainer.cold_start=0"),
        ("trainer.lr_generator=inf", r"trainer.lr_generator: Input should be a finite number"),
        ("rewards.0.margin=.nan", r"rewards.0.margin: Input should be a finite number"),
        ("student.lora=", r"override 'student.lora' has an empty value: .*student.lora=null"),
        ("output.dir=", r"override 'output.dir' has an empty value: give one$"),  # (null is no value for it)
        ("output.dir=null", r"output.dir needs a value \(it cannot be null; the default is 'runs/\{name\}'\); for the text 'null' "
                            r"""write "output.dir='null'" \(the shell keeps the inner quotes\)"""),
        ("trainer.device=None", r"trainer.device needs a value \(it cannot be null; the default is 'auto'\)"),
        ("trainer.max_steps=None", r"trainer.max_steps: Input should be a valid integer, .*\(got 'None'\)$"),
        ("trainer.batch_size=true", r"trainer.batch_size: true/false is not a number here"),
        ("dmd.renoise_beta=[true, 1.5]", r"dmd.renoise_beta: true/false is not a number here: give numbers"),
        ("trainer.device=gpu", r"trainer.device: use auto, cpu, cuda or cuda:N \(got 'gpu'\)"),
        ("student.lora=None", r"student.lora: .*; write null, not None"),
        ("dmd.renoise_beta.0=", r"override 'dmd.renoise_beta.0' has an empty value: give one$"),  # an item's type
        ("rewards.0=", r"override 'rewards.0' has an empty value: give one$"),
        ("store.url=redis://h:notaport/0", r"store.url: .*the port must be a number"),
        ("ray.address=my-cluster", r"ray.address: use host:port .* \(got 'my-cluster'\)"),
    ],
)
def test_overrides_that_cannot_apply_are_config_errors_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("toy-dmdr", [override])


def test_a_served_rewards_autoscaling_is_checked_against_serves_own_config():
    """Serve's AutoscalingConfig ignores keys it does not know ({max_replica: 4} deploys one replica) and checks
    its values only when the app deploys: both are config errors before anything starts."""
    pytest.importorskip("ray.serve.config")
    with pytest.raises(ConfigError, match=r"rewards.0.serve.autoscaling.max_replica: unknown key, which Serve would "
                                          r"ignore; its autoscaling_config has min_replicas, .*; did you mean max_replicas"):
        load_config("toy-dmdr", ["rewards.0.serve.autoscaling={min_replicas: 1, max_replica: 4}"])
    with pytest.raises(ConfigError, match=r"rewards.0.serve.autoscaling.max_replica: unknown key"):
        load_config("toy-dmdr", ["rewards.0.serve.autoscaling.max_replica=4"])
    with pytest.raises(ConfigError, match=r"rewards.0.serve.autoscaling: not an autoscaling_config that Serve takes "
                                          r"\(max_replicas \(4\) must be greater than or equal to min_replicas \(5\)!\)"):
        load_config("toy-dmdr", ["rewards.0.serve.autoscaling={min_replicas: 5, max_replicas: 4}"])
    with pytest.raises(ConfigError, match=r"Serve takes \(min_replicas: Input should be a valid integer.* \(got 'two'\)\)"):
        load_config("toy-dmdr", ["rewards.0.serve.autoscaling={min_replicas: two}"])
    autoscaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4}
    assert load_config("toy-dmdr", [f"rewards.0.serve.autoscaling={autoscaling}"]).rewards[0].serve.autoscaling == autoscaling
    # a custom policy's module is imported where the app runs (its runtime_env may hold it), not by the config
    policy = {**autoscaling, "policy": {"policy_function": "a_module_only_the_app_has:scale"}}
    assert load_config("toy-dmdr", [f"rewards.0.serve.autoscaling={policy}"]).rewards[0].serve.autoscaling == policy


def test_a_check_across_fields_says_only_what_is_wrong():
    with pytest.raises(ConfigError) as caught:
        load_config("toy-dmdr", ["rewards.0.weight=0"])
    message = str(caught.value)
    assert "rewards.0 (toy-align) has weight 0 and monitor false" in message
    assert "Value error" not in message and "'model':" not in message and len(message) < 250


@pytest.mark.parametrize("preset", ["toy-dmdr", "toy-dmdr-grpo"])
def test_a_runs_own_config_file_given_back_as_its_preset_warns_about_nothing(tmp_path, preset):
    """`--preset RUN/config.yaml` (how a run is resumed with its own settings): the file holds every field, the
    Ray ones too, which the local backend must not take for settings of the user's."""
    import yaml

    from dmdr_rl.trainer import run_config_dump

    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(run_config_dump(load_config(preset))))
    assert load_config(str(saved)).warnings() == []
    assert load_config(str(saved), ["ray.rollout_actors=2"]).warnings()[0].startswith("ray.rollout_actors set, but")


def test_settings_that_run_but_not_as_meant_are_warned_about():
    assert load_config("toy-dmdr").warnings() == []
    [note] = load_config("toy-dmdr", ["trainer.max_steps=50"]).warnings()
    assert "trainer.cold_start=300 >= trainer.max_steps=50: the reward term (toy-align) never trains" in note
    assert load_config("toy-dmd", ["trainer.max_steps=50"]).warnings() == []  # no reward to train
    [note] = load_config("sd3-medium-dmdr", ["ray.learner_gpus=0"]).warnings()
    assert "ray.learner_gpus=0: the learner runs on CPUs" in note
    [note] = load_config("toy-dmdr", ["ray.rollout_actors=3", "ray.max_staleness=0", "ray.http_port=8001"]).warnings()
    assert note.startswith("ray.max_staleness, ray.rollout_actors set, but they configure the Ray runtime, and "
                           "trainer.backend=local trains in this process")
    assert load_config("toy-dmdr", ["ray.rollout_actors=3", "trainer.backend=ray"]).warnings() == []
    assert load_config("toy-dmdr", ["ray.rollout_actors=1", "ray.max_staleness=1"]).warnings() == []  # the defaults
    assert load_config("toy-dmdr", ["ray.address=auto", "ray.local_cpus=4"]).warnings() == []  # served rewards' Ray
    [note] = load_config("toy-dmd", ["trainer.micro_batch_size=64"]).warnings()
    assert note.startswith("trainer.micro_batch_size=64 >= the 32 samples a learner trains at a time: it slices nothing")
    [note] = load_config("toy-dmd", ["trainer.backend=ray", "ray.learner_workers=2", "trainer.micro_batch_size=16"]).warnings()
    assert "the 16 samples a learner trains at a time" in note  # per rank
    assert load_config("toy-dmd", ["trainer.micro_batch_size=8"]).warnings() == []
    # the cold start's 32-image batches are sliced though the RL stage's 8 are not: no note
    assert load_config("toy-dmdr", ["trainer.micro_batch_size=16", "trainer.batch_size_rl=8"]).warnings() == []


def test_a_presets_own_ray_settings_are_not_warned_about_on_the_local_backend(tmp_path):
    """A Ray preset run with trainer.backend=local: its ray.*_gpus are the preset's, unused there, not the user's to
    change; the same settings given by the user (an override, their own file) are still noted."""
    local = ["trainer.backend=local", "trainer.optimizer=adamw"]
    for preset in ("sd3-medium-dmdr", "flux-dev-dmdr"):
        cfg = load_config(preset, local)
        assert cfg.ray.learner_gpus > 0 or cfg.ray.rollout_gpus > 0
        assert "rollout_gpus" not in cfg.ray.model_fields_set and "backend" in cfg.trainer.model_fields_set
        assert not [note for note in cfg.warnings() if "ray." in note], preset
    [note] = load_config("sd3-medium-dmdr", [*local, "ray.learner_gpus=2"]).warnings()
    assert note.startswith("ray.learner_gpus set, but it configures the Ray runtime, and trainer.backend=local")
    own = tmp_path / "mine.yaml"  # the user's own file on the preset: its values are the user's, the base's are not
    own.write_text("base: sd3-medium-dmdr\nray: {rollout_gpus: 0.25}\ntrainer: {backend: local, optimizer: adamw}\n")
    [note] = load_config(str(own)).warnings()
    assert note.startswith("ray.rollout_gpus set, but it configures")
    assert load_config(str(own), ["ray={}"]).warnings() == []  # the whole section replaced: the defaults
    assert load_config(str(own), ["ray.rollout_gpus=0"]).warnings() == []


def test_a_finished_runs_config_loads_for_sampling_whatever_the_rules_of_training_say_now(tmp_path):
    import yaml

    data = load_config("toy-dmdr").model_dump(mode="json")
    data["dmd"]["weight"] = 0.0  # trained before the rule that a DMD-free run needs cold_start 0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="no loss during the cold start"):
        load_config(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", for_sampling=True).dmd.weight == 0.0
    with pytest.raises(ConfigError, match="student.steps"):  # the fields themselves are still checked
        load_config(tmp_path / "config.yaml", ["student.steps=0"], for_sampling=True)


def test_a_home_relative_path_is_the_home_directory(monkeypatch, tmp_path):
    """`~` in output.dir or trainer.resume_from is the home directory: no shell expands it inside key=~/value."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("toy-dmd", ["output.dir=~/runs/{name}", "trainer.resume_from=~/runs/old"])
    assert cfg.output_dir == tmp_path / "runs" / cfg.name and cfg.trainer.resume_from == str(tmp_path / "runs" / "old")


def test_loading_a_config_imports_no_ray():
    """Every command loads a config, and the Ray runtime's coordinator does in its own process, from a dump
    with every field given (autoscaling: null too): Ray Serve's import (0.8 s) is for a config that sets a
    served reward's autoscaling, which Serve checks."""
    import subprocess
    import sys

    code = ("import sys\nfrom dmdr_rl.config import RunConfig, load_config\n"
            "RunConfig.model_validate(load_config('sd3-medium-dmdr').model_dump(mode='json'))\n"  # (as a saved config)
            "load_config('toy-dmdr', ['output.eval_every=10'])\n"  # (whose check knows the toy images' size)
            "print(sorted(m for m in ('ray', 'ray.serve', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("preset", ["toy-dmdr", "sd3-medium-dmdr-grpo"])
def test_show_config_prints_the_whole_config_which_preset_takes_back(preset, tmp_path, capsys, monkeypatch):
    """A starting point for one's own config file: every field, the overrides applied; nothing starts."""
    from dmdr_rl import run

    monkeypatch.chdir(tmp_path)  # (where the run directory, runs/<name>, would be made)

    run.main(["--preset", preset, "--show-config", "trainer.max_steps=7", "rewards.0.weight=0.25"])
    shown = capsys.readouterr().out
    (tmp_path / "mine.yaml").write_text(shown)
    again = load_config(str(tmp_path / "mine.yaml"))
    assert again == load_config(preset, ["trainer.max_steps=7", "rewards.0.weight=0.25"])
    assert again.trainer.max_steps == 7 and again.rewards[0].weight == 0.25
    assert "micro_batch_size:" in shown and "http_max_pixels:" in shown  # (defaults too, not only what was set)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.yaml"]


def test_the_outputs_line_names_what_the_run_wrote_and_where_its_records_are():
    from dmdr_rl.run import run_outputs

    ray_files = run_outputs(load_config("toy-demo"), evaluated=True).splitlines()[1]
    assert "events.jsonl, ledger.jsonl" in ray_files and "eval/report.json" in ray_files and "ray_train/" in ray_files
    shared = run_outputs(load_config("toy-demo", ["ray.storage_path=s3://bucket/dmdr"]), evaluated=True)
    assert "ray_train/" not in shared and shared.endswith("Ray Train's checkpoints in s3://bucket/dmdr")
    redis = run_outputs(load_config("toy-dmdr", ["store.url=redis://:s3cret@127.0.0.1:6380/0"]), evaluated=False)
    assert ".jsonl" not in redis and "eval/" not in redis and redis.endswith("metrics, events in redis://:***@127.0.0.1:6380/0")
