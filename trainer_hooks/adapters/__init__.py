"""Adapters that attach the goodput recorder to training frameworks.

- `trainer_hooks.adapters.lightning.GoodputCallback`: a Lightning `Callback`.
- `trainer_hooks.adapters.hf.GoodputTrainerCallback`: a Hugging Face `TrainerCallback`.

Import the submodule you need; this package imports neither framework, so `trainer_hooks` keeps
working where they are not installed.
"""
