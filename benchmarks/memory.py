"""Weight memory of generator + critic: both LoRA adapters on one shared frozen base (what
`TransformerBackbone` does) vs two copies of the base, each with its own adapter, vs a fully
fine-tuned generator (a trainable copy + the frozen base for the critic).

    python benchmarks/memory.py                    # the tiny SD3 transformer, SD3-Medium- and FLUX.1-dev-shaped ones
    python benchmarks/memory.py --device cuda      # also what the GPU's allocator holds for each layout

Bytes are counted from the parameters the objects really hold (each storage once), built with the
project's own adapter code: the tiny model is allocated; the SD3-Medium-shaped one (2B parameters) and
the FLUX.1-dev-shaped one (12B) are built on the `meta` device, which has the same parameters and no
allocation. AdamW state (two
fp32 moments per trainable parameter) is listed apart. With `--device cuda` each layout of the
SD3-Medium shape is also built on the GPU, one at a time, and the allocator's growth is reported beside
the count (`*_allocated`); the FLUX.1-dev shape is counted only.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_report  # noqa: E402
from dmdr_rl.backbone import TransformerBackbone  # noqa: E402
from dmdr_rl.flux import FLUX_DEV_TRANSFORMER  # noqa: E402
from dmdr_rl.sd3 import SD3_MEDIUM_TRANSFORMER  # noqa: E402


def storage_bytes(modules) -> int:
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            key = (p.device.type, p.data_ptr()) if p.device.type != "meta" else id(p)
            if key not in seen:
                seen.add(key)
                total += p.numel() * p.element_size()
    return total


def trainable_bytes_fp32(backbone, names) -> int:
    return sum(p.numel() * 4 for name in names for p in backbone.trainable_parameters(name))


def layouts(make_transformer, generator_rank: int, critic_rank: int, dtype: torch.dtype) -> dict:
    """name -> build(): (the modules holding the layout's weights, its trained adapters' names, the backbone)."""
    def backbone():
        return TransformerBackbone(make_transformer().to(dtype), None, lambda x: x)

    def shared():
        b = backbone()
        b.add_lora("generator", generator_rank, generator_rank * 2)
        b.add_lora("critic", critic_rank, critic_rank)
        return [b.transformer], b

    def two_copies():
        first, second = backbone(), backbone()
        first.add_lora("generator", generator_rank, generator_rank * 2)
        second.add_lora("critic", critic_rank, critic_rank)
        return [first.transformer, second.transformer], None

    def full_copy():
        b = backbone()
        b.add_full_copy("generator")
        b.add_lora("critic", critic_rank, critic_rank)
        return [b.transformer, *b._copies.values()], b

    return {"shared_base_two_loras": shared, "two_copies_one_lora_each": two_copies,
            "full_generator_copy_plus_critic_lora": full_copy}


def measure(make_transformer, generator_rank: int, critic_rank: int, dtype: torch.dtype, allocated_on=None) -> dict:
    """Bytes each layout holds, counted; `allocated_on` (a CUDA device): also what the allocator grew by
    while the layout was built there (`make_transformer` must then build on that device)."""
    row = {"base_weights": storage_bytes([make_transformer().to(dtype)])}
    for name, build in layouts(make_transformer, generator_rank, critic_rank, dtype).items():
        before = torch.cuda.memory_allocated(allocated_on) if allocated_on is not None else 0
        modules, trained = build()
        row[name] = storage_bytes(modules)
        if allocated_on is not None:
            row[f"{name}_allocated"] = torch.cuda.memory_allocated(allocated_on) - before
        if name == "shared_base_two_loras":
            row["adamw_state_loras"] = 2 * trainable_bytes_fp32(trained, ["generator", "critic"])
        if name == "full_generator_copy_plus_critic_lora":
            row["adamw_state_full_generator"] = 2 * trainable_bytes_fp32(trained, ["generator", "critic"])
        del modules, trained
        if allocated_on is not None:
            torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    from dmdr_rl.cli import command_summary

    p = argparse.ArgumentParser(description=command_summary(__doc__))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--device", default="meta", help="meta (count only, the default) or cuda (count and allocate)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from dmdr_rl.tiny import tiny_sd3_pipeline

    tiny = tiny_sd3_pipeline().transformer

    def medium():
        with torch.device(device):
            return SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER)

    def flux_dev():
        with torch.device("meta"):
            return FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)

    report = {
        "tiny SD3 (fp32, LoRA r16/r16)": measure(lambda: copy.deepcopy(tiny), 16, 16, torch.float32),
        "SD3-Medium shape (bf16, LoRA r64/r32)": measure(medium, 64, 32, torch.bfloat16,
                                                         device if device.type == "cuda" else None),
        "FLUX.1-dev shape (bf16, LoRA r64/r32)": measure(flux_dev, 64, 32, torch.bfloat16),
    }
    for name, row in report.items():
        mib = {k: v / 2**20 for k, v in row.items()}
        print(f"\n{name}: base {mib['base_weights']:,.1f} MiB")
        print(f"  generator + critic LoRA on one shared base: {mib['shared_base_two_loras']:,.1f} MiB")
        print(f"  two base copies, one LoRA each:             {mib['two_copies_one_lora_each']:,.1f} MiB "
              f"({row['two_copies_one_lora_each'] / row['shared_base_two_loras']:.2f}x)")
        print(f"  full-copy generator + critic LoRA:          {mib['full_generator_copy_plus_critic_lora']:,.1f} MiB "
              f"(+ AdamW state {mib['adamw_state_full_generator']:,.1f} MiB vs {mib['adamw_state_loras']:,.1f} MiB for LoRAs)")
        allocated = {k: v for k, v in mib.items() if k.endswith("_allocated")}
        if allocated:
            print("  allocated on the GPU: " + ", ".join(f"{k.removesuffix('_allocated')} {v:,.1f} MiB" for k, v in allocated.items()))
            # the counts are parameters; the allocator also holds each base's buffers (SD3's pos_embed: 108 MiB
            # in bf16 at SD3-Medium's size), once per base copy
            print("  (allocated = counted + each base copy's buffers, e.g. SD3's positional embedding)")
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
