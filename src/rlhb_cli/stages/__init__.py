"""The training stages: one module per stage, each a `run(config, stage)` over the run directory."""
