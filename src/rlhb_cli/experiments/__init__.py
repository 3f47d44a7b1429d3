"""Experiment recipes: the paper's claims as YAML (experiments/NAME.yaml), run as a grid of stages and seeds,
judged claim by claim. `recipe` reads and checks a recipe, `plan` lays out and runs its steps, `results`
collects each arm's figures and writes results.md, `verdicts` holds the rule of each kind of claim."""
