"""tiny_envs.CompletionEnv as an Atropos environment script: `python completion_env.py serve|process|evaluate ...`."""

from tiny_envs import CompletionEnv

if __name__ == "__main__":
    CompletionEnv.cli()
