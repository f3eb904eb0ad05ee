"""instructd's training recipe (SFT, reward model, PPO-ptx) on PyTorch + Hugging Face Accelerate: the command
the trainer's external backend runs. See ../README.md."""
