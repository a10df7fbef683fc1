"""farm: a Ray-distributed experiment farm for alignment fine-tuning studies."""

__version__ = "0.1.0"
