"""dppo: align language models with preference data using DPO plus direct on-policy penalization.

The library is laid out as the pipeline's stages, each a package that never imports a later one:

    dppo.data      sources -> chat template, truncation, tokens -> memory-mapped shards; micro-batches
    dppo.train     the losses, the reference cache, checkpoints and the training loop
    dppo.generate  the decoding engine and generation files (y_gen, the answers eval judges)
    dppo.eval      judges, win rates, plots
    dppo.demo      the whole pipeline on a built-in task world

beside shared floors that import no stage: ``dppo.engine`` (the native Rust data engine, the only
importer of ``dppo._native``), ``dppo.modeling`` (models and packed log-probabilities),
``dppo.artifacts`` (files, fingerprints, the hub, dtypes and devices), ``dppo.errors`` and
``dppo.synthetic`` (the offline tokenizer, tiny models and schema-exact files the demo and the
tests build). Packages import their submodules on use, so ``import dppo.train`` does not load
torch until a trainer name is used. See ``docs/architecture.md``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dppo")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
