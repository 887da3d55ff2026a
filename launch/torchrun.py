"""torchrun (`python -m torch.distributed.run`, same arguments), minus torchrun's own traceback when a rank
fails: its summary of the failed ranks is printed alone (each rank's refusal line or traceback, the root
cause last), exit status 1 as before. launch/torchrun.sh and launch/slurm.sbatch start the ranks with it.
Any other error of torchrun itself (e.g. a rendezvous that fails) keeps its traceback."""

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

if __name__ == "__main__":
    try:
        run(parse_args(sys.argv[1:]))
    except ChildFailedError as e:  # its traceback is torchrun's call stack (run -> launch_agent), no rank's
        sys.exit(e.format_msg())
