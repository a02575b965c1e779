"""Drafter training pipeline: prompts -> target-regenerated responses -> captured target features
-> training with the base-anchored curriculum -> a checkpoint in the public layout.
Entry point: `python -m domino_backend.training --help`."""
