"""Config loading and the CLI's refusals of bad settings: typed values, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from server.cli import main
from server.config import IndexConfig, load_config
from server.errors import ConfigError
from server.index import ItemIndex, gpu_count
from tests.conftest import TinyDataset


def test_an_empty_variable_sets_an_empty_string() -> None:
    config = load_config(
        env={"SIGNEDREC_ACCESS__HMAC_SECRET": "", "SIGNEDREC_SERVER__STATE_DIR": ""}
    )
    assert config.access.hmac_secret == ""
    assert config.server.state_dir == ""
    with pytest.raises(ConfigError, match="SIGNEDREC_ACCESS__KEYS: not valid JSON"):
        load_config(env={"SIGNEDREC_ACCESS__KEYS": "[not json"})


def test_search_ranks_stay_integers_from_toml_and_env(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\ngf_rank_grid = [16, 48]\n[model.start]\ngf_rank = 32\nl2 = 2\n")
    model = load_config(toml, env={}).model
    assert model.gf_rank_grid == (16, 48)
    assert all(type(r) is int for r in model.gf_rank_grid)
    assert type(model.start.gf_rank) is int
    assert model.start.l2 == 2.0
    env = {"SIGNEDREC_MODEL__GF_RANK_GRID": "[8, 24]"}
    assert load_config(env=env).model.gf_rank_grid == (8, 24)
    for bad in ("[8.5]", "[0]"):
        with pytest.raises(ConfigError, match="gf_rank_grid"):
            load_config(env={"SIGNEDREC_MODEL__GF_RANK_GRID": bad})
    toml.write_text("[model.start]\ngf_rnak = 32\n")
    with pytest.raises(ConfigError, match="gf_rnak"):
        load_config(toml, env={})


def test_hyper_from_a_manifest_without_usable_hyper_parameters_is_one_line(
    tiny_artifact: Path,
    tiny_dataset: TinyDataset,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken = tmp_path / "v1"
    shutil.copytree(tiny_artifact, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["model"]["hyper"]["gf_rank"]
    manifest["model"]["hyper"]["gf_rnak"] = 64
    (broken / "manifest.json").write_text(json.dumps(manifest))
    code = main(["train", "--data", str(tiny_dataset.path), "--threshold",
                 str(tiny_dataset.threshold), "--out", str(tmp_path / "out"),
                 "--hyper-from", str(broken)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("signedrec train: error: ")
    assert "manifest.json" in err
    assert "gf_rnak" in err
    assert not (tmp_path / "out").exists()


def test_versions_of_a_missing_root_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["versions", str(tmp_path / "nowhere")]) == 2
    assert "no such artifact root" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["versions", str(tmp_path / "empty")]) == 0


@pytest.mark.skipif(gpu_count()[0] > 0, reason="a GPU is present: index.device=gpu works here")
def test_a_gpu_index_on_a_host_without_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"index\.device=gpu"):
        ItemIndex(np.ones((4, 2), np.float32), IndexConfig(kind="flat", device="gpu"))
