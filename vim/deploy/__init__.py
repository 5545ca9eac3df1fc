"""Deploy vim backbones: ONNX models, ``torch.export`` programs and AOTInductor packages, for images, video and points.

API::

    from vim.deploy import load_model, export_onnx, export_program, export_aoti

    model = load_model("vim_tiny_patch16_224", checkpoint="vim_t_midclstok_76p1acc.pth", img_size=512)
    export_onnx(model, "vim_t.onnx")            # input "images" (batch, 3, 512, 512), output "logits"; batch dynamic
    program = export_program(model)             # torch.export; each block's scan stays one vim::selective_scan_fwd node
    export_aoti(model, "vim_t.pt2")             # AOTInductor package that runs without vim installed

    session = onnxruntime.InferenceSession("vim_t.onnx")
    logits = session.run(None, {"images": images.numpy()})[0]
    runner = torch._inductor.aoti_load_package("vim_t.pt2")
    logits = runner(images)

Command line: ``vimkit export --format onnx|torch_export|aoti --model NAME [--ckpt FILE] --out FILE`` (see
:mod:`vim.deploy.cli`; :func:`export_model` is the same in Python).

Any of vim's backbones (a :class:`~vim.models.timm_api.TimmBackbone`: a flat or hierarchical trunk) exports through
its input contract:
:class:`~vim.models.VisionMamba` takes images ``(B, C, H, W)``, :class:`~vim.models.video_mamba.VideoMamba` clips
``(B, C, T, H, W)`` and :class:`~vim.models.point_mamba.PointMamba` clouds ``(B, N, 3)``; the graph's input is named
after the family's ``modality``, and a family with an ``export_refusal`` is refused with its reason. Every export has a
fixed input size (the model's nominal one, changed by :func:`set_input_size`, unless ``input_size`` says otherwise)
and a dynamic batch axis. A model keeps its classifier (output ``logits``) or, loaded with ``head=False``, outputs its
pooled pre-logits features (``features``, timm's ``num_classes=0``).

How the selective scan is exported:

* ONNX: the ``vim::selective_scan_fwd`` op is replaced by
  :func:`vim.kernels.scan_decomposition.decomposed_scan_forward`, standard ops around one ONNX ``Scan``
  loop per block, and the fused conv + SiLU (``vim::conv1d_silu_fwd``) and add + norm
  (``vim::add_norm_fwd``) ops by their PyTorch references (:data:`VIM_OP_DECOMPOSITIONS`), so the file
  uses the default ONNX domain only. PointMamba's tokenizer is part of the
  same graph: farthest point sampling is unrolled over its G centres, the kNN distances are written as
  differences (ONNX has no ``cdist``) and the space-filling-curve sort is ONNX ``TopK``, whose ties keep
  index order as ``argsort(stable=True)`` does.
* ``torch.export``: the scan op stays one node per block (as do the fused conv + SiLU and add + norm
  ops); running or loading the program needs ``import vim`` (which registers the ops) in that process.
* AOTInductor: by default vim's ops are decomposed as for ONNX (Inductor lowers the scan loop to a
  ``while_loop`` in the generated C++), so the package loads and runs in a process that never imports
  vim. With ``keep_vim_ops=True`` the package calls the ops instead, with vim's fast kernels: PyTorch
  then serializes them as calls through its dispatcher, which finds a ``torch.library.custom_op`` only
  after ``import vim`` in a Python process (loading fails otherwise, and such a package cannot run
  from C++ alone).

One job per module: :mod:`~vim.deploy.model` (loading, sizing, the exportable check), :mod:`~vim.deploy.program`
(``torch.export``), :mod:`~vim.deploy.onnx`, :mod:`~vim.deploy.aoti`, :mod:`~vim.deploy.safetensors` (a run's weights
for timm) and :mod:`~vim.deploy.cli` (``vimkit export``).
"""

from __future__ import annotations

from .aoti import export_aoti
from .cli import ExportOptions, ModelSource, export_model
from .model import exportable, load_model, nominal_input_size, set_input_size
from .onnx import DEFAULT_OPSET, ONNX_DECOMPOSITIONS, ONNX_OPSETS, export_onnx
from .program import SCAN_OP, VIM_OP_DECOMPOSITIONS, decompose_scan, example_input, export_program, save_program
from .safetensors import export_safetensors

__all__ = [
    "DEFAULT_OPSET",
    "ONNX_DECOMPOSITIONS",
    "ONNX_OPSETS",
    "SCAN_OP",
    "VIM_OP_DECOMPOSITIONS",
    "ExportOptions",
    "ModelSource",
    "decompose_scan",
    "example_input",
    "export_aoti",
    "export_model",
    "export_onnx",
    "export_program",
    "export_safetensors",
    "exportable",
    "load_model",
    "nominal_input_size",
    "save_program",
    "set_input_size",
]
