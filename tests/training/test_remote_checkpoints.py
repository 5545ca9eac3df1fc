"""Checkpoints given by URL: read without unpickling code, for every ``vimkit`` command, from a server on loopback."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vim.cli import main, run_lightning
from vim.files import check_weights_file
from vim.models.checkpoint import CheckpointError, read_checkpoint
from vim.training.image_classifier import ImageClassifier

from support.pickles import TouchOnUnpickle
from support.training import tiny_config


def save_malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A Lightning-looking checkpoint (3 classes) that also holds a :class:`TouchOnUnpickle` payload."""
    torch.save({"state_dict": {}, "hyper_parameters": {"num_classes": 3}, "payload": TouchOnUnpickle(marker)}, path)
    return path


@pytest.fixture
def served(tmp_path, monkeypatch) -> Iterator[tuple[Path, str]]:
    """(folder, its URL): an HTTP server on 127.0.0.1 (a free port) serving ``tmp_path/served`` from a thread.

    Torch hub's cache, where Lightning's own loader keeps a URL's file by its name, is moved into ``tmp_path``."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]  # keep the test output quiet
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_payload_runs_when_unpickled_without_weights_only(tmp_path):
    """The reference for the tests below: the payload is real, so a marker that stays absent means it never ran."""
    marker = tmp_path / "ran"
    path = save_malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(path, weights_only=False)
    assert marker.is_file()


COMMANDS = {
    "fit": ["fit"],
    "validate": ["validate"],
    "test": ["test"],
    "predict": ["predict"],
    # no labelled data: the class count is read from the checkpoint before Lightning loads it
    "predict_unlabelled": ["predict", "--data.train_root=null", "--data.val_root=null"],
}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_a_malicious_checkpoint_url_is_refused_without_running_its_code(command, served, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder, base_url = served
    marker = tmp_path / "ran"
    save_malicious_checkpoint(folder / "evil.ckpt", marker)
    url = f"{base_url}/evil.ckpt"
    name, *settings = command
    args = [name, "--config", tiny_config(tmp_path), *settings, f"--ckpt_path={url}", f"--data.predict_root={tmp_path}/images"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert not marker.exists()
    message = str(exit_info.value.code)
    assert message.startswith(f"vimkit {name}: error: checkpoint '{url}' is refused: it holds pickled objects")
    assert "Unsupported global" in message and "\n" not in message


def test_a_checkpoint_url_is_validated_as_the_same_file_on_disk(served, tmp_path, monkeypatch):
    """A genuine checkpoint of ``vimkit fit`` served over HTTP validates to the same metrics as the file itself."""
    monkeypatch.chdir(tmp_path)
    folder, base_url = served
    config = tiny_config(tmp_path)
    run_lightning(["fit", "--config", config, "--trainer.max_steps=2"])
    last = tmp_path / "runs/tiny/version_0/checkpoints/last.ckpt"
    (folder / "last.ckpt").write_bytes(last.read_bytes())

    def validated(ckpt_path: str) -> dict[str, float]:
        cli = run_lightning(["validate", "--config", config, f"--ckpt_path={ckpt_path}"])
        return {name: float(value) for name, value in cli.trainer.callback_metrics.items()}

    by_url, on_disk = validated(f"{base_url}/last.ckpt"), validated(str(last))
    assert by_url == on_disk and set(on_disk) >= {"val/acc1", "val_ema/acc1"}
    restored = ImageClassifier.load_from_checkpoint(f"{base_url}/last.ckpt").state_dict()
    saved = torch.load(last, weights_only=True)["state_dict"]
    assert restored.keys() == saved.keys() and all(torch.equal(restored[key], saved[key]) for key in saved)


def test_load_from_checkpoint_refuses_a_malicious_url_without_running_its_code(served, tmp_path):
    folder, base_url = served
    marker = tmp_path / "ran"
    save_malicious_checkpoint(folder / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match=rf"^checkpoint '{base_url}/evil.ckpt' is refused: .*Unsupported global"):
        ImageClassifier.load_from_checkpoint(f"{base_url}/evil.ckpt")
    assert not marker.exists()


def test_an_unreachable_checkpoint_url_is_named_in_one_line(served):
    _, base_url = served
    with pytest.raises(CheckpointError, match=rf"^checkpoint '{base_url}/missing.ckpt' could not be downloaded: [^\n]*$"):
        read_checkpoint(f"{base_url}/missing.ckpt")


def test_commands_that_read_local_files_only_name_a_url():
    with pytest.raises(ValueError, match=r"^--ckpt: 'https://host/run.ckpt' is a URL; this command reads local files only"):
        check_weights_file("https://host/run.ckpt", "--ckpt")
