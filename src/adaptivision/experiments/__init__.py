"""The paper's comparisons as runnable experiments (``adaptivision experiment``) and reports."""
from .registry import EXPERIMENTS, Cell, Experiment
from .report import report
from .runner import run_experiment

__all__ = ["EXPERIMENTS", "Cell", "Experiment", "report", "run_experiment"]
