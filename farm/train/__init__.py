"""Training stages, one module per kind; each registers its `run(stage, ctx)` by kind."""

from farm.train import cai, dpo, kto, pretrain, pro, rank, reward, rl, sft  # noqa: F401  (registration)
