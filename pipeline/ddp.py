"""The `torchrun` entry point: DistributedDataParallel training over several processes.

    torchrun --standalone --nproc-per-node 2 -m pipeline.ddp   # gloo on CPU, NCCL on GPUs
    python -m pipeline.ddp                                     # one process, same code

Every rank runs pipeline/train.py's loop on its shard; rank 0 alone creates the MLflow
run, logs the epochs, evaluates, and writes the checkpoint. `mlops train` starts this
when MLOPS_TRAIN_PROCESSES > 1 (pipeline/experiment.py: fit_distributed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import Params, get_settings, load_params
from pipeline.experiment import finish_run
from pipeline.model import choose_device
from pipeline.shards import train_from_shards
from pipeline.tracking import EpochLogger, start_run
from pipeline.train import SplitData, TrainParams, is_distributed, rank, train_model


def main(argv: list[str] | None = None) -> None:
    """Train on data/processed with params.yaml; under torchrun, run DDP across the ranks."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--out", type=Path, help="model directory (default: models/)")
    parser.add_argument("--run-name", default="train")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--train-params", type=Path, help="JSON of TrainParams (else params.yaml)")
    parser.add_argument("--params", type=Path, help="JSON of all Params (else params.yaml)")
    parser.add_argument("--result", type=Path, help="rank 0 writes run id, model URI, metrics")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    settings = get_settings()
    if args.params:
        params = Params.model_validate_json(args.params.read_text())
    else:
        params = load_params(settings.params_path)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = choose_device(settings.device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    master_process = rank() == 0  # MLflow logging, evaluation, checkpointing
    try:
        shards = train_from_shards(params, settings.processed_dir)
        data = SplitData.load(settings.processed_dir, from_shards=shards)
        if args.train_params:
            tp = TrainParams(**json.loads(args.train_params.read_text()))
        else:
            tp = TrainParams.from_params(params, epochs=args.epochs)
        run_id = None
        if master_process:
            run_id = start_run(
                settings,
                params,
                tp.to_dict(),
                args.run_name,
                str(device),
                extra_tags={"world_size": world, "train_data": data.train_from},
            )
        result = train_model(
            data,
            tp,
            device,
            on_epoch=EpochLogger(run_id) if run_id else None,
            show_progress=not args.no_progress,
        )
        if run_id:
            cand = finish_run(settings, run_id, result, data, args.out or settings.models_dir)
            if args.result:
                args.result.write_text(
                    json.dumps(
                        {
                            "run_id": cand.run_id,
                            "model_uri": cand.model_uri,
                            "metrics": cand.metrics,
                        }
                    )
                )
    finally:
        if is_distributed():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
