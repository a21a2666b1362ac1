"""Real-bogus CNNs: stamp sets, normalisation, models, training, evaluation, saliency, inference.

Submodules are imported on demand (``from classifier.infer import Scorer``) so that importing
``classifier`` stays cheap; only NumPy and torch are needed by the core modules.
"""

__all__ = ["data", "normalize", "models", "train", "evaluate", "saliency", "infer", "autoscan", "synthetic"]
