"""Scoring text with a model: `scoring` (sliding-window loss and perplexity) and `scores_out`
(a corpus ranked by that loss). `python -m jaxllm.eval` is the command (`__main__`)."""
