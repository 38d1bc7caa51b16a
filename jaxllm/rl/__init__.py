"""Reinforcement learning from rewards: GRPO and PPO with rollouts from the engine in the
same process (`python -m jaxllm.rl`; `rewards`, `losses`, `rollout`, `loop`)."""
