"""A rule-based judge for the online-round tests, importable by name from a separate process."""

from __future__ import annotations

import os


def rule(prompt: str, response: str) -> float:
    """A rule-based reward with ties and failures: the length of the answer modulo 3; an answer whose
    length is 3 modulo 7 makes it fail."""
    if len(response) % 7 == 3:
        raise ValueError("no verdict")
    return float(len(response) % 3)


def counted(prompt: str, response: str) -> float:
    """:func:`rule`, each call first counted as one line in the file ``$CALLS_FILE``."""
    with open(os.environ["CALLS_FILE"], "a") as f:
        f.write("x\n")
    return rule(prompt, response)
