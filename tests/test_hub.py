"""Loading from the Hugging Face hub when it cannot be reached: the cache alone, at once, and errors that
say so (instead of about 50 s of retries per file before any message)."""

import socket

import pytest

from dmdr_rl import hub


@pytest.fixture
def no_proxy(monkeypatch):
    for scheme in ("https", "http", "all"):
        for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY"):
            monkeypatch.delenv(name, raising=False)


def test_the_hub_counts_as_reachable_when_its_endpoint_takes_a_connection(monkeypatch, no_proxy):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        open_port = listening.getsockname()[1]
        assert hub.hub_reachable(f"http://127.0.0.1:{open_port}")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # set offline: never asked
        assert not hub.hub_reachable(f"http://127.0.0.1:{open_port}/")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
    assert not hub.hub_reachable(f"http://127.0.0.1:{closed_port}")  # refused
    assert not hub.hub_reachable("https://no-such-host.invalid")  # a name that does not resolve
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")  # through a proxy the hub client is left to try
    assert hub.hub_reachable("https://no-such-host.invalid")


def test_a_failed_check_stands_for_a_minute_and_a_success_for_the_process(monkeypatch, no_proxy):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    answers, asked = iter([False, True, False]), []
    monkeypatch.setattr(hub, "_connects", lambda endpoint, timeout_s: asked.append(endpoint) or next(answers))
    endpoint = "https://hub.example.test"
    assert not hub.hub_reachable(endpoint) and not hub.hub_reachable(endpoint) and len(asked) == 1  # one check
    hub._FAILED_AT[endpoint] -= hub.UNREACHABLE_FOR_S + 1  # a minute later (a passing blip): asked again
    assert hub.hub_reachable(endpoint) and len(asked) == 2
    assert hub.hub_reachable(endpoint) and len(asked) == 2  # and a success is not asked again


@pytest.mark.parametrize("reachable", [True, False])
def test_only_a_hub_id_is_loaded_from_the_cache_alone_and_only_when_the_hub_cannot_be_reached(monkeypatch, tmp_path,
                                                                                            reachable):
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: reachable)
    assert hub.local_files_only(False, "org/model") is (not reachable)
    assert hub.local_files_only(False, str(tmp_path)) is False  # a local directory: no hub involved
    assert hub.local_files_only(False, str(tmp_path), "org/model") is (not reachable)
    assert hub.local_files_only(True, "org/model") is True  # the user's own setting stands
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert ("cannot be reached" in hub.offline_note()) is (not reachable)
    # the user's HF_HUB_OFFLINE is what kept the hub out, whatever the network: said so, with the way back to the hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub.offline_note() == ("HF_HUB_OFFLINE is set, so only the hub cache is read, and the files are not in it "
                                  "(to download them, unset HF_HUB_OFFLINE on a machine that can reach the hub). ")


def test_a_hub_reward_offline_loads_from_the_cache_alone_and_the_error_names_the_config_entry(monkeypatch, tmp_path):
    pytest.importorskip("open_clip")  # (HPSv2's model: the [rewards] extra)
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from reward_servers.registry import RewardLoadError, load_reward_model

    asked = []

    def download(repo, filename, **kwargs):
        asked.append((repo, filename, kwargs["local_files_only"]))
        if kwargs["local_files_only"]:
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache ... set 'local_files_only' to False")
        raise AssertionError("went to the network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # (offline by the network, not the user)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(RewardLoadError, match=r"^rewards.2: cannot load reward model 'hpsv2': The hub \(.*\) cannot be "
                                              r"reached from this machine, and the files are not in its cache\. Its "
                                              r"files come from rewards.2.kwargs") as caught:
        load_reward_model("hpsv2", {"cache_dir": str(tmp_path)}, "rewards.2")
    assert "local_files_only" not in str(caught.value)  # the hub client's advice names a setting nobody made
    assert asked == [("xswu/HPSv2", "HPS_v2_compressed.pt", True)]
    # a download directory that does not exist yet is no error of its own: the hub is still the cause given
    with pytest.raises(RewardLoadError, match=r"^rewards.2: cannot load reward model 'hpsv2': The hub \(.*\) cannot be reached"):
        load_reward_model("hpsv2", {"cache_dir": str(tmp_path / "new-cache")}, "rewards.2")
    # ImageReward's checkpoint, the same way
    asked.clear()
    with pytest.raises(RewardLoadError, match="cannot be reached"):
        load_reward_model("imagereward", {}, "rewards.0")
    assert [local for *_, local in asked] == [True]


