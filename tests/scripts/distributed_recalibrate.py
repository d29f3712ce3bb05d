"""Run under ``accelerate launch --num_processes 2 --cpu``: prune, recalibrate with Accelerate, write per-rank results.

Used by tests/test_recalibrate.py::test_accelerate_two_processes.
"""
import sys
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

import timm_deprune as td


def main(out: Path) -> None:
    from timm_deprune.kernels.backend import backend_available

    # conftest.PACKAGE_PROBE's line: the parent checks each rank imported its timm_deprune and native backend
    print("timm_deprune at", td.__file__, "native", backend_available(), flush=True)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)  # the same dense init on every rank
    dense = timm.create_model("mobilenetv2_050", num_classes=4)
    res = td.prune(dense, td.DepruneConfig.deprune_bh(dw_ratio=0.71, pw_ratio=0.3), input_size=(3, 32, 32))
    save_file({k: v.to(torch.uint8) for k, v in res.masks.items()}, str(out / f"masks_rank{rank}.safetensors"))
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 3, 32, 32, generator=gen), torch.arange(32) % 4)
    loader = DataLoader(data, batch_size=8, shuffle=True)
    td.recalibrate(res.model, loader, td.RecalibrateConfig(epochs=1, lr=1e-3, progress=False), accelerator=accelerator)
    model = accelerator.unwrap_model(res.model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"state_rank{rank}.safetensors"))
    if accelerator.is_main_process:
        td.save_pretrained(model, out / "model")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
