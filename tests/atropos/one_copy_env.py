"""tiny_envs.ManagedEnv whose trajectories also record, in the file ``ONE_COPY_OUT``, whether
``BaseEnv`` built this module's own ``atropos_slurm.ServerManager`` and whether ``except
atropos_slurm.AtroposSlurmError`` catches the manager's errors.  Under ``python -m atropos_slurm
run-env`` the module runs as ``__main__`` while this script imports ``atropos_slurm``: both
must be one and the same module's classes."""

import json
import os

import atropos_slurm
from tiny_envs import ManagedEnv


class OneCopyEnv(ManagedEnv):
    async def collect_trajectories(self, item):
        try:
            await self.server.tokens_and_logprobs_completion(input_ids=[-1], max_tokens=1)
            caught = "no error"
        except atropos_slurm.AtroposSlurmError as e:
            caught = type(e).__name__
        except Exception as e:  # noqa: BLE001 - what this script reports
            caught = f"missed {type(e).__module__}.{type(e).__name__}"
        with open(os.environ["ONE_COPY_OUT"], "a") as f:
            f.write(json.dumps({"manager": f"{type(self.server).__module__}.{type(self.server).__name__}",
                                "own_class": type(self.server) is atropos_slurm.ServerManager,
                                "caught": caught}) + "\n")
        return await super().collect_trajectories(item)


if __name__ == "__main__":
    OneCopyEnv.cli()
