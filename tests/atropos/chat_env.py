"""tiny_envs.ChatEnv as an Atropos environment script: `python chat_env.py serve|process|evaluate ...`."""

from tiny_envs import ChatEnv

if __name__ == "__main__":
    ChatEnv.cli()
