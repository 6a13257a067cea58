"""tiny_envs.DedicatedEnv as an Atropos environment script: `python dedicated_env.py serve|process|evaluate ...`."""

from tiny_envs import DedicatedEnv

if __name__ == "__main__":
    DedicatedEnv.cli()
