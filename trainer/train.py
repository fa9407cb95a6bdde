"""Train a ViT from a recipe.

    accelerate launch trainer/train.py --recipe recipes/vit_b.yaml [--set key=value ...]
        [--output DIR] [--resume auto|PATH]
    python trainer/train.py --recipe recipes/demo_digits.yaml          # one process
    python trainer/train.py --recipe recipes/vit_b.yaml --print-recipe # resolved recipe, no training
    python trainer/train.py --recipe R.yaml --eval-only --set model.checkpoint=PATH [eval.pe_scale=0.5]
                                                                       # score a trained model (no training)

Exit codes: 0 finished or preempted (a checkpoint was saved; the message says how to resume),
1 stopped on a non-finite loss, gradient norm or weights (the message names the last good
checkpoint), 2 bad input (recipe, path, data, run dir, checkpoint), 3 out of disk space (the run is
intact: free space and `--resume auto`), 130 interrupted by a second Ctrl-C (the step in
progress is not saved; the previous checkpoint is). Under `accelerate launch` the launcher's own exit code is
what a shell sees: see "Faults and what survives them" in the README.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python trainer/train.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import add_recipe_arguments, exit_on_user_error, load_recipe_from_args
from trainer.recipe import RecipeError, dump_recipe
from trainer.run_dir import RunDir, default_run_dir

NONFINITE_EXIT_CODE = 1
DISK_FULL_EXIT_CODE = 3
INTERRUPTED_EXIT_CODE = 130  # what a shell reports for a process ended by SIGINT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(p)
    p.add_argument("--output", metavar="DIR", help="run directory (default: train.output_dir or runs/<recipe>)")
    p.add_argument("--resume", metavar="auto|PATH", help="resume from the newest checkpoint (auto) or PATH")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate model.checkpoint (at eval.pe_scale) instead of training; see trainer/evaluate.py")
    return p.parse_args(argv)


def resume_command(args: argparse.Namespace, run_dir: Path, num_processes: int, num_machines: int) -> str:
    """The exact command that continues this run."""
    launched = "LOCAL_RANK" in os.environ or any(k.startswith("ACCELERATE_") for k in os.environ)
    if launched or num_processes > 1:
        launcher = ["accelerate", "launch", "--num_processes", str(num_processes)]
        if num_machines > 1:
            launcher += ["--num_machines", str(num_machines), "--machine_rank", "<rank>",
                         "--main_process_ip", "<ip>"]
    else:
        launcher = ["python"]
    command = [*launcher, "trainer/train.py", "--recipe", args.recipe]
    if args.overrides:
        command += ["--set", *args.overrides]
    return shlex.join([*command, "--output", str(run_dir), "--resume", "auto"]).replace("'<", "<").replace(">'", ">")


def report(result, args: argparse.Namespace, accelerator_state) -> None:
    run_dir = result.run_dir
    if result.status == "preempted":
        print(f"stopped by {result.stop_signal} at step {result.state.step} ({epoch_position(result.state)}); "
              f"checkpoint saved: {result.last_checkpoint}\nresume with:\n  "
              f"{resume_command(args, run_dir, accelerator_state.num_processes, _num_machines())}")
    else:
        raw = next((e for e in reversed(result.state.evals)), None)
        if raw is not None:
            ema = f"  top1_ema {raw['top1_ema']:.2f}" if "top1_ema" in raw else ""
            print(f"{result.status} at step {result.state.step}: top1 {raw['top1']:.2f}{ema}")
    tb = RunDir(run_dir).tensorboard
    print(f"run dir: {run_dir}\nTensorBoard logs: {tb}\n  tensorboard --logdir {shlex.quote(str(tb))}")


def epoch_position(state) -> str:
    """Where in training a step is, 1-based as the console's epoch lines are."""
    if state.batch_in_epoch == 0:
        return f"end of epoch {state.epoch}"
    return f"in epoch {state.epoch + 1}"


def evaluate_only(recipe, run_dir: Path) -> None:
    from accelerate import PartialState

    from trainer.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(recipe, run_dir)
    if PartialState().is_main_process:
        m, phases = result.metrics, result.phases
        cliff = "n/a" if phases["cliff_size"] is None else f"{phases['cliff_size']:.4f}"
        print(f"evaluated {result.checkpoint} with pe_scale {result.pe_scale:g}: top1 {m['top1']:.2f}  "
              f"top5 {m['top5']:.2f}  cliff_size {cliff} (cliff_end {phases['cliff_end']})\nrun dir: {run_dir}")


def _num_machines() -> int:
    return int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("NUM_MACHINES", "1")))


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = load_recipe_from_args(args)
    if args.print_recipe:
        print(dump_recipe(recipe, header=f"resolved from {args.recipe}"), end="")
        return
    from accelerate import PartialState

    run_dir = default_run_dir(recipe, args.recipe, args.output)
    if args.eval_only:
        evaluate_only(recipe, run_dir)
        return
    if recipe.eval.pe_scale != 1.0:
        raise RecipeError(f"eval.pe_scale = {recipe.eval.pe_scale}: a scaled position embedding is an "
                          "evaluation-only experiment; add --eval-only (training evaluates at 1.0)")
    from trainer.checkpoint import DiskFullError
    from trainer.host_memory import keep_freed_memory_for_reuse
    from trainer.loop import NonFiniteLossError, train

    keep_freed_memory_for_reuse()

    try:
        result = train(recipe, run_dir, resume=args.resume)
    except KeyboardInterrupt:  # the second Ctrl-C: stop now, without the step's checkpoint
        if PartialState().is_main_process:
            print(f"error: interrupted (Ctrl-C twice): the step in progress was not saved; continue from the last "
                  f"checkpoint with --resume auto (run dir {run_dir})", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except (NonFiniteLossError, DiskFullError) as e:
        if PartialState().is_main_process:
            print(f"error: {e.strerror if isinstance(e, DiskFullError) else e}", file=sys.stderr)
        sys.exit(NONFINITE_EXIT_CODE if isinstance(e, NonFiniteLossError) else DISK_FULL_EXIT_CODE)
    state = PartialState()
    if state.is_main_process:
        report(result, args, state)


if __name__ == "__main__":
    main()
