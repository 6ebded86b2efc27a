"""What this machine trains fastest on, and how: the device, the precision and the memory layout. Each is chosen
once, printed at the start of a run, recorded in its run.json, and can be overridden in main_mnist.py's block
(AMP, LAYOUT).

The layout is measured rather than guessed where the measure is clear: on one CPU channels_last trains Net 30%
faster and CompactNet twice as slowly as the plain (contiguous, NCHW) layout. LAYOUT = "auto" times a few training
steps of the run's model in each layout, interleaved and in several rounds, so that a moment of load elsewhere
cannot decide it; where one layout does not win every round by a clear margin, the default for the model's kind
of layers is used. The answer is remembered in a file beside the run folders, so later runs of that model on this
machine use the same layout (and the same seed gives the same metrics) without timing again.
"""
import json
import os
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery.errors import UserError, one_line
from machinery.files import atomic_write, read_small_file

# The memory layouts a run can keep its images, activations and weights in, by the names LAYOUT takes.
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
LAYOUT_CHOICES = ["auto", *LAYOUTS]
REMEMBERED = "fastest.json"  # beside the run folders: the layout chosen per machine, model and batch size
LAYOUT_ROUNDS = 3            # each layout is timed this many times, the two taking turns
LAYOUT_PROBE_SECONDS = 0.3   # one timing runs whole steps until this much time has passed
CLEAR_MARGIN = 1.1           # a measured choice is kept only if it wins every round by at least this factor


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


def random_state_kept(device):
    """A context in which random numbers may be drawn on `device` and the CPU, and after which both generators are
    as they were: what a side task (a figure, a timing, the LR range test) uses so that a run trains the same
    with it or without it."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type)


def sync(device):
    """Waits for the device's queued work, so that a timing ends when the work does (a CPU never queues)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def default_layout(model):
    """The layout for a model when nothing clearer is known, from its kind of layers: contiguous for a model with
    batch normalization, whose CPU kernels are slow in channels_last (CompactNet: half the speed on an AVX2 CPU);
    channels_last for plain convolutions, which oneDNN runs faster so (Net: 12-33% on the same CPU)."""
    has_batch_norm = any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in model.modules())
    return "contiguous" if has_batch_norm else "channels_last"


def training_speed(make_model, layout, batch_size, device, amp, seconds=None):
    """Images per second of whole SGD steps (forward, loss, backward, update) of a new model from make_model() in
    `layout`, on a random batch: two steps to warm up (allocation, kernel selection), then steps until `seconds`
    passed (LAYOUT_PROBE_SECONDS unless given). The random state of the run is left as it was."""
    seconds = LAYOUT_PROBE_SECONDS if seconds is None else seconds
    memory_format = LAYOUTS[layout]
    with random_state_kept(device):
        torch.manual_seed(0)
        model = make_model().to(device, memory_format=memory_format)
        images = torch.randn(batch_size, 1, 28, 28).to(device, memory_format=memory_format)
        labels = torch.randint(0, 10, (batch_size,)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

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


def time_layouts(make_model, batch_size, device, amp, rounds=LAYOUT_ROUNDS):
    """{layout: [images per second of each round]}, the layouts taking turns round after round, so that load that
    comes and goes falls on both. A layout the device has no kernel for is left out, with a note."""
    speeds = {layout: [] for layout in LAYOUTS}
    for _ in range(rounds):
        for layout in list(speeds):
            try:
                speeds[layout].append(training_speed(make_model, layout, batch_size, device, amp))
            except RuntimeError as error:
                print(f"Note: {layout} fails here ({one_line(error)})")
                del speeds[layout]
    return speeds


def clear_winner(speeds):
    """The layout that beat each other one in every round by CLEAR_MARGIN or more; None where none did."""
    for layout, rounds in speeds.items():
        others = [other for name, other in speeds.items() if name != layout]
        if all(all(mine >= CLEAR_MARGIN * theirs for mine, theirs in zip(rounds, other)) for other in others):
            return layout
    return None


def choose_layout(setting, model_name, make_model, batch_size, device, amp, folder, timing=True):
    """(layout, why): the layout a run uses, and a few words on how it was chosen.

    A LAYOUT setting other than "auto" is used as it is. For "auto": the answer remembered in REMEMBERED beside
    `folder` for this machine, torch, precision, model and batch size; else, if `timing`, both layouts timed now (time_layouts), the clear winner kept or, where there is
    none, default_layout; else (a dry run, an evaluation) default_layout, untimed."""
    if setting != "auto":
        return setting, "set by LAYOUT"
    path = os.path.join(os.path.dirname(os.path.abspath(folder)), REMEMBERED)
    key = f"{device_name(device)}; torch {torch.__version__}; {precision_name(amp)}; {model_name}, batch {batch_size}"
    remembered, damaged = read_remembered(path)
    if key in remembered:
        return remembered[key]["layout"], f"chosen here before ({path})"
    with random_state_kept(device):
        default = default_layout(make_model())
    if not timing:
        return default, "the default for its layers: a dry run or an evaluation times nothing"
    speeds = time_layouts(make_model, batch_size, device, amp)
    if not speeds:
        raise UserError(f"{model_name} cannot train a step on {device} in any layout")
    winner = clear_winner(speeds)
    layout = winner or (default if default in speeds else next(iter(speeds)))
    remembered[key] = {"layout": layout, "clear": winner is not None,
                       "images_per_second": {name: [round(v) for v in rounds] for name, rounds in speeds.items()}}
    try:
        atomic_write(path, lambda f: f.write(json.dumps(remembered, indent=2).encode()))
        where = f"remembered in {path}" + (" in place of a damaged file" if damaged else "")
    except OSError as error:  # an unwritable folder costs a few seconds of timing next run, nothing more
        where = f"not remembered: {error.strerror or error}"
    timings = " against ".join(f"{name} {statistics.median(rounds):.0f} img/s" for name, rounds in speeds.items())
    how = "the clear winner" if winner else "no clear winner, so the default for its layers"
    return layout, f"{how}; timed now, median of {LAYOUT_ROUNDS} rounds: {timings}; {where}"


def read_remembered(path):
    """({key: entry} of the remembered choices, whether the file was damaged). A file that is missing, is not a
    plain file of JSON (a link to a device, a FIFO), or holds entries of another shape gives {}: timed again."""
    try:
        remembered = json.loads(read_small_file(path, limit=1 << 20))
    except FileNotFoundError:
        return {}, False
    except (OSError, ValueError):
        return {}, True
    if not isinstance(remembered, dict):
        return {}, True
    good = {key: entry for key, entry in remembered.items()
            if isinstance(entry, dict) and entry.get("layout") in LAYOUTS}
    return good, len(good) != len(remembered)


def choose_precision_and_layout(hp, device, folder, make_model, timing):
    """The run's precision (`amp`, returned) and memory layout, chosen for this machine and printed once. The
    layout chosen replaces "auto" in hp, so run.json and the checkpoint record it: a resumed run keeps it."""
    amp = use_bfloat16(device, hp["AMP"])
    hp["LAYOUT"], why = choose_layout(hp["LAYOUT"], hp["MODEL"], make_model, hp["BATCH_SIZE"], device, amp, folder,
                                      timing)
    unused = " (AMP is on, but bfloat16 is not native here)" if hp["AMP"] and not amp else ""
    print(f"Device: {device_name(device)}; precision: {precision_name(amp)}{unused}\nLayout: {hp['LAYOUT']} ({why})")
    return amp
