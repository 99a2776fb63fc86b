"""Every input a pack node receives, checked against the node's own schema before it runs.

ComfyUI checks widget types, ranges and choices when a prompt is queued, but not all of them on every host: it skips
the inputs a node's ``validate_inputs`` names, 0.3.75 does not check V3 combos, and a socket input accepts whatever
an API prompt links to it. So the node checks again when it runs: one ``ValueError`` naming the node, the input,
what it got and what it takes, before anything is loaded or patched.
"""

from __future__ import annotations

import functools
import math

import torch

from memlearner_core.bounded_text import MESSAGE_LIMIT, bounded, listed, shown


def _tensor(v) -> bool:
    return isinstance(v, torch.Tensor)


# What each socket type is, by what the pack's nodes use of it (duck-typed: hosts and other packs subclass these).
SOCKETS = {
    "LATENT": ("a LATENT (a dict with 'samples')", lambda v: isinstance(v, dict) and _tensor(v.get("samples"))),
    "IMAGE": ("an IMAGE tensor", _tensor),
    "MASK": ("a MASK tensor", _tensor),
    "SIGMAS": ("SIGMAS (a tensor, from a scheduler node)", _tensor),
    "NOISE": ("a NOISE (from Random Noise)", lambda v: callable(getattr(v, "generate_noise", None))),
    "GUIDER": ("a GUIDER (from CFG Guider or Basic Guider)", lambda v: callable(getattr(v, "sample", None))),
    "SAMPLER": ("a SAMPLER (from KSampler Select)", lambda v: callable(getattr(v, "sample", None))),
    "MODEL": ("a MODEL", lambda v: hasattr(v, "model_options") and callable(getattr(v, "clone", None))),
    "VAE": ("a VAE", lambda v: callable(getattr(v, "encode", None)) and callable(getattr(v, "decode", None))),
    "CLIP": ("a CLIP text encoder", lambda v: callable(getattr(v, "tokenize", None))),
    "CONDITIONING": ("a CONDITIONING (from CLIP Text Encode)", lambda v: isinstance(v, list)),
    # the pack's own, for Memory Rollout, whose validate_inputs takes input_types: ComfyUI then skips its link check
    "MEMLEARNER_CAMERA_PATH": ("a camera path (from Camera Path)", lambda v: callable(getattr(v, "poses", None))),
}


def _shown(v) -> str:
    return shown(v, 60) if isinstance(v, (str, int, float, bool)) else type(v).__name__


def problem(kind: str, spec: dict, v) -> str | None:
    """What is wrong with value ``v`` for an input of type ``kind`` declared as ``spec`` (its ``as_dict()``), or
    None. Widgets: type, finite, ``min``/``max``, choices; sockets: ``SOCKETS``; other types are the host's."""
    if kind in ("INT", "FLOAT"):
        number = isinstance(v, int) or (kind == "FLOAT" and isinstance(v, float))
        if isinstance(v, bool) or not number:
            return f"takes {'a whole number' if kind == 'INT' else 'a number'}, not {_shown(v)}"
        if not math.isfinite(v):
            return f"takes a finite number, not {v}"
        low, high = spec.get("min"), spec.get("max")
        if (low is not None and v < low) or (high is not None and v > high):
            return f"is {v}, outside {low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
    elif kind == "BOOLEAN" and not isinstance(v, bool):
        return f"takes true or false, not {_shown(v)}"
    elif kind == "STRING" and not isinstance(v, str):
        return f"takes text, not {_shown(v)}"
    elif kind == "COMBO":
        options = spec.get("options")
        if isinstance(options, (list, tuple)) and options and v not in options:
            return f"is {_shown(v)}, not one of {listed(options, 12)}"
    elif kind in SOCKETS and not SOCKETS[kind][1](v):
        return f"takes {SOCKETS[kind][0]}, not {_shown(v)}: connect the right output to it"
    return None


def input_kind(inp) -> str:
    """An input's type name: ``"COMBO"`` for a combo in either form (``comfy_adapter.combo_input``)."""
    kind = inp.get_io_type()
    return "COMBO" if isinstance(kind, list) else str(kind)


def check_inputs(node_cls, values: dict) -> None:
    """``ValueError`` for the first of ``values`` that the node's schema does not admit (absent or None: the
    node's default)."""
    schema = node_cls.define_schema()  # not GET_SCHEMA: it caches on the class, which ComfyUI locks while running
    for inp in schema.inputs:
        v = values.get(inp.id)
        if v is None:
            continue
        found = problem(input_kind(inp), inp.as_dict(), v)
        if found:
            raise ValueError(f"{schema.display_name or schema.node_id}: input {inp.id} {found}")


def checked(node_cls):
    """The node class with its ``execute`` checking every input first (``check_inputs``) and every error's
    message ``bounded``; returns the class."""
    execute = node_cls.execute.__func__

    @functools.wraps(execute)
    def run(cls, **values):
        check_inputs(cls, values)
        try:
            return execute(cls, **values)
        except Exception as e:
            message = str(e)
            if len(message) <= MESSAGE_LIMIT:
                raise
            # ComfyUI keeps the message with the prompt's history and sends it to every client: never megabytes
            try:
                error = (e.__class__ if isinstance(e, ValueError) else RuntimeError)(bounded(message))
            except Exception:  # an error class that takes other arguments
                error = RuntimeError(bounded(message))
            raise error from None

    node_cls.execute = classmethod(run)
    return node_cls
