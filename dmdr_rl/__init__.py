"""dmdr_rl: Distribution Matching Distillation meets Reinforcement Learning for text-to-image flow models.

The core library: flow-matching math, evaluation and the embedded toy world. It imports without Ray.
"""

__version__ = "0.1.0"
