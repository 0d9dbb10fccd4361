"""ONNX Runtime as an optional inference backend of the ``centernet`` detector.

The network part of :class:`~leukolab.models.detection.CenterNet` (uint8 images
-> heatmap logits and side distances) is exported with torch's TorchScript-based
exporter (``dynamo=False``: it needs only the ``onnx`` package, not
``onnxscript``), with dynamic batch, height and width. :class:`OnnxDetector` runs
that graph in an ``onnxruntime`` CPU session and hands the two outputs to the
torch detector's own :meth:`~leukolab.models.detection.CenterNet.decode` (peaks,
boxes, class-wise NMS), so both backends share every step after the network and
give the same boxes up to float rounding. Both packages are the ``onnx`` extra:
``pip install 'leukolab[onnx]'``.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leukolab.errors import LeukolabError
from leukolab.models.detection import CenterNet, Detector, flip_average

INSTALL_HINT = "pip install 'leukolab[onnx]'"
INPUT_NAME = "images"
OUTPUT_NAMES = ("heatmap", "distances")
#: opsets the export accepts: 11 is the oldest that holds the network's ops (dynamic-size resize, ceil-mode
#: pooling), the newest is torch's own limit
MIN_OPSET = 11


def max_opset() -> int:
    """The newest ONNX opset this torch can export (20 where torch does not say)."""
    try:
        from torch.onnx import _constants  # private: may move in a later torch
    except ImportError:
        return 20
    return int(getattr(_constants, "ONNX_MAX_OPSET", 20))


def check_opset(opset: int) -> int:
    """``opset`` if the export supports it, else a one-line :class:`LeukolabError` naming the range."""
    if not MIN_OPSET <= int(opset) <= max_opset():
        raise LeukolabError(f"--opset {opset}: expected an ONNX opset from {MIN_OPSET} to {max_opset()} (e.g. 17)")
    return int(opset)


def _require(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LeukolabError(f"{what} needs the {module} package, which is not installed; {INSTALL_HINT}") from None


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a one-line :class:`LeukolabError` naming the extra to install."""
    return _require("onnxruntime", "--backend onnx")


def _centernet(detector: Detector) -> CenterNet:
    if not isinstance(detector, CenterNet):
        raise LeukolabError(
            f"ONNX export supports the centernet detector; this run holds {type(detector).__name__} "
            "(expected a run trained with --detector centernet)"
        )
    return detector


def export_onnx(
    detector: Detector, example_hw: Sequence[int] = (256, 320), opset: int = 17,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """The serialized ONNX model of a centernet detector's network (dynamic batch, height, width).

    Args:
        detector: a :class:`CenterNet` (moved to the CPU copy-free if it is already there).
        example_hw: the traced input's height and width (multiples of the stride); other sizes work too.
        opset: ONNX opset.
        metadata: extra ``key: value`` pairs stored in the model's ``metadata_props`` (values JSON-encoded).
    """
    net = _centernet(detector)
    check_opset(opset)
    _require("onnx", "ONNX export")
    import onnx

    device = next(net.parameters()).device
    was_training = net.training
    net.cpu().eval()
    example = torch.zeros(1, 3, int(example_hw[0]), int(example_hw[1]), dtype=torch.uint8)
    dims = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shape comparisons; sizes stay dynamic (tested)
            torch.onnx.export(
                net, (example,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: dims, OUTPUT_NAMES[0]: dims, OUTPUT_NAMES[1]: dims},
            )
    except RuntimeError as exc:  # an op this opset cannot express (torch.onnx errors are RuntimeErrors)
        first = (str(exc).splitlines() or [""])[0][:200]
        raise LeukolabError(f"ONNX export with opset {opset} failed ({type(exc).__name__}: {first}); "
                            f"expected it to work with the default opset 17") from None
    finally:
        net.to(device).train(was_training)
    model = onnx.load_model_from_string(buffer.getvalue())
    meta = {"producer": "leukolab", "stride": net.stride, "out_stride": net.out_stride,
            "num_classes": net.num_classes, **(metadata or {})}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = str(key), json.dumps(value)
    return model.SerializeToString()


class OnnxDetector:
    """A centernet detector whose network runs in ONNX Runtime (CPU); decoding stays the torch detector's.

    Offers what :func:`leukolab.models.detection_infer.predict_field` uses of a
    :class:`Detector`: ``stride``, ``num_classes`` and :meth:`predict`.
    """

    #: :meth:`predict` takes ``tta=True``, as :class:`CenterNet`'s does
    supports_tta = True

    def __init__(self, detector: Detector, model: bytes | Path | str | None = None, threads: int | None = None) -> None:
        """Wrap ``detector``; ``model`` is an exported ONNX model (bytes or file), exported now when None.

        ``threads`` is ONNX Runtime's intra-op thread count (default: ``torch.get_num_threads()``,
        so ``OMP_NUM_THREADS`` / ``--threads`` govern both backends alike).
        """
        ort = require_onnxruntime()
        self.detector = _centernet(detector).cpu().eval()
        self.stride = self.detector.stride
        self.num_classes = self.detector.num_classes
        source: bytes | str = export_onnx(self.detector) if model is None else (
            model if isinstance(model, bytes) else str(model))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        # idle threads sleep instead of spinning: a spinning pool kept both cores busy through the torch-side
        # decoding after each run (2 threads, quiet machine: 34.8 -> 26.0 ms a field end to end; README)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            where = "the exported model" if isinstance(source, bytes) else source
            raise LeukolabError(f"{where}: not a loadable ONNX model ({type(exc).__name__}); "
                                "expected a file written by leukolab detect export") from None
        if model is not None:
            self._check_model("the given ONNX model" if isinstance(model, bytes) else str(model))

    def _check_model(self, where: str) -> None:
        """Refuse a given model whose inputs / outputs or recorded classes and strides are not this detector's."""
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= set(outputs):
            raise LeukolabError(f"{where}: inputs {inputs} / outputs {outputs} are not a leukolab centernet's; "
                                f"expected input {INPUT_NAME!r}, outputs {', '.join(OUTPUT_NAMES)} "
                                "(a file written by leukolab detect export)")
        meta = self.session.get_modelmeta().custom_metadata_map
        want = {"num_classes": self.num_classes, "stride": self.stride, "out_stride": self.detector.out_stride}
        for key, value in want.items():
            try:
                found = json.loads(meta[key]) if key in meta else None
            except ValueError:
                found = meta[key]
            if found is not None and found != value:
                raise LeukolabError(f"{where}: exported from another model ({key} {found}, this run's {value}); "
                                    "expected the file leukolab detect export wrote from this run")

    def forward_numpy(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bare network: uint8 ``(B, 3, H, W)`` -> heatmap logits and side distances (px), as arrays."""
        heat, dist = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)})
        return heat, dist

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``CenterNet.forward``: ``(heatmap logits, side distances)`` as tensors."""
        heat, dist = self.forward_numpy(images.cpu().numpy())
        return torch.from_numpy(heat), torch.from_numpy(dist)

    def predict(
        self, images: torch.Tensor, score_threshold: float = 0.05, max_detections: int = 100, nms_iou: float = 0.6,
        tta: bool = False,
    ) -> list[dict[str, torch.Tensor]]:
        """As :meth:`CenterNet.predict`, with the network run by ONNX Runtime."""
        logits, dist = flip_average(self, images) if tta else self(images)
        return self.detector.decode(logits, dist, images.shape[-2:], score_threshold, max_detections, nms_iou)
