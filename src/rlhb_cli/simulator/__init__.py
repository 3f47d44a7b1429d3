"""The simulated online environment and its gold judge.

Imported only by simulate-logs, evaluation and the oracle reward source, never by a training stage:
the hidden user model must stay hidden from everything that learns.
"""
