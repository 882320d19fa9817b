"""Evaluation: feature extractors, metrics, cached reference statistics, and the `evaluate` entry point."""
from .metrics import fid_from_features, frechet_distance, inception_score, precision_recall

__all__ = ["fid_from_features", "frechet_distance", "inception_score", "precision_recall"]
