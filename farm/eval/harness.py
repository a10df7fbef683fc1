"""lm-eval benchmarks on a trained model (filled in by the harness work)."""
