"""tiny_envs.ManagedEnv as an Atropos environment script: `python managed_env.py serve|process|evaluate ...`."""

from tiny_envs import ManagedEnv

if __name__ == "__main__":
    ManagedEnv.cli()
