"""Reward scoring throughput (images per second): in-process vs a Ray Serve app with dynamic batching
vs the same app with `max_batch_size=1`, for toy-align and a tiny random-weight CLIP (PickScore's
class), on the same machine.

    python benchmarks/reward_serving.py                       # 3 rounds, 32 images per request
    python benchmarks/reward_serving.py --rounds 5 --requests 60 --concurrency 8 --grad
    python benchmarks/reward_serving.py --device cuda               # models on the GPU (a GPU fraction per replica)

Every mode scores the same requests of `--images` images. Serve clients keep `--concurrency`
requests in flight through a DeploymentHandle (what the learner and rollout actors use), so a
batching replica can merge them. Modes are interleaved round by round and the report gives medians
and their ratios measured in the same run. Thread budgets are equal: the in-process scorer and each
replica use `--threads` torch threads. With `--device cuda` the in-process model and every replica hold
the model on the GPU (`--gpu-fraction` of it per replica) and the images start on the host, as they
arrive from a client: each mode pays the same host-to-device copy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_report  # noqa: E402
from dmdr_rl.config import RewardSpec  # noqa: E402
from dmdr_rl.prompts import PromptSource  # noqa: E402
from reward_servers import load_reward_model  # noqa: E402
from reward_servers.models.testing import save_tiny_clip  # noqa: E402

MODES = ("in-process", "serve-batched", "serve-unbatched")


def score_in_process(model, images, prompts, requests: int, grad: bool) -> float:
    from reward_servers.gradient import score_and_grad

    started = time.perf_counter()
    for _ in range(requests):
        if grad:
            score_and_grad(model, images, prompts)
        else:
            with torch.no_grad():
                model.score(images, prompts)
    return requests * images.shape[0] / (time.perf_counter() - started)


def score_served(handle, images, prompts, requests: int, concurrency: int, grad: bool) -> float:
    method = handle.score_with_grad if grad else handle.score
    in_flight: deque = deque()
    started = time.perf_counter()
    for _ in range(requests):
        if len(in_flight) >= concurrency:
            in_flight.popleft().result(timeout_s=600)
        in_flight.append(method.remote(images, prompts))
    while in_flight:
        in_flight.popleft().result(timeout_s=600)
    return requests * images.shape[0] / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    from dmdr_rl.cli import command_summary

    p = argparse.ArgumentParser(description=command_summary(__doc__))
    p.add_argument("--models", default="toy-align,tiny-clip", help="comma list: toy-align, tiny-clip")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=40, help="requests per mode and round")
    p.add_argument("--images", type=int, default=32, help="images per request")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per Serve client")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests merged per call by the batching app")
    p.add_argument("--batch-wait-s", type=float, default=0.005,
                   help="the batching app's batch_wait_timeout_s (the config's default: 0.005)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in-process and per replica")
    p.add_argument("--grad", action="store_true", help="score with d score / d image (gradient mode)")
    p.add_argument("--device", default="cpu", help="where the models run: cpu or cuda")
    p.add_argument("--gpu-fraction", type=float, default=0.25, help="GPU share per replica with --device cuda")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from reward_servers.serve import reward_app

    torch.set_num_threads(args.threads)
    clip_dir = save_tiny_clip(tempfile.mkdtemp(prefix="tiny-clip-"))
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU on this machine")
    placement = {"device": args.device} if on_gpu else {}
    kwargs = {"toy-align": ("toy-align", placement),
              "tiny-clip": ("pickscore", {"path": str(clip_dir), "processor_path": str(clip_dir), "local_files_only": True}
                            | placement)}
    prompts = PromptSource("toy:held-in", 0).batch(0, args.images)
    images = torch.rand((args.images, 3, 32, 32), generator=torch.Generator().manual_seed(0))

    ray.init(num_cpus=8, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    report: dict = {"settings": vars(args) | {"json": str(args.json) if args.json else None}, "models": {}}
    for model_key in args.models.split(","):
        name, model_kwargs = kwargs[model_key]
        model = load_reward_model(name, model_kwargs)
        handles = {}
        for mode, batch in (("serve-batched", args.max_batch_size), ("serve-unbatched", 1)):
            spec = RewardSpec(name=name, kwargs=model_kwargs, placement="serve",
                              serve={"app": f"bench-{model_key}-{mode}", "max_batch_size": batch,
                                     "batch_wait_timeout_s": args.batch_wait_s, "num_cpus": args.threads,
                                     "num_gpus": args.gpu_fraction if on_gpu else 0})
            handles[mode] = serve.run(reward_app(spec), name=spec.app_name, route_prefix=f"/{spec.app_name}")
            score_served(handles[mode], images, prompts, 4, args.concurrency, args.grad)  # warm-up
        score_in_process(model, images, prompts, 2, args.grad)
        rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        for round_index in range(args.rounds):
            for mode in MODES:
                if mode == "in-process":
                    rate = score_in_process(model, images, prompts, args.requests, args.grad)
                else:
                    rate = score_served(handles[mode], images, prompts, args.requests, args.concurrency, args.grad)
                rates[mode].append(rate)
                print(f"{model_key} round {round_index + 1}/{args.rounds} {mode}: {rate:,.0f} images/s", flush=True)
        medians = {mode: statistics.median(values) for mode, values in rates.items()}
        served = {mode: handles[mode].info.remote().result(timeout_s=60) for mode in handles}
        report["models"][model_key] = {
            "images_per_s": medians, "rounds": rates,
            "images_per_model_call": {mode: info["images"] / max(info["calls"], 1) for mode, info in served.items()},
            "batched_vs_in_process": medians["serve-batched"] / medians["in-process"],
            "batched_vs_unbatched": medians["serve-batched"] / medians["serve-unbatched"],
        }
        for mode in ("serve-batched", "serve-unbatched"):
            serve.delete(f"bench-{model_key}-{mode}")
    serve.shutdown()
    ray.shutdown()

    print(f"\nimages/s on {args.device} (median of {args.rounds} rounds, {args.images} images per request, "
          f"{'score + gradient' if args.grad else 'score only'}):")
    print(f"{'model':<10} {'in-process':>11} {'serve batched':>14} {'serve unbatched':>16} {'batched/in-proc':>16} "
          f"{'batched/unbatched':>18}")
    for model_key, row in report["models"].items():
        m = row["images_per_s"]
        print(f"{model_key:<10} {m['in-process']:>11,.0f} {m['serve-batched']:>14,.0f} {m['serve-unbatched']:>16,.0f} "
              f"{row['batched_vs_in_process']:>15.2f}x {row['batched_vs_unbatched']:>17.2f}x   "
              f"(batched app: {row['images_per_model_call']['serve-batched']:.0f} images per model call)")
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
