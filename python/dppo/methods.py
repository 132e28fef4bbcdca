"""The training methods by name (torch-free, so that the command line starts fast)."""

METHODS = ("sft", "dpo", "simpo", "minll", "unll", "conll")
