"""The receptive field of each layer of any model of convolutions and poolings, for model_summary's table: how
many input pixels one output pixel sees (RF), and how far apart neighbouring outputs look (jump), as course
students work them out by hand. The layers are found by watching a forward pass, so F.max_pool2d in forward()
counts as much as an nn.Conv2d.
"""
import torch
from torch.overrides import TorchFunctionMode


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class _LayerRecorder(TorchFunctionMode):
    """Sees every torch function a forward pass calls, and keeps the convolutions and poolings, whether a layer
    module calls them or forward() does (F.max_pool2d), with the name of the module whose forward called it."""

    def __init__(self, model):
        super().__init__()
        self.calls, self.stack = [], []
        leaves = [(name, module) for name, module in model.named_modules() if name and not list(module.children())]
        self.hooks = [module.register_forward_pre_hook(lambda *_, name=name: self.stack.append(name) and None)
                      for name, module in leaves]
        self.hooks += [module.register_forward_hook(lambda *_: self.stack.pop() and None) for _, module in leaves]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        geometry = _geometry(name, func, args, kwargs)
        if geometry is not None:
            shape = (out[0] if isinstance(out, tuple) else out).shape
            self.calls.append((self.stack[-1] if self.stack else "forward()", name.lstrip("_"), geometry, shape))
        return out


def _geometry(name, func, args, kwargs):
    """(kernel, stride, padding, dilation) of a convolution or pooling call, per axis (height, width); None for
    anything else."""
    if name == "conv2d":
        values = dict(zip(["input", "weight", "bias", "stride", "padding", "dilation"], args), **kwargs)
        kernel = tuple(values["weight"].shape[-2:])
        padding = values.get("padding", 0)
        if isinstance(padding, str):  # "same" or "valid"
            padding = [(k - 1) // 2 for k in kernel] if padding == "same" else 0
        return kernel, _pair(values.get("stride", 1)), _pair(padding), _pair(values.get("dilation", 1))
    if name in ("max_pool2d_with_indices", "_max_pool2d", "avg_pool2d", "max_pool2d"):
        values = dict(zip(["input", "kernel_size", "stride", "padding", "dilation"], args), **kwargs)
        kernel = _pair(values["kernel_size"])
        stride = values.get("stride") or kernel
        return kernel, _pair(stride), _pair(values.get("padding", 0)), _pair(values.get("dilation", 1))
    if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_max_pool2d", "adaptive_max_pool2d_with_indices"):
        size = tuple(args[0].shape[-2:])
        out = _pair(args[1] if len(args) > 1 else kwargs["output_size"])
        if all(o == 1 for o in out):  # global pooling: one output sees the whole input
            return size, size, (0, 0), (1, 1)
        return tuple(s // o for s, o in zip(size, out)), tuple(s // o for s, o in zip(size, out)), (0, 0), (1, 1)
    return None


def receptive_fields(model, input_size=(1, 28, 28)):
    """[(layer, operation, output shape, RF, jump)] for each convolution and pooling of a forward pass of `model`
    on one input: the receptive field (RF, in input pixels, height x width as one number when square) of one
    output pixel, and the jump (the input pixels between neighbouring outputs). 1x1 convolutions count too."""
    was_training = model.training
    model.eval()
    recorder = _LayerRecorder(model)
    try:
        with torch.no_grad(), recorder:
            model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        for hook in recorder.hooks:
            hook.remove()
        model.train(was_training)
    rf, jump, rows = [1, 1], [1, 1], []
    for layer, operation, (kernel, stride, padding, dilation), shape in recorder.calls:
        for axis in (0, 1):
            rf[axis] += (kernel[axis] - 1) * dilation[axis] * jump[axis]
            jump[axis] *= stride[axis]
        rows.append((layer, f"{operation} {kernel[0]}x{kernel[1]}" + (f"/{stride[0]}" if stride[0] > 1 else ""),
                     "x".join(map(str, shape[1:])), rf[0] if rf[0] == rf[1] else tuple(rf),
                     jump[0] if jump[0] == jump[1] else tuple(jump)))
    return rows


def receptive_field_table(rows):
    """receptive_fields' rows as the lines model_summary prints under torchsummary's table."""
    lines = ["Receptive field of each convolution and pooling (RF: the input pixels one output pixel sees; jump: "
             "the input pixels between neighbouring outputs)",
             f"  {'layer':<14}{'operation':<28}{'output':<12}{'RF':>8}{'jump':>6}"]
    lines += [f"  {layer:<14}{operation:<28}{shape:<12}{str(rf):>8}{str(jump):>6}"
              for layer, operation, shape, rf, jump in rows]
    return "\n".join(lines)
