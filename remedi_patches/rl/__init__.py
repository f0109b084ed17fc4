"""Reinforcement learning for the RemeDi diffusion LM: rewards, rollouts and the trainer."""
