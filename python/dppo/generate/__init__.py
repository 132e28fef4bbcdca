"""The generation stage: responses of a model to the prompts of a data set (y_gen for ``dppo prep
--ygen``, the answers ``dppo eval`` judges).

- :mod:`~dppo.generate.decoding`: the batched decoding engine (``Decoder``), ``SamplingConfig`` and
  ``pad_rows`` (padded batches, for generation and the judges);
- :mod:`~dppo.generate.run`: prompts, the resumable generation files, ``generate()``.
"""

from dppo._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "generate": "run", "generate_rows": "run", "GenConfig": "run", "DecodeConfig": "run", "PromptRow": "run",
    "load_prompts": "run", "render_prompts": "run", "read_generations": "run", "FlatOptions": "run",
    "generation_settings": "run", "stop_token_ids": "run", "OUTPUT_COLUMNS": "run",
    "Decoder": "decoding", "SamplingConfig": "decoding", "Completion": "decoding", "ENGINES": "decoding",
    "pad_rows": "decoding",
})
