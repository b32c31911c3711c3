"""Training engine: typed config, checkpoints, the train/eval loop (single process or DDP)."""
from .config import TrainConfig
from .engine import evaluate, run, throughput

__all__ = ["TrainConfig", "evaluate", "run", "throughput"]
