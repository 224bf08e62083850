"""Benchmark: peak training memory of the full-size model under each memory option (not a test).

The InstructPix2Pix model of ``configs/dreambooth/train.yaml`` (UNet + VAE + CLIP text encoder, ~1.07 B parameters,
random weights: nothing is downloaded), one training step = one batch of training pairs + one of regularization
pairs (batch 1 each, 256 px), the LatentDiffusion loss and optimizer that ``main.py`` trains with, in float32. Each
case runs in its own process, so peaks do not leak between cases:

    full-adamw          full fine-tune (UNet + text encoder, as the config), AdamW, no gradient checkpointing
    full-adamw-gc       + gradient checkpointing
    full-adamw8bit-gc   + 8-bit AdamW (bitsandbytes)
    lora-r4             LoRA rank 4 on the UNet attention, AdamW
    lora-r16-gc         LoRA rank 16 + gradient checkpointing
    lora-r16-gc-bf16    + frozen VAE and text encoder held in bf16 (--frozen_dtype bf16)

Reported per case: bytes computed from the parameters (weights, gradients, optimizer states), the activations saved
for the backward pass (counted with autograd's saved-tensor hooks during the step's two forward passes), their sum
(the projected GPU peak, without allocator slack and optimizer temporaries), and the measured peak: peak RSS on CPU
(VmHWM, reset after the model is built), ``torch.cuda.max_memory_allocated`` on CUDA. On CPU a case whose projection
exceeds the available RAM is reported as not fitting and not run. The LoRA cases also write their adapter file.

    python bench/bench_memory.py                       # CUDA if available, else CPU
    python bench/bench_memory.py --device cpu --cases lora-r4 lora-r16-gc
    python bench/bench_memory.py --config configs/tiny/dreambooth-tiny.yaml --size 64   # a quick smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procmem import mem_available, peak_rss, reset_peak_rss  # noqa: E402

GIB = 2**30
CASES = {
    "full-adamw": {"lora": None, "gc": False, "optimizer": "adamw"},
    "full-adamw-gc": {"lora": None, "gc": True, "optimizer": "adamw"},
    "full-adamw8bit-gc": {"lora": None, "gc": True, "optimizer": "adamw8bit"},
    "lora-r4": {"lora": 4, "gc": False, "optimizer": "adamw"},
    "lora-r16-gc": {"lora": 16, "gc": True, "optimizer": "adamw"},
    "lora-r16-gc-bf16": {"lora": 16, "gc": True, "optimizer": "adamw", "frozen_dtype": "bf16"},
}


def adamw8bit_state_bytes(numel: int) -> int:
    """bitsandbytes AdamW8bit per tensor: two uint8 moments + a float32 absmax per 256-block each + two 256-entry
    quantisation maps; tensors under 4096 elements keep two float32 moments."""
    if numel < 4096:
        return 8 * numel
    return 2 * numel + 2 * 4 * -(-numel // 256) + 2 * 256 * 4


def model_config(config_path: str, case: dict, tokenizer: str | None):
    from omegaconf import OmegaConf

    config = OmegaConf.load(config_path)
    params = config.model.params
    params.pop("ckpt_path", None)
    params.unet_config.params.use_checkpoint = case["gc"]
    params.optimizer = case["optimizer"]
    if case["lora"]:
        params.lora_config = {"rank": case["lora"]}
    if case.get("frozen_dtype"):
        params.frozen_dtype = case["frozen_dtype"]
    if tokenizer:
        params.cond_stage_config.setdefault("params", {})["tokenizer"] = tokenizer
    return config


def batches(size: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    make = lambda caption: {  # noqa: E731
        "image": (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device),
        "c_concat": (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device),
        "caption": [caption],
    }
    return make("replace the wolf with a sks dog"), make("replace the wolf with a dog")


def loss_of(model, train, reg, step: int):
    import torch

    from ldm.models.diffusion.losses import prior_preservation_loss

    generators = torch.Generator().manual_seed(2 * step), torch.Generator().manual_seed(2 * step + 1)
    (loss_train, _), (loss_reg, _) = model.joint_step(train, reg, generators)  # as training_step
    return prior_preservation_loss(loss_train, loss_reg, model.reg_weight)


def activation_bytes(model, train, reg) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward in one step's forward passes."""
    import torch

    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(model, train, reg, 0)
    del loss
    return sum(seen.values())


