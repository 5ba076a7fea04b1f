"""What the LoRA adapters cost a bf16 SD3-Medium-shaped transformer: the activations the backward pass
keeps per block with the adapters computed in the base's bf16 (what `TransformerBackbone` does) against
peft's own path (each adapted layer's input cast to the adapters' float32), and the FLOPs a base call
(the teacher, or the real score once DynaDG's scale reaches 0) saves by switching the adapters off.

    python benchmarks/activations.py                          # 512 px, on this machine's CPU
    python benchmarks/activations.py --device cuda --resolution 1024

Saved bytes are counted with autograd's saved-tensor hooks (each storage once, the frozen weights left
out) over one generator forward with gradient, for transformers of 2 and 4 blocks at SD3-Medium's width;
the difference is one block's share, what the other 20 of the real 24 add each. The counts do not depend
on the device; the forward + backward times are measured side by side in one process (on a CPU they
say nothing about a GPU's tensor cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_report  # noqa: E402
from dmdr_rl.backbone import TransformerBackbone  # noqa: E402
from dmdr_rl.conditioning import Conditioning  # noqa: E402
from dmdr_rl.sd3 import SD3_MEDIUM_TRANSFORMER  # noqa: E402


def saved_activation_bytes(module: torch.nn.Module, fn):
    """(fn(), bytes of the tensors autograd keeps for its backward), `module`'s weights left out, each
    storage counted once."""
    seen, weights = {}, {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, sum(n for ptr, n in seen.items() if ptr not in weights)


def as_peft_computes_them(transformer: torch.nn.Module) -> None:
    """peft's own path for every adapter: inputs cast to the adapters' float32, float32 matmuls."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in transformer.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.cast_input_dtype_enabled = True
            for factor in [*layer.lora_A.values(), *layer.lora_B.values()]:
                factor.__class__ = torch.nn.Linear


def build(blocks: int, resolution: int, device: torch.device):
    """The SD3-Medium preset's adapters (generator r64/a128, critic r32/a32) on a bf16 base of `blocks` blocks."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**{**SD3_MEDIUM_TRANSFORMER, "num_layers": blocks, "sample_size": resolution // 8})
    backbone = TransformerBackbone(transformer.to(torch.bfloat16), None, lambda x: x)
    backbone.add_lora("critic", 32, 32)
    backbone.add_lora("generator", 64, 128)
    backbone.to(device)  # peft may leave a second adapter where the first one was made (on meta: the CPU)
    with torch.no_grad():  # a trained adapter: lora_B starts at zero
        for p in backbone.trainable_parameters("generator"):
            p.add_(0.01 * torch.randn_like(p))
    generator = torch.Generator().manual_seed(1)
    config = transformer.config
    cond = Conditioning(torch.randn(1, 333, config.joint_attention_dim, generator=generator),
                        torch.randn(1, config.pooled_projection_dim, generator=generator)).to(device)
    x = torch.randn(1, *backbone.sample_shape, generator=generator).to(device)
    return backbone, x, torch.tensor([0.5], device=device), cond


def measure(backbone, x, t, cond, repeats: int) -> dict:
    device = x.device

    def step():
        v = backbone.velocity(x, t, cond, adapter="generator")
        v.float().square().mean().backward()
        return v

    v, saved = saved_activation_bytes(backbone.transformer, lambda: backbone.velocity(x, t, cond, adapter="generator"))
    del v
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return {"saved": saved, "seconds": statistics.median(times[1:])}


def base_call_flops(backbone, x, t, cond) -> dict:
    counts = {}
    for name, call in (("adapters_off", lambda: backbone.velocity(x, t, cond)),
                       ("adapter_at_scale_0", lambda: backbone._lora_forward("critic", 0.0)(x, t, cond))):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        counts[name] = counter.get_total_flops()
    return counts


def main(argv=None) -> dict:
    from dmdr_rl.cli import command_summary

    p = argparse.ArgumentParser(description=command_summary(__doc__))
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    paths = {}
    for blocks in (2, 4):
        backbone, x, t, cond = build(blocks, args.resolution, device)
        if blocks == 4:
            flops = base_call_flops(backbone, x, t, cond)
        paths.setdefault("bf16", {})[blocks] = measure(backbone, x, t, cond, args.repeats)
        as_peft_computes_them(backbone.transformer)
        paths.setdefault("peft_float32", {})[blocks] = measure(backbone, x, t, cond, args.repeats)
        del backbone
    per_block = {name: (m[4]["saved"] - m[2]["saved"]) / 2 for name, m in paths.items()}
    report = {
        "resolution": args.resolution, "device": str(device),
        "saved_mib_per_block_bf16_adapters": round(per_block["bf16"] / 2**20, 2),
        "saved_mib_per_block_peft_float32_adapters": round(per_block["peft_float32"] / 2**20, 2),
        "saved_ratio_bf16_over_float32": round(per_block["bf16"] / per_block["peft_float32"], 3),
        "step_time_ratio_bf16_over_float32_4_blocks": round(paths["bf16"][4]["seconds"] / paths["peft_float32"][4]["seconds"], 3),
        "base_call_gflop_adapters_off_4_blocks": round(flops["adapters_off"] / 1e9, 2),
        "base_call_gflop_adapter_at_scale_0_4_blocks": round(flops["adapter_at_scale_0"] / 1e9, 2),
    }
    print(json.dumps(report, indent=2))
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
