"""Train a model: `python train.py --config configs/tiny.yaml [--config configs/optim/dmgd.yaml] key=value ...`.

Rerunning the same command with the same run.dir resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from nl.config import load_config
from nl.distributed.accelerate_env import accelerate_overrides
from nl.train_cli import config_report, default_threads, keys_help, refusal_exit, set_keys, unread_keys


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, epilog=keys_help(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=None,
                    help="a YAML preset (configs/*.yaml); repeat to layer presets, e.g. a model preset then "
                         "configs/optim/m3.yaml (later files win); default: schema defaults")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config and derived figures (parameters, tokens per step, batch "
                         "split per world size), then exit without training or touching run.dir")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 model.dim=256")
    args = ap.parse_intermixed_args(argv)  # overrides may come before, between or after the options

    from nl.data.shards import DataError
    from nl.trainer import USER_ERRORS, train

    try:
        cfg = load_config(args.config, args.overrides)
        explicit = set_keys(args.config, args.overrides)
        launched = accelerate_overrides(cfg, explicit)  # `accelerate launch` flags (README: accelerate)
        if launched:
            cfg = load_config(args.config, [*args.overrides, *launched])
        if os.environ.get("RANK", "0") == "0":
            for warning in unread_keys(cfg, explicit):
                print(f"warning: {warning}", file=sys.stderr)
        if args.print_config:
            report = config_report(cfg)  # on every rank: each validates the same config
            if os.environ.get("RANK", "0") == "0":
                print(report)
            return {}
        threads = default_threads()  # None: OMP_NUM_THREADS is set, and torch follows it
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        summary = train(cfg)
    except (*USER_ERRORS, DataError) as e:
        sys.exit(refusal_exit(f"error: {e}"))  # under torchrun: printed by rank 0, every rank's in the summary
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without the pending save
        sys.exit("error: interrupted before a checkpoint could be saved; rerun the same command to resume "
                 "from the latest checkpoint in run.dir")
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
    if summary["stopped_by"]:  # saved at a step boundary on a signal: 128 + its number (README: Interrupts)
        code = os.environ.get("NL_STOP_EXIT_CODE")  # launch/torchrun.sh sets 0 and exits 128+N itself
        sys.exit(int(code) if code else 128 + signal.Signals[summary["stopped_by"]].value)
    return summary


if __name__ == "__main__":
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # under torchrun: its failure summary shows each failed
        # rank's error, a refusal's one line (refusal_exit) or an exception's traceback (@record, as torchtitan)
        from torch.distributed.elastic.multiprocessing.errors import record

        record(main)()
    else:
        main()
