"""End to end through `ray job submit` against a `ray start --head` cluster on 127.0.0.1, the way
users start the product (token authentication on, as Ray 2.60 defaults)."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def head_node(tmp_path):
    port, dashboard = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    # a token of its own: a fresh machine has no ~/.ray/auth_token, and `ray start` would not make one; a home
    # of its own, where a submitted job's relative output.dir goes
    (home := tmp_path / "home").mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "HOME": str(home)}
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=3",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats"], check=True, env=env, capture_output=True)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_trains_the_main_jobs_default_the_demo_on_the_cluster(tmp_path, head_node):
    address, env = head_node
    out = tmp_path / "home" / "runs" / "toy-demo"  # the default output.dir, relative: under the head node's home
    result = subprocess.run(  # no --preset: the demo, shortened
        [RAY, "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--",
         sys.executable, "-m", "dmdr_rl.run", "--num-images", "8", "trainer.max_steps=2", "trainer.batch_size=4", "dmd.ratio=2", "trainer.cold_start=1", "student.steps=2",
         "output.log_every=1", "output.checkpoint_every=2",
         # a served reward: the run starts its Serve app and stops it before evaluating the student, which
         # therefore must not need the app (only the generator is loaded)
         "rewards.0.placement=serve", "rewards.0.serve.num_cpus=0.5"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout and "the demo (--preset toy-demo)" in result.stdout
    assert f"goes under this node's home directory, {out}" in result.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["generator_steps"] == 2 and summary["ledger"]["lost"] == []
    assert json.loads((out / "eval" / "report.json").read_text())["num_images"] == 8
