"""Training engine: typed config (config.py), processes (distributed.py), what a run builds
(build.py), evaluation (evaluate.py) and the train loop (engine.py; single process or DDP)."""
from ..timing import throughput
from .config import TrainConfig
from .engine import run
from .evaluate import evaluate

__all__ = ["TrainConfig", "evaluate", "run", "throughput"]
