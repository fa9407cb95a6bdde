"""What each rank of a multi-process test run holds at the end, written to `<run>/rank<r>.json`.

Imported inside processes started by `accelerate launch` (the tests put the repository on PYTHONPATH).
"""

import hashlib
import json
import os
from pathlib import Path

import torch

from trainer.callbacks import Callback


def digest(module) -> str:
    """sha256 over the names and bytes of a module's state dict: equal iff the weights are identical."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return h.hexdigest()


class RankReport(Callback):
    def on_train_end(self, ctx):
        model, ema = ctx.unwrapped_model, ctx.ema_model
        report = {"pid": os.getpid(), "weights": digest(model), "ema": digest(ema) if ema is not None else None,
                  "tied": model.blocks[1].mlp is model.blocks[0].mlp,
                  "ema_tied": ema is not None and ema.blocks[1].mlp is ema.blocks[0].mlp,
                  "world": ctx.accelerator.num_processes, "backend": ctx.accelerator.distributed_type.value}
        plugin = ctx.accelerator.state.deepspeed_plugin
        if plugin is not None:  # what DeepSpeed was configured with (accelerate leaves "auto" to be filled in)
            report["micro_batch"] = plugin.deepspeed_config["train_micro_batch_size_per_gpu"]
        Path(ctx.run_dir, f"rank{ctx.accelerator.process_index}.json").write_text(json.dumps(report))
