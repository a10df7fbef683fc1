"""The SafeNLP safety score (filled in by the safety-score work)."""
