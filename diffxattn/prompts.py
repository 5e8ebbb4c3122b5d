"""Old name of `diffxattn.prompt_syntax` (weight and step-schedule syntax) and of the word/token alignment now
in `diffxattn.conditioning` (before #20); kept so existing imports still work."""

from .conditioning import token_weights, word_token_map
from .prompt_syntax import (MAX_WEIGHT, MIN_WEIGHT, PromptSyntaxError, WeightedSpan, clean_text, parse_schedule,
                            parse_weights)

Run = WeightedSpan  # the old name of a weighted span of prompt text

__all__ = ["MAX_WEIGHT", "MIN_WEIGHT", "PromptSyntaxError", "Run", "WeightedSpan", "clean_text", "parse_schedule",
           "parse_weights", "token_weights", "word_token_map"]