def test_a_reward_path_that_does_not_exist_is_named(tmp_path):
    from reward_servers.registry import RewardLoadError, load_reward_model

    missing = tmp_path / "no-such-model"
    with pytest.raises(RewardLoadError, match=rf"^rewards.0: cannot load reward model 'pickscore': "
                                              rf"rewards.0.kwargs.path='{missing}' does not exist here"):
        load_reward_model("pickscore", {"path": str(missing)}, "rewards.0")
    with pytest.raises(RewardLoadError, match=r"kwargs.path='.*', rewards.1.kwargs.processor_path='.*' do not exist here"):
        load_reward_model("pickscore", {"path": str(missing), "processor_path": str(missing)}, "rewards.1")
    # a local run's dry run, and its trainer before it builds anything (a large backbone loads first), refuse it
    # already; a Ray run's workers may see other files
    from dmdr_rl import run
    from dmdr_rl.config import ConfigError, load_config
    from dmdr_rl.trainer import LocalTrainer

    reward = [f"rewards=[{{name: aesthetic, weight: 0.1, shaping: linear, kwargs: {{head: {missing}.pth}}}}]"]
    refused = rf"rewards.0.kwargs.head='{missing}.pth': does not exist here"
    with pytest.raises(ConfigError, match=refused):
        run.dry_run("toy-dmdr", reward)
    with pytest.raises(ConfigError, match=refused):
        LocalTrainer(load_config("toy-dmdr", [*reward, f"output.dir={tmp_path / 'run'}"]))
    assert "the config is valid" in run.dry_run("toy-dmdr", [*reward, "trainer.backend=ray"])
    # a setting of the config's own stays its error, naming its field, whatever else is wrong
    with pytest.raises(ConfigError, match="dtype"):
        load_reward_model("pickscore", {"path": str(missing), "dtype": "float17"}, "rewards.0")
    # a local model directory's own error says nothing about the hub
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(RewardLoadError) as caught:
        load_reward_model("pickscore", {"path": str(tmp_path / "empty-model"), "local_files_only": True}, "rewards.0")
    assert "hub" not in str(caught.value).split("Its files come from")[0].lower().replace("hub id", "")


def test_with_hf_hub_offline_set_a_model_not_in_the_cache_is_said_to_be_missing_from_it_not_unreachable(monkeypatch,
                                                                                                       tmp_path):
    """HF_HUB_OFFLINE=1 is the user's choice: the error says so (not that the hub cannot be reached), and does not
    quote diffusers' "does not appear to have a file named config.json", which blames the repository for the cache."""
    import huggingface_hub.constants

    from dmdr_rl.latent import BackboneLoadError
    from dmdr_rl.sd3 import load_sd3
    from reward_servers.registry import RewardLoadError, load_reward_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_connects", lambda *a, **k: pytest.fail("asked the network"))
    with pytest.raises(BackboneLoadError) as caught:
        load_sd3("no-such-org/no-such-sd3-model", resolution=32)
    message = str(caught.value)
    assert message.startswith("cannot load the SD3 model 'no-such-org/no-such-sd3-model': There is no directory "
                              "'no-such-org/no-such-sd3-model' here, so it was taken for a hub id. HF_HUB_OFFLINE is set, "
                              "so only the hub cache is read, and the files are not in it (to download them, unset "
                              "HF_HUB_OFFLINE on a machine that can reach the hub). ")
    assert message.endswith("pass the local directory: model.path=/path/to/stable-diffusion-3-medium-diffusers")
    assert "config.json" not in message and "cannot be reached" not in message
    assert "does not appear to have a file named config.json" in str(caught.value.__cause__)  # (what it replaces)
    with pytest.raises(RewardLoadError) as caught:  # transformers: "We couldn't connect to 'https://huggingface.co'"
        load_reward_model("pickscore", {"cache_dir": str(tmp_path)}, "rewards.0")
    assert str(caught.value).startswith("rewards.0: cannot load reward model 'pickscore': HF_HUB_OFFLINE is set, so only "
                                        "the hub cache is read, and the files are not in it (to download them, unset "
                                        "HF_HUB_OFFLINE on a machine that can reach the hub). Its files come from "
                                        "rewards.0.kwargs")
    assert "connect" not in str(caught.value)


def test_a_hub_repository_without_the_diffusers_files_is_said_to_lack_them_not_to_be_out_of_reach(monkeypatch):
    """The hub answered and the repository has no transformer/config.json (not a diffusers model): no advice about
    network access or licences, which would send the user the wrong way."""
    from unittest.mock import patch

    from diffusers import SD3Transformer2DModel
    import httpx2
    from huggingface_hub.errors import RemoteEntryNotFoundError

    from dmdr_rl import latent
    from dmdr_rl.latent import BackboneLoadError
    from dmdr_rl.sd3 import load_sd3

    def no_such_file(*args, **kwargs):  # what huggingface_hub raises for a file the hub says the repository lacks
        response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/org/a-clip-model"))
        try:
            raise RemoteEntryNotFoundError("404 Client Error: Entry Not Found", response=response)
        except RemoteEntryNotFoundError as err:  # (as diffusers words it)
            raise OSError("org/a-clip-model does not appear to have a file named config.json.") from err

    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(latent, "check_config_files", lambda *a, **k: None)  # (asks the hub for the config files)
    with patch.object(SD3Transformer2DModel, "from_pretrained", side_effect=no_such_file) as loading:
        with pytest.raises(BackboneLoadError) as caught:
            load_sd3("org/a-clip-model", resolution=32)
    assert loading.call_args.kwargs["local_files_only"] is False
    assert str(caught.value) == (
        "cannot load the SD3 model 'org/a-clip-model': OSError: org/a-clip-model does not appear to have a file named "
        "config.json. There is no directory 'org/a-clip-model' here, so it was taken for a hub id, and that hub repository "
        "does not hold the diffusers layout (model_index.json, transformer/, vae/, text_encoder*/, tokenizer*/): pass one "
        "that does, such as 'stabilityai/stable-diffusion-3-medium-diffusers', or a local directory in that layout")
    from huggingface_hub.errors import LocalEntryNotFoundError

    # a file missing from the local cache (a subclass of the same error) is not the hub's answer about the repository
    assert not latent._missing_from_the_hub(LocalEntryNotFoundError("Cannot find the requested files in the disk cache"))
