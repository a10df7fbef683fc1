"""Text scorers (toxicity and more) behind one registry, with a batch interface."""
