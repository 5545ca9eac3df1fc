"""Deployment (vim.deploy, ``vimkit export --format ...``): the decomposed scan, ONNX parity in onnxruntime for each family,
torch.export with the scan op as one node, AOTInductor packages in a fresh process, and clear errors for bad requests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from vim.cli import main
from vim.deploy import (
    SCAN_OP,
    ExportOptions,
    ModelSource,
    decompose_scan,
    export_aoti,
    export_model,
    export_onnx,
    export_program,
    load_model,
    nominal_input_size,
    save_program,
    set_input_size,
)
from vim.kernels import selective_scan_ref
from vim.kernels.scan_decomposition import EXPORT_CHUNK, decomposed_scan_forward
from vim.kernels.scan_layout import CHUNK_SIZE, num_chunks
from vim.models import SS2D, MambaMixer, MambaVisionMixer

from support.paths import REPO
from support.scans import scan_inputs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

PARITY = 1e-4
"""The largest absolute difference allowed between onnxruntime and PyTorch (fp32)."""


# ---------------------------------------------------------------------------------------------- real inputs
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, ...) values in [0, 1] normalised with ImageNet's statistics, as the models' data pipelines do."""
    shape = (1, 3) + (1,) * (pixels.dim() - 2)
    return (pixels - torch.tensor(IMAGENET_MEAN).view(shape)) / torch.tensor(IMAGENET_STD).view(shape)


