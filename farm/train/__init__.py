"""Training stages, one module per kind; each registers its `run(stage, ctx)` by kind."""

from farm.train import dpo, pretrain, pro, rank, reward, sft  # noqa: F401  (registration)
