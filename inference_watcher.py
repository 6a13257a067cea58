#!/usr/bin/env python3
"""Watch this inference node's servers and log their health to W&B (or JSON lines).

    python inference_watcher.py --api_addr http://TRAINER:8000 --tp 2 --node_num 0

A thin entry point: the logic is ``atropos_slurm.watch``.  Keep this file next to
``atropos_slurm.py`` when vendoring the two onto a cluster.  It names itself
``inference-node-wandb-watcher``, its console script's name (``pip install .``) and Atropos'.
"""

import sys

import atropos_slurm


def main(argv=None) -> int:
    parser = atropos_slurm.watcher_parser("inference-node-wandb-watcher", __doc__.split("\n\n")[0])
    return atropos_slurm.main(argv, parser)


if __name__ == "__main__":
    sys.exit(main())
