"""LoRA fine-tuning of a route's local model from its logged cloud answers.

Importing the package is cheap: torch and transformers load only inside a training process
(`trainer.runner`, `trainer.train`), so the gateway can use `trainer.jobs` and
`trainer.adapters` without them.
"""
