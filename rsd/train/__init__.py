"""Training: the RFSQ tokenizer (and, later, the heads)."""

from rsd.train.tokenizer import SplitMetrics, TokenizerFitReport, fit_tokenizer, smooth_trajectories

__all__ = ["SplitMetrics", "TokenizerFitReport", "fit_tokenizer", "smooth_trajectories"]
