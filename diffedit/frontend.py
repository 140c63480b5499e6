"""What every command-line front end shares: one-line usage errors, the help formatter, the model / device /
dtype flags and the loading of a model from them.

The ``diffedit`` command (cli.py), the app's subcommand (app.py) and the sweep's own parser (sweep/cli.py) import
it; it imports none of them. Importing it loads no torch: parsers are built before any model.
"""
from __future__ import annotations

import argparse
import sys

PROG = "diffedit"
DTYPES = ("auto", "float32", "float16", "bfloat16")  # precision.DTYPES but float64, and "auto"; without torch
# Knobs whose default is the model's (ModelConfig.edit_defaults): the flag's default is None, filled in from the model.
MODEL_DEFAULTS = {"steps": "unless given, FLUX.1 takes its own: dev 28, schnell 4",
                  "guidance": "unless given, FLUX.1 takes its own: dev 3.5 (embedded), schnell none"}


from .settings import UsageError  # noqa: F401  (front ends raise it; cli.main reports it in one line, exit 2)

def fail(message: str, prog: str = PROG):
    """Write ``<prog>: error: <message>`` on one line and exit with status 2."""
    message = " ".join(str(message).split())  # one line, whatever the exception text held
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line: ``diffedit: error: <problem> (see '<prog> --help')``."""

    def error(self, message):
        fail(f"{message} (see '{self.prog} --help')")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except where there is none or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "default" in text:
            return text
        if action.default == "":
            return text + ' (default: "")'
        return super()._get_help_string(action)


def add_model_args(p, group: str = "model", device_help: str = "torch device: cpu, cuda, cuda:1, mps"):
    """--model, --device, --dtype and --prediction-type, in one argument group."""
    g = p.add_argument_group(group)
    g.add_argument("--model", default="toy", metavar="NAME",
                   help='"toy", a .safetensors/.ckpt file, a diffusers folder or a Hugging Face repo id')
    g.add_argument("--device", default="cpu", help=device_help)
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="precision of the networks (auto: bf16 on a CPU with native bf16, fp16 on CUDA, else fp32)")
    g.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                   help="override what the UNet predicts (default: what the checkpoint says or is detected)")
    return g


def check_device(name: str):
    """A UsageError unless ``name`` is a torch device this machine has."""
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device: unknown device {name!r} (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise UsageError(f"--device: unsupported device {name!r} (use cpu, cuda, cuda:N or mps)")


def load_pipeline(choice, device=None, **options):
    """The DiffEdit of --model / --device / --dtype / --prediction-type: ``choice`` is anything that holds them as
    ``model``, ``device``, ``dtype``, ``prediction_type`` (the parsed flags, a front end's settings); a UsageError
    naming --model if it cannot be loaded. ``device`` overrides ``choice.device`` (a rank's own GPU); ``options`` go
    to ``from_pretrained``."""
    from .checkpoint import CheckpointError
    from .pipeline import DiffEdit
    try:
        return DiffEdit.from_pretrained(choice.model, device=device or choice.device, dtype=choice.dtype,
                                        prediction_type=choice.prediction_type, **options)
    except CheckpointError as e:
        raise model_error(choice.model, e) from None


def model_error(model: str, e: Exception) -> UsageError:
    """A checkpoint's error as the usage error of --model (naming the source once)."""
    return UsageError(f"--model: {e}" if model in str(e) else f"--model {model}: {e}")
