"""Evaluation harnesses: needle-in-a-haystack and perplexity by position (:mod:`.long_context`)."""

from deepseek_jax.eval.long_context import answer_nll, niah_eval, perplexity_by_position, plot_niah, wilson, write_niah

__all__ = ["answer_nll", "niah_eval", "perplexity_by_position", "plot_niah", "wilson", "write_niah"]