def digit_images(count: int, size: int = 32) -> torch.Tensor:
    """scikit-learn's handwritten digits, upscaled and grey to RGB: (count, 3, size, size), normalised."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images[:count]).float()[:, None] / 16
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear")
    return normalised(images.expand(-1, 3, -1, -1))


def moving_digit_clips(count: int, num_frames: int = 4, size: int = 32) -> torch.Tensor:
    """Clips of a tinted handwritten digit gliding across a canvas (the video quickstart's frames): (count, 3, T, size, size)."""
    from sklearn.datasets import load_digits

    from vim.data.generated.moving_digits import DIRECTIONS, render_clip

    rng = np.random.default_rng(0)
    digits = load_digits().images / 16
    directions = list(DIRECTIONS) * count
    clips = np.stack([render_clip(digits[i], directions[i], rng, num_frames, size) for i in range(count)])
    return normalised(torch.from_numpy(clips).float().div(255).permute(0, 4, 1, 2, 3))


def solid_clouds(count: int, num_points: int = 128) -> torch.Tensor:
    """Surfaces of geometric solids (the point quickstart's generator), centred and scaled into the unit sphere: (count, N, 3)."""
    from vim.data.generated.shapes import SHAPE_CLASSES, make_shape

    rng = np.random.default_rng(0)
    clouds = torch.from_numpy(np.stack([make_shape(SHAPE_CLASSES[i % 6], rng, num_points) for i in range(count)])).float()
    clouds = clouds - clouds.mean(dim=1, keepdim=True)
    return clouds / clouds.norm(dim=-1).amax(dim=1)[:, None, None]


# ---------------------------------------------------------------------------------------------- the decomposed scan
def reference_checkpoints(states: torch.Tensor, reverse: bool) -> torch.Tensor:
    """From the reference's every state (batch, dim, L, N), by time: the state after each chunk of CHUNK_SIZE scan steps."""
    length = states.shape[2]
    steps = [min((j + 1) * CHUNK_SIZE, length) - 1 for j in range(num_chunks(length))]
    times = [length - 1 - s for s in steps] if reverse else steps
    return states[:, :, times].transpose(1, 2)  # (batch, chunks, dim, N)


@pytest.mark.parametrize("chunk", [1, EXPORT_CHUNK, CHUNK_SIZE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "length, groups, reverse, optional",
    [(1, 1, False, True), (7, 2, True, True), (70, 1, False, False), (130, 4, True, True), (130, 2, False, False)],
)
def test_decomposed_scan_equals_the_sequential_reference(length, groups, reverse, optional, dtype, chunk):
    """Both directions, grouped B/C, with and without D / z / delta_bias, one step or a chunk of steps per loop
    iteration (lengths that are not a multiple of it: padded): outputs and checkpoints."""
    inputs = scan_inputs(length=length, lead=(2,), groups=groups, dtype=dtype, seed=length)
    if not optional:
        inputs.update(D=None, z=None, delta_bias=None)
    u, delta, A, B, C, D, z, bias = (inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    out, checkpoints = decomposed_scan_forward(u, delta, A, B, C, D, z, bias, True, reverse, chunk=chunk)
    assert out.shape == u.shape and out.dtype == dtype and out.stride(-2) == 1, "channels-last (K, batch, dim, L)"
    assert checkpoints.shape == (2, u.shape[1], num_chunks(length), u.shape[2], A.shape[-1])
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for k in range(2):
        k_reverse = reverse != (k == 1)
        expected, states = selective_scan_ref(
            u[k], delta[k], A[k], B[k], C[k], None if D is None else D[k], z, None if bias is None else bias[k], True,
            k_reverse, return_all_states=True,
        )  # fmt: skip
        torch.testing.assert_close(out[k], expected, **tolerance)
        torch.testing.assert_close(checkpoints[k], reference_checkpoints(states, k_reverse).float(), rtol=1e-4, atol=1e-4)


def test_decomposed_scan_stays_exact_over_a_long_sequence_with_extreme_decays():
    """16384 steps in float32 against the float64 reference, with steps whose decay ``exp(delta * A)`` is far below
    float32's range (``delta * A`` down to about -500): outputs and every checkpoint (the final state last)."""
    length = 16384
    inputs = scan_inputs(batch=1, dim=4, state=2, length=length, groups=1, lead=(2,), decay=(0.5, 16.0), seed=5)
    inputs["delta"] = inputs["delta"] + torch.where(torch.arange(length) % 97 == 0, 30.0, 0.0)
    u, delta, A, B, C, D, z, bias = (inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    out, checkpoints = decomposed_scan_forward(u, delta, A, B, C, D, z, bias, True, False)
    assert torch.isfinite(out).all() and torch.isfinite(checkpoints).all()
    for k in range(2):
        expected, states = selective_scan_ref(
            u[k].double(), delta[k].double(), A[k].double(), B[k].double(), C[k].double(), D[k].double(), z.double(),
            bias[k].double(), True, k == 1, return_all_states=True,
        )  # fmt: skip
        torch.testing.assert_close(out[k].double(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(checkpoints[k].double(), reference_checkpoints(states, k == 1), rtol=1e-4, atol=1e-4)


def test_decomposed_scan_refuses_a_chunk_that_does_not_divide_the_checkpoint_chunk():
    inputs = scan_inputs(length=16, groups=1, lead=(2,))
    u, delta, A, B, C, D, z, bias = (inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    with pytest.raises(ValueError, match="chunk=3"):
        decomposed_scan_forward(u, delta, A, B, C, D, z, bias, True, False, chunk=3)


@pytest.mark.parametrize("grid", [(3, 5), (4, 4)])
def test_decomposed_scan_reads_the_four_directions_of_a_grid(grid):
    """VMamba's four orders over a non-square and a square grid, against the sequential reference run on copies of the
    inputs in each direction's step order (made here by index arithmetic), the result put back in grid order."""
    height, width = grid
    inputs = scan_inputs(length=height * width, lead=(4,), groups=2, dtype=torch.float64, seed=3)
    u, delta, A, B, C, D, z, bias = (inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    out, _ = decomposed_scan_forward(u, delta, A, B, C, D, z, bias, True, False, "", [0, 1, 2, 3], [height, width])
    tokens = torch.arange(height * width).view(height, width)
    for k, steps in enumerate([tokens.flatten(), tokens.t().flatten(), tokens.flatten().flip(0), tokens.t().flatten().flip(0)]):
        expected = selective_scan_ref(
            u[k][..., steps], delta[k][..., steps], A[k], B[k][..., steps], C[k][..., steps], D[k], z[..., steps], bias[k], True
        )
        back = torch.empty_like(expected)
        back[..., steps] = expected  # step s read token steps[s]
        torch.testing.assert_close(out[k], back, rtol=1e-10, atol=1e-10)


def _count_scan_ops(program: torch.export.ExportedProgram) -> int:
    return sum(node.target is SCAN_OP for node in program.graph.nodes)


# ---------------------------------------------------------------------------------------------- ONNX in onnxruntime
def _scanning_blocks(model: torch.nn.Module) -> int:
    """The number of blocks whose mixer scans (every block of a flat trunk; MambaVision's conv and attention blocks do not)."""
    return sum(isinstance(module, (MambaMixer, SS2D, MambaVisionMixer)) for module in model.modules())


def _assert_onnx_matches(
    path, model: torch.nn.Module, inputs: torch.Tensor, input_name: str, output_name: str, opset: int = 20
) -> None:
    """Default domain only at ``opset``, one Scan per block, dynamic batch; onnxruntime (CPU) within PARITY of PyTorch."""
    proto = onnx.load(str(path))
    assert [(entry.domain, entry.version) for entry in proto.opset_import] == [("", opset)], "no custom op domain"
    assert sum(node.op_type == "Scan" for node in proto.graph.node) == _scanning_blocks(model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (graph_input,), (graph_output,) = session.get_inputs(), session.get_outputs()
    assert (graph_input.name, graph_output.name) == (input_name, output_name)
    assert graph_input.shape == ["batch", *inputs.shape[1:]]
    for batch in (inputs[:1], inputs):
        with torch.no_grad():
            expected = model(batch).numpy()
        (actual,) = session.run(None, {input_name: batch.numpy()})
        assert actual.shape == expected.shape
        assert np.abs(actual - expected).max() <= PARITY


@pytest.mark.slow  # an ONNX export: 15-50 s on 2 cores
def test_onnx_image_model_from_a_weights_file_through_the_cli(tmp_path, capsys):
    """``vimkit export --model test_vim --ckpt weights.safetensors --opset 23 --out m.onnx``: the format follows the suffix."""
    source = timm.create_model("test_vim", num_classes=10)
    weights = tmp_path / "test_vim.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    out = tmp_path / "test_vim.onnx"
    main(["export", "--model", "test_vim", "--ckpt", str(weights), "--num-classes", "10", "--opset", "23", "--out", str(out)])
    assert f"Wrote {out}" in capsys.readouterr().out
    model = load_model("test_vim", checkpoint=weights, num_classes=10)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    _assert_onnx_matches(out, model, digit_images(4), "images", "logits", opset=23)
    metadata = {entry.key: entry.value for entry in onnx.load(str(out)).metadata_props}
    assert metadata["model"] == "test_vim" and json.loads(metadata["mean"]) == pytest.approx(IMAGENET_MEAN)


HALF_TOLERANCE = 2e-3
"""A float16 ONNX file's largest output difference from PyTorch's float32, over the largest output (measured: test_vim
4.6e-4; Vim-Ti at 224 px, random weights, 5.4e-4)."""


@pytest.mark.slow  # an ONNX export
def test_onnx_half_keeps_float32_edges_and_matches_float32_within_its_tolerance(tmp_path):
    """``vimkit export --half``: float16 weights inside, float32 input and output, the metadata's
    precision, and onnxruntime's outputs within HALF_TOLERANCE of PyTorch's relative to the largest output."""
    full = _export_random_weights(tmp_path / "full.onnx", "test_vim")
    half = _export_random_weights(tmp_path / "half.onnx", "test_vim", "--half")
    torch.manual_seed(0)  # the weights the command exported
    model = load_model("test_vim")
    proto = onnx.load(str(half))
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    weights = {init.data_type for init in proto.graph.initializer if len(init.dims) > 1 and init.data_type in floating}
    assert weights == {onnx.TensorProto.FLOAT16}
    edges = [*proto.graph.input, *proto.graph.output]
    assert {value.type.tensor_type.elem_type for value in edges} == {onnx.TensorProto.FLOAT}
    assert {entry.key: entry.value for entry in proto.metadata_props}["precision"] == "float16"
    assert half.stat().st_size < full.stat().st_size  # a tiny model's file is mostly graph; Vim-Ti's halves
    images = digit_images(4)
    session = ort.InferenceSession(str(half), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = model(images).numpy()
    assert np.abs(actual - expected).max() <= HALF_TOLERANCE * np.abs(expected).max()


def _export_random_weights(out, model: str, *flags: str):
    """``vimkit export --model MODEL --random-weights`` (torch's seed 0) with ``flags`` to ``out``; returns ``out``."""
    torch.manual_seed(0)
    main(["export", "--model", model, "--random-weights", "--out", str(out), *flags])
    return out


def _lightning_checkpoint(path, name: str, num_classes: int, **hparams) -> torch.nn.Module:
    """A vim Classifier checkpoint as Lightning writes it (trained and EMA weights, hyperparameters); returns the EMA model."""
    trained = timm.create_model(name, num_classes=num_classes, **hparams.get("model_kwargs", {}))
    ema = timm.create_model(name, num_classes=num_classes, **hparams.get("model_kwargs", {}))
    state = {f"model.{k}": v for k, v in trained.state_dict().items()}
    state.update({f"ema.module.{k}": v for k, v in ema.state_dict().items()})
    torch.save({"state_dict": state, "hyper_parameters": dict(model=name, num_classes=num_classes, **hparams)}, path)
    return ema.eval()


@pytest.mark.slow  # an ONNX export: 15-50 s on 2 cores
def test_onnx_video_features_from_a_lightning_checkpoint(tmp_path):
    """The model name, its arguments and the EMA weights come from the checkpoint; without the head: pooled features."""
    ckpt = tmp_path / "last.ckpt"
    ema = _lightning_checkpoint(ckpt, "test_videomamba", 4, model_kwargs={"depth": 3})
    out = export_model(
        "onnx", tmp_path / "clips.onnx", ModelSource(checkpoint=ckpt, head=False), ExportOptions(opset=18, progress=False)
    )
    model = load_model(checkpoint=ckpt, head=False)
    assert len(model.layers) == 3 and model.num_classes == 0
    clips = moving_digit_clips(3)
    with torch.no_grad():
        torch.testing.assert_close(model(clips), ema.forward_head(ema.forward_features(clips), pre_logits=True))
    _assert_onnx_matches(out, model, clips, "video", "features", opset=18)


@pytest.mark.slow  # an ONNX export: 15-50 s on 2 cores
def test_onnx_point_model_includes_sampling_grouping_and_serialisation(tmp_path):
    """FPS, kNN and the Hilbert orders are in the graph: clouds go in, logits come out."""
    model = load_model("test_pointmamba")
    out = export_onnx(model, tmp_path / "clouds.onnx", progress=False)
    _assert_onnx_matches(out, model, solid_clouds(3), "points", "logits")


def test_onnx_sort_keeps_ties_in_index_order(tmp_path):
    """The space-filling-curve sort must be stable: equal curve codes keep the order of their patches."""
    from vim.deploy import ONNX_DECOMPOSITIONS

    class Argsort(torch.nn.Module):
        def forward(self, codes):
            return torch.argsort(codes, dim=1, stable=True)

    codes = torch.tensor([[3, 1, 3, 1, 2, 2, 1, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    program = decompose_scan(torch.export.export(Argsort(), (codes,)), ONNX_DECOMPOSITIONS)  # as export_onnx does
    torch.onnx.export(program, (codes,), tmp_path / "sort.onnx", dynamo=True, input_names=["codes"], verbose=False)
    (order,) = ort.InferenceSession(str(tmp_path / "sort.onnx")).run(None, {"codes": codes.numpy()})
    assert order.tolist() == [[7, 1, 3, 6, 4, 5, 0, 2], list(range(8))]


# ---------------------------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize(
    "name, inputs",
    [
        ("test_vim", lambda: digit_images(3)),
        ("test_videomamba", lambda: moving_digit_clips(3)),
        ("test_pointmamba", lambda: solid_clouds(3)),
    ],
)
def test_torch_export_keeps_one_scan_node_per_block_and_a_dynamic_batch(tmp_path, name, inputs):
    model = timm.create_model(name).eval()
    path = save_program(model, tmp_path / f"{name}.pt2")
    program = torch.export.load(path)
    assert _count_scan_ops(program) == len(model.layers)
    assert not any("scan" in str(node.target) and node.target is not SCAN_OP for node in program.graph.nodes)
    batch = inputs()
    with torch.no_grad():
        for rows in (batch[:1], batch):
            torch.testing.assert_close(program.module()(rows), model(rows))


@pytest.mark.slow  # an ONNX export
@pytest.mark.parametrize("name", ["test_vmamba", "test_mambavision"])
def test_a_hierarchical_family_exports_with_one_scan_per_mamba_block(tmp_path, name):
    """The hierarchical families through the same export path: one scan node per Mamba block (VMamba's four directions
    in one op; MambaVision's conv and attention blocks have none, its windows are plain reshapes) with a dynamic batch
    in torch.export, and in ONNX the decomposed scan within PARITY of PyTorch."""
    model = load_model(name)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # the nominal size, which exports fix
    program = torch.export.load(save_program(model, tmp_path / f"{name}.pt2"))
    assert _count_scan_ops(program) == _scanning_blocks(model) > 0
    with torch.no_grad():
        for rows in (images[:1], images):
            torch.testing.assert_close(program.module()(rows), model(rows))
    _assert_onnx_matches(export_onnx(model, tmp_path / f"{name}.onnx", progress=False), model, images, "images", "logits")


# ---------------------------------------------------------------------------------------------- AOTInductor
RUN_PACKAGE = """
import sys
import torch
{guard}
package = torch._inductor.aoti_load_package({path!r})
images = torch.load({inputs!r})
torch.save(package(images), {outputs!r})
print("vim imported:", any(name == "vim" or name.startswith("vim.") for name, m in sys.modules.items() if m is not None))
"""
BLOCK_VIM = 'sys.modules["vim"] = None  # vim cannot be imported in this process'


def _run_package(tmp_path, package, images: torch.Tensor, guard: str) -> subprocess.CompletedProcess:
    """Run ``package`` on ``images`` in a fresh interpreter outside the repository, with ``-I`` (no script folder on the path)."""
    inputs, outputs = tmp_path / "inputs.pt", tmp_path / "out.pt"
    torch.save(images, inputs)
    script = RUN_PACKAGE.format(guard=guard, path=str(package), inputs=str(inputs), outputs=str(outputs))
    return subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(script)], cwd=tmp_path, capture_output=True, text=True)


@pytest.mark.slow
def test_aoti_package_runs_in_a_process_that_cannot_import_vim(tmp_path):
    """The default package compiles the decomposed scan: nothing of vim is needed to load or run it (~40 s: a C++ build)."""
    model = load_model("test_vim", depth=1)
    package = export_aoti(model, tmp_path / "vim.pt2", progress=False)
    images = digit_images(3)
    run = _run_package(tmp_path, package, images, BLOCK_VIM)
    assert run.returncode == 0, run.stderr
    assert "vim imported: False" in run.stdout
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), model(images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_aoti_package_with_the_scan_op_needs_vim_imported(tmp_path):
    """``keep_vim_ops``: the package calls vim's ops through the dispatcher; ``import vim`` registers them (~40 s)."""
    model = load_model("test_vim", depth=1)
    package = export_aoti(model, tmp_path / "vim_op.pt2", keep_vim_ops=True, progress=False)
    images = digit_images(2)
    without = _run_package(tmp_path, package, images, BLOCK_VIM)
    assert without.returncode != 0 and "Could not find schema for vim::" in without.stderr
    run = _run_package(tmp_path, package, images, "import vim.kernels  # registers the vim ops")
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), model(images), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad requests
def test_an_input_size_the_model_cannot_take_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"input size \(3, 4, 4\) does not fit VisionMamba.*smaller than the patch size"):
        export_onnx(timm.create_model("test_vim"), tmp_path / "m.onnx", input_size=(3, 4, 4), progress=False)
    with pytest.raises(ValueError, match=r"input size \(8, 3\) does not fit PointMamba.*at least 16"):
        export_program(timm.create_model("test_pointmamba"), input_size=(8, 3))
    with pytest.raises(ValueError, match=r"input size \(3, 4, 48, 48\) does not fit VideoMamba.*does not match"):
        export_program(timm.create_model("test_videomamba"), input_size=(3, 4, 48, 48))
    assert not list(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize("opset", [17, 24])
def test_an_unsupported_opset_is_refused_before_any_work(tmp_path, opset):
    with pytest.raises(ValueError, match=f"opset={opset} is not supported: the exporter writes opsets 18..23"):
        export_onnx(timm.create_model("test_vim"), tmp_path / "m.onnx", opset=opset, progress=False)


def test_a_model_of_another_family_is_refused_with_the_reason(tmp_path):
    features = timm.create_model("test_vim", features_only=True, out_indices=(1,))
    with pytest.raises(ValueError, match=r"cannot export a FeatureGetterNet: vim.deploy knows the inputs of vim's backbones"):
        export_onnx(features, tmp_path / "m.onnx", progress=False)
    with pytest.raises(ValueError, match="cannot export a Linear"):
        export_program(torch.nn.Linear(3, 3))


def test_a_family_that_declares_an_export_refusal_is_refused_with_its_reason(tmp_path):
    """The refusal is read off the model's contract (``export_refusal``), not off a list of classes."""
    model = timm.create_model("test_vim")
    model.export_refusal = "its tokenizer's size depends on the data"
    with pytest.raises(ValueError, match="cannot export a VisionMamba: its tokenizer's size depends on the data"):
        export_program(model)
    with pytest.raises(ValueError, match="cannot export a VisionMamba: its tokenizer's size"):
        save_program(model, tmp_path / "m.pt2")
    assert not list(tmp_path.iterdir()), "nothing written"


def test_set_input_size_takes_the_sizes_of_the_models_family_only():
    """Each family's ``set_input_size`` sizes its input (the nominal size follows); another family's size is named."""
    points = timm.create_model("test_pointmamba")
    set_input_size(points, num_points=64)
    assert nominal_input_size(points) == (64, 3)
    clips = timm.create_model("test_videomamba")
    set_input_size(clips, img_size=(16, 24), num_frames=2)
    assert nominal_input_size(clips) == (3, 2, 16, 24)
    with pytest.raises(ValueError, match="num_frames=4: a VisionMamba takes no clips; it takes images, sized by img_size"):
        set_input_size(timm.create_model("test_vim"), num_frames=4)
    with pytest.raises(
        ValueError, match="img_size=32: a PointMamba takes no images or frames; it takes point clouds, sized by num_points"
    ):
        set_input_size(points, img_size=32)
    assert nominal_input_size(points) == (64, 3), "a refused size changes nothing"


def test_export_model_writes_a_program_at_the_size_asked_for(tmp_path):
    """``export_model(format, out, ModelSource, ExportOptions)``: the model, sized by the options, traced at that size."""
    torch.manual_seed(0)
    source, options = ModelSource("test_videomamba", head=False), ExportOptions(img_size=16, num_frames=2)
    program = torch.export.load(export_model("torch_export", tmp_path / "clips.pt2", source, options))
    assert tuple(program.example_inputs[0][0].shape) == (2, 3, 2, 16, 16)
    torch.manual_seed(0)  # the same random weights
    model = load_model("test_videomamba", head=False, img_size=16, num_frames=2)
    clips = moving_digit_clips(3, num_frames=2, size=16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(clips), model(clips))


def test_onnx_export_without_the_export_extra_names_it(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"ONNX export needs onnxscript: pip install 'vim-toolkit\[export\]'"):
        export_onnx(timm.create_model("test_vim"), tmp_path / "m.onnx", progress=False)


def test_cli_refuses_unclear_requests(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--model", "test_vim", "--out", str(tmp_path / "m.pt2")])
    assert "--format: give one of safetensors, onnx, torch_export, aoti" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--format", "safetensors", "--out", str(tmp_path / "w.safetensors")])
    assert "--ckpt: the safetensors format exports a Lightning checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", "x.ckpt", "--no-head", "--img-size", "64", "--out", str(tmp_path / "w.safetensors")])
    assert "--no-head, --img-size: the safetensors format writes the checkpoint's weights as they are" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--model", "test_vim", "--out", str(tmp_path / "m.onnx")])  # no weights named: none are assumed
    assert "no weights: give --ckpt FILE" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
    with pytest.raises(SystemExit):
        main(["export", "--model", "test_vim", "--pretrained", "--random-weights", "--out", str(tmp_path / "m.onnx")])
    assert "--random-weights and --pretrained both choose the weights" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"vimkit export: error: cannot export a PointMambaScan: .*curve's depth"):
        main(["export", "--model", "test_pointmamba_scan", "--random-weights", "--out", str(tmp_path / "m.onnx")])
    with pytest.raises(SystemExit, match="vimkit export: error: num_points=64: a VisionMamba takes no point clouds"):
        main(["export", "--model", "test_vim", "--random-weights", "--num-points", "64", "--out", str(tmp_path / "m.onnx")])
    with pytest.raises(ValueError, match=r"output file .* must end in .onnx"):
        export_onnx(timm.create_model("test_vim"), tmp_path / "m.bin", progress=False)
    with pytest.raises(ValueError, match=r"checkpoint: .*missing.ckpt' does not exist"):
        load_model(checkpoint=tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"checkpoint: 'https://host/run.ckpt' is a URL; this command reads local files only"):
        load_model(checkpoint="https://host/run.ckpt")
    weights = tmp_path / "ten_classes.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vim", num_classes=10).state_dict().items()}, str(weights))
    with pytest.raises(
        ValueError,
        match=r"ten_classes.safetensors'.*'head.weight' has shape \(10, 32\), the model expects \(1000, 32\); pass num_classes",
    ):
        load_model("test_vim", checkpoint=weights)


def test_a_point_runs_checkpoint_exports_at_the_cloud_size_it_trained_on(tmp_path):
    model = timm.create_model("test_pointmamba", num_classes=3)
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model": "test_pointmamba", "num_classes": 3},
            "datamodule_hyper_parameters": {"num_points": 48},
        },
        tmp_path / "last.ckpt",
    )
    assert nominal_input_size(model) == (128, 3)  # the model's own default
    assert nominal_input_size(load_model(checkpoint=tmp_path / "last.ckpt")) == (48, 3)


def test_load_model_sets_the_export_size_and_the_head():
    """img_size / num_frames resample the position embeddings (the nominal input follows); no head: pooled features."""
    images = load_model("test_vim", img_size=48)
    assert nominal_input_size(images) == (3, 48, 48)
    clips = load_model("test_videomamba", num_frames=2, img_size=16, head=False)
    assert nominal_input_size(clips) == (3, 2, 16, 16)
    assert clips(torch.randn(2, 3, 2, 16, 16)).shape == (2, 32)
    assert nominal_input_size(load_model("test_pointmamba")) == (128, 3)


# ---------------------------------------------------------------------------------------------- the benchmark tool
@pytest.mark.slow
def test_bench_deploy_writes_json_and_markdown_on_tiny_shapes(tmp_path):
    """tools/bench_deploy.py end to end on a tiny video model, an ONNX file and an AOTInductor package timed beside
    eager: its files, not its timings."""
    tool = REPO / "tools" / "bench_deploy.py"
    command = [sys.executable, str(tool), "--configs", "test_videomamba:2x32", "--runtimes", "onnxruntime", "aoti", "eager"]
    command += ["--iters", "1", "--warmup", "0", "--threads", "1", "--out-dir", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    saved = json.loads((tmp_path / "deploy_cpu.json").read_text())
    assert {"machine", "date", "torch", "onnx", "onnxruntime", "threads", "batch", "rounds"} <= saved["environment"].keys()
    rows = {row["runtime"]: row for row in saved["results"]}
    assert rows.keys() == {"onnxruntime", "aoti", "eager"} and all(row["status"] == "ok" for row in rows.values())
    assert rows["eager"]["x_eager"] == 1
    for runtime in ("onnxruntime", "aoti"):
        assert rows[runtime]["input"] == [3, 2, 32, 32] and rows[runtime]["unit"] == "clips/s"
        assert rows[runtime]["max_abs_diff_vs_eager"] <= PARITY
        assert rows[runtime]["export_s"] > 0 and rows[runtime]["file_mib"] > 0
        assert rows[runtime]["rate"] == pytest.approx(1e3 / rows[runtime]["median_ms"])
    table = (tmp_path / "deploy_cpu.md").read_text()
    for runtime in ("onnxruntime", "aoti", "eager"):
        assert f"| test_videomamba | 3x2x32x32 | 1 | {runtime} |" in table
    assert "AOTInductor export" in table and "ONNX export" in table


def test_aoti_refuses_several_windows_per_image_by_name(tmp_path):
    """At 64 px test_mambavision's third stage cuts its 4x4 grid into 4 windows of 3: a batch that Inductor cannot
    compile in the decomposed scan, refused before any compile; at 48 px every stage is one window and passes."""
    from vim.deploy.aoti import refuse_several_windows

    model = load_model("test_mambavision")
    with pytest.raises(ValueError, match=r"stage 2 cuts its 4x4 grid into 4 windows of 3 per image"):
        export_aoti(model, tmp_path / "m.pt2", progress=False)
    assert not (tmp_path / "m.pt2").exists()
    refuse_several_windows(load_model("test_mambavision", img_size=48), torch.randn(1, 3, 48, 48))
