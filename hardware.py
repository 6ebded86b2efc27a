"""What this machine trains fastest on, and how: the device, the precision and the memory layout. Each is chosen
once, printed at the start of a run, recorded in its run.json, and can be overridden in main_mnist.py's block
(AMP, LAYOUT).

The layout is measured rather than guessed: on one CPU channels_last trains Net 30% faster and CompactNet twice
as slowly as the plain (contiguous, NCHW) layout; on another it is the other way round. So LAYOUT = "auto" times
a few training steps of the run's model in each layout and keeps the faster; the answer is remembered in a file
beside the run folders, so later runs of that model on this machine use the same layout (and the same seed gives
the same metrics) without timing again.
"""
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

# The memory layouts a run can keep its images, activations and weights in, by the names LAYOUT takes.
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
LAYOUT_CHOICES = ["auto", *LAYOUTS]
REMEMBERED = "fastest.json"  # beside the run folders: the layout timed fastest, per machine, model and batch size
LAYOUT_PROBE_SECONDS = 0.5   # the timing of a layout runs whole steps until this much time has passed


def pick_device():
    """CUDA if there is a GPU, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name(device):
    """The device in words, as run.json records it: the GPU's name, or the CPU's with its vector instructions
    (torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ...) and its threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({_processor()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    return device.type


def _processor():
    """The CPU's model name where Linux tells it (platform.processor() is often empty there)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0]
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def bfloat16_is_fast(device):
    """Whether bfloat16 autocast speeds this device up: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX.

    Elsewhere (older CPUs, MPS) bf16 would be emulated or untested, so training stays in float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, name, lambda: False)()
                   for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def use_bfloat16(device, amp_setting):
    """The run's precision, decided once and passed down as `amp`: bfloat16 autocast where the AMP setting asks
    for it and the device runs it natively (bfloat16_is_fast), else float32."""
    return bool(amp_setting) and bfloat16_is_fast(device)


def precision_name(amp):
    return "bfloat16 autocast" if amp else "float32"


def autocast(device, amp):
    """bfloat16 autocast for the forward pass if `amp` (use_bfloat16's answer), else float32 as it is.

    bfloat16 has float32's range, so no loss scaling is needed."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp)


def training_speed(model_class, layout, batch_size, device, amp, seconds=LAYOUT_PROBE_SECONDS):
    """Images per second of whole SGD steps (forward, loss, backward, update) of a new `model_class` in `layout`,
    on a random batch: two steps to warm up (allocation, kernel selection), then steps until `seconds` passed.
    Draws its numbers from a generator of its own, so a run's random state is the same with it or without."""
    generator = torch.Generator().manual_seed(0)
    memory_format = LAYOUTS[layout]
    with torch.random.fork_rng(devices=[]):  # the model's initialisation draws from the global generator
        model = model_class().to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(batch_size, 1, 28, 28, generator=generator).to(device, memory_format=memory_format)
    labels = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            output = model(images)
        F.cross_entropy(output.float(), labels).backward()  # its cost is nll_loss's on log-probabilities too
        optimizer.step()

    for _ in range(2):
        step()
    sync(device)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        sync(device)
        steps += 1
    return steps * batch_size / (time.perf_counter() - start)


def sync(device):
    """Waits for the device's queued work, so that a timing ends when the work does (a CPU never queues)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def choose_layout(setting, model_name, model_class, batch_size, device, amp, folder, timing=True):
    """(layout, why): the layout a run uses, and a few words on how it was chosen.

    A LAYOUT setting other than "auto" is used as it is. For "auto": the answer remembered in REMEMBERED beside
    `folder` for this machine, torch, precision, model and batch size; else, if `timing`, both layouts timed now
    (training_speed) and the faster remembered; else (a dry run or an evaluation, which time nothing)
    channels_last."""
    from utils import UserError, atomic_write, first_line  # here, not at the top: utils imports this module for autocast
    if setting != "auto":
        return setting, "set by LAYOUT"
    path = os.path.join(os.path.dirname(os.path.abspath(folder)), REMEMBERED)
    key = (f"{device_name(device)}; torch {torch.__version__}; {precision_name(amp)}; "
           f"{model_name}, batch {batch_size}")
    remembered = _read_remembered(path)
    if key in remembered and remembered[key].get("layout") in LAYOUTS:
        return remembered[key]["layout"], f"timed fastest here before ({path})"
    if not timing:
        return "channels_last", "the default: not timed in a dry run or an evaluation"
    speeds = {}
    for layout in LAYOUTS:
        try:
            speeds[layout] = training_speed(model_class, layout, batch_size, device, amp)
        except RuntimeError as error:  # a device without a kernel for this layout: the other one it is
            print(f"Note: {layout} fails here ({first_line(error)})")
    if not speeds:
        raise UserError(f"{model_name} cannot train a step on {device} in any layout")
    fastest = max(speeds, key=speeds.get)
    remembered[key] = {"layout": fastest, "images_per_second": {name: round(v) for name, v in speeds.items()}}
    try:
        atomic_write(path, lambda f: f.write(json.dumps(remembered, indent=2).encode()))
        where = f"remembered in {path}"
    except OSError as error:  # an unwritable folder costs a few seconds of timing next run, nothing more
        where = f"not remembered: {error.strerror or error}"
    timings = " against ".join(f"{name} {speed:.0f} img/s" for name, speed in speeds.items())
    return fastest, f"timed now: {timings}; {where}"


def _read_remembered(path):
    """The remembered choices, {} if there are none yet, or if the file is damaged (they are timed again)."""
    try:
        with open(path, encoding="utf-8") as f:
            remembered = json.load(f)
        return remembered if isinstance(remembered, dict) else {}
    except (OSError, ValueError):
        return {}
