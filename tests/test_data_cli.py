"""`surgery data preview` and `load_tokenizer`."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from surgery.cli import app
from surgery.data import load_tokenizer
from surgery.data.spec import MissingDatasetError
from surgery.errors import SurgeryError
from tests.test_data_helpers import DATA, tiny_tokenizer

WIDE = {"COLUMNS": "240"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A checkpoint directory as far as the tokenizer goes: tokenizer files and chat template."""
    path = tmp_path_factory.mktemp("model")
    tiny_tokenizer().save_pretrained(str(path))
    return path


def preview(*args: str):
    result = CliRunner().invoke(app, ["data", "preview", *args], env=WIDE)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def test_load_tokenizer_reads_the_checkpoint_directory(model_dir, tmp_path):
    tok = load_tokenizer(model_dir)
    assert tok.pad_token_id == 3 and tok.chat_template and "<tool_call>" in tok.chat_template
    with pytest.raises(SurgeryError, match="no tokenizer in the checkpoint directory"):
        load_tokenizer(tmp_path)
    with pytest.raises(SurgeryError, match="not a directory"):
        load_tokenizer(tmp_path / "nothing")


def test_preview_shows_renders_tokens_and_statistics(model_dir):
    out = preview(f"{DATA / 'xlam.jsonl'}#samples=3", "--model", str(model_dir), "--max-length", "4096",
                  "--show", "1", "--chars", "5000")
    assert "<|im_start|>system\n<tools>\n" in out and "<tool_call>\n" in out
    assert "tokens: <|im_start|> | " in out
    assert "calibration set: 3 rows" in out
    row = next(line for line in out.splitlines() if line.startswith("│ xlam"))
    cells = [cell.strip() for cell in row.strip().strip("│").split("│")]
    assert cells[0] == "xlam" and cells[2:4] == ["3", "3"] and cells[5:] == ["0", "0"]  # nothing cut or skipped


def test_preview_without_anything_uses_the_default_and_says_so():
    out = preview("--samples", "2", "--show", "1", "--chars", "200")
    assert "generic corpus" in out and "domain-matched data is better" in out
    assert "no --model: tokens are UTF-8 bytes" in out
    for name in ("builtin-code", "builtin-docs", "builtin-tools"):
        assert name in out
    assert "calibration set: 6 rows x 512 tokens" in out


def test_preview_a_recipe(model_dir):
    out = preview("--recipe", str(DATA / "recipe-local.toml"), "--model", str(model_dir), "--show", "0")
    assert "calibration set: 7 rows x 64 tokens (max_length 64, seed 7, packed)" in out
    for name in ("code", "tool-calling", "agentic"):
        assert f"│ {name} " in out


def test_preview_of_a_missing_hub_dataset_is_a_user_error(model_dir):
    result = CliRunner().invoke(app, ["data", "preview", "acme/surgery-not-cached", "--model", str(model_dir)])
    assert isinstance(result.exception, MissingDatasetError)
    assert "huggingface-cli download --repo-type dataset acme/surgery-not-cached" in str(result.exception)


def test_preview_with_the_shared_fixture_model(shared_fixtures):
    out = preview(str(DATA / "swe-smith.jsonl"), "--model", str(shared_fixtures / "tinymoe-m2"), "--samples", "1",
                  "--max-length", "8192", "--chars", "100000")
    assert "You can call these tools (JSON schemas):" in out  # the template drops `tools`: they moved here
    assert '{"name": "bash", "arguments": {"command": ' in out
