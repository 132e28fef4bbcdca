"""The training stage: SFT, DPO, SimPO and the DPPO penalties (minll, unll, conll) in one loop.

- :mod:`~dppo.train.config`: every option of ``dppo train`` (``TrainConfig``, ``load_config``);
- :mod:`~dppo.train.registry`: the losses by name, each with its declared options (``LOSSES``,
  ``register_loss``, ``LossSpec``, ``Option``; torch-free), and the ``dppo.losses`` entry points;
- :mod:`~dppo.train.losses`: the losses as pure functions;
- :mod:`~dppo.train.refcache`: reference log-probs computed once and cached beside the shards
  (``score_pairs``: the pairs of a shards folder scored by a reference, for compositions);
- :mod:`~dppo.train.precision`: the precision rule (``training_precision``);
- :mod:`~dppo.train.memory`: the memory plan and the default token budget (``token_budget``);
- :mod:`~dppo.train.checkpoint`: atomic, verifiable checkpoints;
- :mod:`~dppo.train.step`: one micro-batch of examples -> the log-probabilities a loss consumes;
- :mod:`~dppo.train.loop`: ``train()``, top to bottom.
"""

from dppo._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "train": "loop", "DataOrder": "loop", "lr_at": "loop", "alpha_at": "loop", "make_optimizer": "loop", "token_budget": "memory",
    "TrainConfig": "config", "load_config": "config",
    "LOSSES": "losses", "LossConfig": "losses", "LossSpec": "losses", "LogProbs": "losses", "LossOutput": "losses",
    "register_loss": "losses", "Option": "registry",
    "reference_logps": "refcache", "RefLogps": "refcache", "score_pairs": "refcache",
    "training_precision": "precision",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "CheckpointError": "checkpoint",
    "StepInputs": "step", "forward_logps": "step",
})
