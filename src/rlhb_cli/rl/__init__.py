"""The PPO engine (rollout, advantages, update) and the reward sources that make RLHF, RLHBC, RLHB, RLGAF."""
