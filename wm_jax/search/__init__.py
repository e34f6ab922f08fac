"""Searching C in M's dreams, and real episodes: the dream (dream), real episodes and the agent's
step (rollout), drift curves (drift), what every trainer shares (checks), the trainers CMA-ES
(evolve) and PPO (ppo), the one search driver and its registry (driver), macro-actions (macro) and
grids of searches as one program (sweep). They import only wm_jax.models and what is below it."""
