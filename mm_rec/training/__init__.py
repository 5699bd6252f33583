"""Training: recipes, the loop, optimizer and schedule, evaluation, checkpoints, metrics.

    from mm_rec.training import RunConfig, train
    result = train(RunConfig.load("configs/tiny.yaml", ["training.max_steps=100"]), out_dir="runs/x")

    mm_rec.training.config      RunConfig = model + TrainingConfig + DataConfig + DistributedConfig
    mm_rec.training.trainer     train(): the loop, NaN/Inf guard, exact resume
    mm_rec.training.optim       AdamW (fused where available), the warmup + cosine LambdaLR, clipping
    mm_rec.training.evaluate    loss, perplexity, bits per byte
    mm_rec.training.checkpoint  atomic checkpoints, resume lookup, damage detection
    mm_rec.training.metrics     metrics.jsonl, TensorBoard, loss plots
"""

from mm_rec.training.config import DataConfig, DistributedConfig, RunConfig, TrainingConfig
from mm_rec.training.trainer import NonFiniteError, TrainResult, train

__all__ = ["DataConfig", "DistributedConfig", "NonFiniteError", "RunConfig", "TrainResult", "TrainingConfig", "train"]
