"""Training throughput on CUDA (bf16 autocast; DDP over every GPU when there are several)
against the CPU, measured in the same run. Prints samples/s and the ratio.

    python bench/gpu.py [--side 28] [--steps 200] [--batch 256]

Without a GPU it measures the CPU alone and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.model import ModelConfig, build_model


def _throughput(device: torch.device, side: int, steps: int, batch: int, bf16: bool) -> float:
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_features=side * side, num_classes=10, hidden=64, dropout=0.25, image_side=side
    )
    model = build_model(cfg).to(device)
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, side, side, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(10):  # warm-up: kernels, allocator
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def _ddp_worker(rank: int, world: int, args, queue) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    rate = _throughput(torch.device("cuda", rank), args.side, args.steps, args.batch, True)
    if rank == 0:
        queue.put(rate * world)  # every rank processes `batch` samples per step
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=28)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    cpu_steps = max(10, args.steps // 10)
    result = {
        "image": f"{args.side}x{args.side}",
        "batch": args.batch,
        "cpu_samples_per_s": round(
            _throughput(torch.device("cpu"), args.side, cpu_steps, args.batch, False)
        ),
    }
    if not torch.cuda.is_available():
        result["cuda"] = "not available: CPU only"
    else:
        result["gpu"] = torch.cuda.get_device_name(0)
        fp32 = _throughput(torch.device("cuda"), args.side, args.steps, args.batch, False)
        bf16 = _throughput(torch.device("cuda"), args.side, args.steps, args.batch, True)
        result.update(
            cuda_fp32_samples_per_s=round(fp32),
            cuda_bf16_samples_per_s=round(bf16),
            bf16_vs_cpu=round(bf16 / result["cpu_samples_per_s"], 1),
        )
        world = torch.cuda.device_count()
        if world > 1:
            queue = mp.get_context("spawn").SimpleQueue()
            mp.spawn(_ddp_worker, args=(world, args, queue), nprocs=world, join=True)
            ddp = queue.get()
            result.update(
                ddp_gpus=world,
                ddp_bf16_samples_per_s=round(ddp),
                ddp_vs_one_gpu=round(ddp / bf16, 2),
            )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