def run_case(name: str, args: argparse.Namespace) -> dict:
    """Child process: build, measure, train ``args.steps`` steps, report as a dict."""
    import torch

    from ldm.util import instantiate_from_config

    case = CASES[name]
    device = torch.device(args.device)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = instantiate_from_config(model_config(args.config, case, args.tokenizer).model, learning_rate=1e-6)
    model.to(device).train()
    build_s = time.perf_counter() - start
    trainable = model.trainable_parameters()
    n_trainable = sum(p.numel() for p in trainable)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    states = sum(8 * p.numel() if case["optimizer"] == "adamw" else adamw8bit_state_bytes(p.numel()) for p in trainable)
    train, reg = batches(args.size, device)
    activations = activation_bytes(model, train, reg)
    projected = weights + grads + states + activations
    out = {"case": name, "device": device.type, "params": sum(p.numel() for p in model.parameters()),
           "trainable": n_trainable, "weights": weights, "grads": grads, "states": states,
           "activations": activations, "projected": projected, "build_s": build_s}
    if case["lora"]:
        from ldm.checkpoint import save_safetensors
        from ldm.lora import lora_metadata, split_peft_state

        with tempfile.TemporaryDirectory() as tmp:
            _, adapter = split_peft_state(model.state_dict(), model.lora.lora_alpha)
            path = save_safetensors(adapter, Path(tmp) / "lora.safetensors", lora_metadata(model.lora))
            out["lora_file"] = path.stat().st_size
    more = grads + states + activations  # still to allocate: the weights are resident already
    if device.type == "cpu" and more + 3 * GIB > mem_available():  # RSS runs ~2 GiB over the projection
        out["skipped"] = f"needs {more / GIB:.1f} + ~3 GiB more, {mem_available() / GIB:.1f} GiB RAM available"
        return out

    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out["baseline"] = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        out["baseline"] = peak_rss()
    times = []
    for step in range(args.steps):
        sync()
        start = time.perf_counter()
        loss = loss_of(model, train, reg, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        del loss
    out["step_s"] = times[-1]
    out["peak"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss()
    out["states_measured"] = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                 for t in state.values() if torch.is_tensor(t))
    return out


def row(r: dict) -> str:
    g = lambda key: f"{r[key] / GIB:.2f}" if key in r else "–"  # noqa: E731
    lora = f"{r['lora_file'] / 2**20:.2f} MiB" if "lora_file" in r else "–"
    if "skipped" in r:
        measured, step = f"does not fit: {r['skipped']}", "–"
    elif "error" in r:
        measured, step = f"failed: {r['error']}", "–"
    else:
        measured, step = g("peak"), f"{r['step_s']:.2f} s"
    return (f"| {r['case']} | {r['trainable'] / 1e6:.1f} M | {g('weights')} | {g('grads')} | {g('states')} | "
            f"{g('activations')} | {g('projected')} | {measured} | {step} | {lora} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "dreambooth" / "train.yaml"))
    parser.add_argument("--size", type=int, default=256, help="pixels (latents are size/8)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per case (the first allocates states)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--tokenizer", default=None, help="local CLIP tokenizer folder (machines without open_clip)")
    parser.add_argument("--json", default=None, help="also write the raw results to this file")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (a GPU run may run all at once)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_case(args.child, args)), flush=True)
        return
    results = []
    pending = list(args.cases)
    while pending:  # --jobs N cases at a time (each process has its own peak counters; step times then contend)
        running = []
        for name in pending[: args.jobs]:
            command = [sys.executable, __file__, "--child", name, "--config", args.config, "--size", str(args.size),
                       "--steps", str(args.steps), "--device", args.device]
            if args.tokenizer:
                command += ["--tokenizer", args.tokenizer]
            running.append((name, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})))
        pending = pending[args.jobs:]
        for name, proc in running:
            stdout, stderr = proc.communicate()
            lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
            if lines:
                results.append(json.loads(lines[-1][len("RESULT "):]))
            else:
                results.append({"case": name, "trainable": 0, "error": (stderr.strip().splitlines() or ["?"])[-1][:200]})
            print(row(results[-1]), file=sys.stderr, flush=True)
    import torch

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()}, {os.cpu_count()} cores"
    peak = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM)"
    print(f"{datetime.date.today()}, {where}, torch {torch.__version__}, {Path(args.config).name}, {args.size} px, "
          f"batch 1 train + 1 reg, float32, {args.steps} steps, {args.jobs} case(s) at a time; sizes in GiB; "
          f"measured = {peak}")
    print("| case | trained params | weights | grads | optimizer states | activations | projected peak | measured peak "
          "| step | LoRA file |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(row(r) for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
