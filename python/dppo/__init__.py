"""dppo: align language models with preference data using DPO plus direct on-policy penalization.

The data engine is native (``dppo._native``, Rust); models, losses, training, generation and
evaluation are PyTorch / Hugging Face ``transformers``. Submodules are imported on use, so
``import dppo.losses`` does not load the native engine or polars.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dppo")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
