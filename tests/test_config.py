"""Config loading and the CLI's refusals of bad settings: typed values, one-line errors."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import msgspec
import numpy as np
import pytest

from server.cli import main
from server.config import SEGMENT_HEADER_BYTES, Hyper, IndexConfig, load_config
from server.errors import ConfigError
from server.events import HEADER_SIZE
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


# -- bad files ---------------------------------------------------------------------------------
def _one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The CLI's stderr, which must be exactly one `signedrec CMD: error: ...` line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"signedrec {command}: error: "), lines
    return lines[0]


def test_a_config_that_is_a_directory_or_not_utf8_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[server]\nhost = '\xff\xfe'\n")
    for path, problem in ((tmp_path, "is a directory"), (binary, "not UTF-8 text")):
        with pytest.raises(ConfigError, match=problem) as caught:
            load_config(path, env={})
        assert str(path) in caught.value.message
        assert main(["serve", "--config", str(path)]) == 2
        line = _one_error_line(capsys, "serve")
        assert str(path) in line
        assert problem in line


def test_an_unreadable_config_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 1\n")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 000 means nothing to root
    with pytest.raises(ConfigError, match=rf"config file {path} cannot be read: Permission denied"):
        load_config(path, env={})


def test_a_scalar_where_a_section_belongs_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("server = 5\n")
    for env in ({}, {"SIGNEDREC_SERVER__PORT": "1"}):
        with pytest.raises(ConfigError, match=r"server") as caught:
            load_config(path, env=env)
        assert str(path) in caught.value.message


# -- values that would break the server later --------------------------------------------------
@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("SIGNEDREC_LIMITS__MAX_IDENTITIES", "0", "limits.max_identities"),
        ("SIGNEDREC_LIMITS__MAX_INFLIGHT", "0", "limits.max_inflight"),
        ("SIGNEDREC_LIMITS__BURST", "0.5", "limits.burst"),
        ("SIGNEDREC_LIMITS__RATE_PER_S", "-1", "limits.rate_per_s"),
        ("SIGNEDREC_LIMITS__RETRY_AFTER_S", "-1", "limits.retry_after_s"),
        ("SIGNEDREC_RANKING__MAX_K", "0", "ranking.max_k"),
        ("SIGNEDREC_RANKING__DEFAULT_K", "0", "ranking.default_k"),
        ("SIGNEDREC_RANKING__CANDIDATE_MULTIPLIER", "0", "ranking.candidate_multiplier"),
        ("SIGNEDREC_SERVER__PORT", "99999", "server.port"),
        ("SIGNEDREC_SERVER__PORT", "-5", "server.port"),
        ("SIGNEDREC_SERVER__HOST", "", "server.host"),
        ("SIGNEDREC_SERVER__MAX_BODY_BYTES", "0", "server.max_body_bytes"),
        ("SIGNEDREC_SERVER__MAX_EVENTS_PER_BATCH", "0", "server.max_events_per_batch"),
        ("SIGNEDREC_SERVER__HISTORY_MAX_LIMIT", "0", "server.history_max_limit"),
        ("SIGNEDREC_SERVER__HISTORY_DEFAULT_LIMIT", "0", "server.history_default_limit"),
        ("SIGNEDREC_LOG__SEGMENT_BYTES", "20", "log.segment_bytes"),
        ("SIGNEDREC_LOG__REPLAY_BATCH", "0", "log.replay_batch"),
        ("SIGNEDREC_LOG__SNAPSHOT_EVERY_EVENTS", "0", "log.snapshot_every_events"),
        ("SIGNEDREC_INDEX__IVF_NLIST", "0", "index.ivf_nlist"),
        ("SIGNEDREC_INDEX__HNSW_M", "1", "index.hnsw_m"),
        # Handed to C ints: an overflow traceback after loading, exit 3 (review L).
        ("SIGNEDREC_SERVER__GC_THRESHOLD0", "3000000000", "server.gc_threshold0"),
        ("SIGNEDREC_INDEX__CPU_THREADS", "3000000000", "index.cpu_threads"),
        ("SIGNEDREC_INDEX__HNSW_EF_SEARCH", "2147483648", "index.hnsw_ef_search"),
        ("SIGNEDREC_ACCESS__HMAC_WINDOW_S", "-1", "access.hmac_window_s"),
        ("SIGNEDREC_SERVER__GRACEFUL_SHUTDOWN_S", "0", "server.graceful_shutdown_s"),
        ("SIGNEDREC_SERVER__LISTEN_BACKLOG", "0", "server.listen_backlog"),
        ("SIGNEDREC_SERVER__RECOMMEND_BATCH", "0", "server.recommend_batch"),
        ("SIGNEDREC_MODEL__DIM", "0", "model.dim"),
        ("SIGNEDREC_MODEL__SEED", "-1", "model.seed"),
        ("SIGNEDREC_MODEL__PROPENSITY_PRIOR", "0", "model.propensity_prior"),
        ("SIGNEDREC_RANKING__SUPPRESSION_GAMMA", "inf", "ranking.suppression_gamma"),
        ("SIGNEDREC_RANKING__SUPPRESSION_GAMMA", "-0.5", "ranking.suppression_gamma"),
        ("SIGNEDREC_RANKING__PROPENSITY_BETA", "nan", "ranking.propensity_beta"),
        ("SIGNEDREC_EVENTS__LIKE", "nan", "events.like"),
        ("SIGNEDREC_EVENTS__LIKE", "-1", "events.like"),
        ("SIGNEDREC_EVENTS__DISLIKE", "0.5", "events.dislike"),
        ("SIGNEDREC_EVENTS__SKIP", "0", "events.skip"),
        ("SIGNEDREC_EVENTS__RATING_NEGATIVE", "-inf", "events.rating_negative"),
        ("SIGNEDREC_EVENTS__RATING_POSITIVE", "0", "events.rating_positive"),
    ],
)
def test_nonsense_numbers_are_refused_naming_the_field(variable: str, value: str, field: str
                                                        ) -> None:  # fmt: skip
    with pytest.raises(ConfigError, match=rf"\$\.{re.escape(field)}`"):
        load_config(env={variable: value})


def test_defaults_must_not_exceed_their_maximum() -> None:
    with pytest.raises(ConfigError, match=r"ranking\.default_k \(201\) must not exceed ranking"
                       r"\.max_k \(200\)"):  # fmt: skip
        load_config(env={"SIGNEDREC_RANKING__DEFAULT_K": "201"})
    with pytest.raises(ConfigError, match=r"server\.history_default_limit \(100\) must not exceed"):
        load_config(env={"SIGNEDREC_SERVER__HISTORY_MAX_LIMIT": "50"})
    config = load_config(env={"SIGNEDREC_RANKING__DEFAULT_K": "5", "SIGNEDREC_RANKING__MAX_K": "5",
                              "SIGNEDREC_SERVER__PORT": "0"})  # fmt: skip
    assert (config.ranking.default_k, config.ranking.max_k, config.server.port) == (5, 5, 0)


def test_the_segment_bound_is_the_logs_record_header() -> None:
    assert SEGMENT_HEADER_BYTES == HEADER_SIZE
    assert load_config(env={"SIGNEDREC_LOG__SEGMENT_BYTES": str(HEADER_SIZE + 1)}).log


# -- env text for string fields ----------------------------------------------------------------
def test_a_string_field_takes_text_that_looks_like_json() -> None:
    env = {"SIGNEDREC_ACCESS__HMAC_SECRET": "[abc", "SIGNEDREC_SERVER__STATE_DIR": "{dir}"}
    config = load_config(env=env)
    assert config.access.hmac_secret == "[abc"
    assert config.server.state_dir == "{dir}"
    assert load_config(env={"SIGNEDREC_ACCESS__HMAC_SECRET": '["a"]'}).access.hmac_secret == (
        '["a"]'
    )
    # Tables, lists and structs still come as JSON.
    env = {"SIGNEDREC_ACCESS__KEYS": '{"k1": "admin"}', "SIGNEDREC_MODEL__L2_GRID": "[1, 2]",
           "SIGNEDREC_MODEL__START": '{"l2": 3}'}  # fmt: skip
    config = load_config(env=env)
    assert config.access.keys == {"k1": "admin"}
    assert config.model.l2_grid == (1.0, 2.0)
    assert config.model.start.l2 == 3.0
    with pytest.raises(ConfigError, match="SIGNEDREC_MODEL__L2_GRID: not valid JSON"):
        load_config(env={"SIGNEDREC_MODEL__L2_GRID": "[1,"})


# -- serve's arguments -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "env", "problem"),
    [
        (["--port", "99999"], {}, "--port must be between 0 and 65535, got 99999"),
        (["--port", "-5"], {}, "--port must be between 0 and 65535, got -5"),
        ([], {"SIGNEDREC_SERVER__PORT": "99999"}, "server.port"),
        (["--host", ""], {}, "--host must not be empty"),
        ([], {"SIGNEDREC_SERVER__HOST": ""}, "server.host"),
    ],
)
def test_serve_refuses_a_bad_address_in_one_line(
    args: list[str],
    env: dict[str, str],
    problem: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--state-dir", str(tmp_path / "state"), *args]) == 2
    assert problem in _one_error_line(capsys, "serve")
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("where", ["file", "file/below"])
def test_serve_refuses_a_state_dir_that_cannot_be_a_directory(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a directory\n")
    state = tmp_path / where
    assert main(["serve", "--state-dir", str(state)]) == 2
    line = _one_error_line(capsys, "serve")
    assert f"state dir {state}" in line
    assert "is not a directory" in line


@pytest.mark.parametrize(
    ("variable", "value", "where"),
    [
        ("SIGNEDREC_MODEL__DROPOUT_GRID", "[0.5, 1.0]", "model.dropout_grid[1]"),
        ("SIGNEDREC_MODEL__L2_GRID", "[-1]", "model.l2_grid[0]"),
        ("SIGNEDREC_MODEL__SUPPRESSION_GRID", "[-0.5]", "model.suppression_grid[0]"),
        ("SIGNEDREC_MODEL__SUPPRESSION_TOLERANCE", "nan", "model.suppression_tolerance"),
        ("SIGNEDREC_MODEL__PROPENSITY_TOLERANCE", "2", "model.propensity_tolerance"),
        ("SIGNEDREC_MODEL__START", '{"dropout": 1.0}', "model.start.dropout"),
        ("SIGNEDREC_MODEL__SEED", str(2**64), "model.seed"),  # torch.manual_seed overflowed
    ],
)
def test_model_search_values_that_break_training_are_refused(
    variable: str, value: str, where: str
) -> None:
    """A dropout of 1 divides by zero, a NaN tolerance leaves no admissible strength, a negative
    ridge or grid value trains nonsense: refused at load, naming the place."""
    with pytest.raises(ConfigError, match=re.escape(f"$.{where}`")):
        load_config(env={variable: value})


def test_a_manifests_hyper_parameters_are_held_to_the_same_bounds() -> None:
    """``train --hyper-from`` converts a manifest's hyper-parameters into Hyper: a dropout of 1
    or a NaN weight is refused there (the CLI turns it into a one-line artifact error)."""
    with pytest.raises(msgspec.ValidationError, match="dropout"):
        msgspec.convert({"dropout": 1.0}, Hyper, strict=False)
    with pytest.raises(msgspec.ValidationError, match="neg_weight"):
        msgspec.convert({"neg_weight": float("nan")}, Hyper, strict=False)


def test_an_env_variables_error_names_the_variable_not_the_file(tmp_path: Path) -> None:
    """With --config given, every error was blamed on the file, even one from a variable."""
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 8080\n")
    cases = {
        "SIGNEDREC_SERVER__PORT": ("abc", "$.server.port"),
        "SIGNEDREC_SERVER__SPORT": ("1", "unknown field `sport`"),
        "SIGNEDREC_SERVER__HOST": (" ", "$.server.host"),  # blank: no interface by that name
        "SIGNEDREC_SERVRE__PORT": ("1", "unknown field `servre`"),  # a mistyped section
    }
    for variable, (value, fragment) in cases.items():
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={variable: value})
        assert caught.value.message.startswith(f"environment variable {variable}: ")
        assert fragment in caught.value.message
    # Not settings, so never refused: the load test's, and Kubernetes' service links for a
    # "signedrec-server" Service (a refusal stopped the pod).
    others = {
        "SIGNEDREC_LT_RATE": "5",
        "SIGNEDREC_SERVER_SERVICE_HOST": "10.0.0.1",
        "SIGNEDREC_SERVER_PORT": "tcp://10.0.0.1:8000",
        "SIGNEDREC_LOG_LEVEL": "debug",
    }
    assert load_config(path, env=others).server.port == 8080
    path.write_text('[server]\nport = "abc"\n')
    with pytest.raises(ConfigError, match=re.escape(f"config file {path}: ")):
        load_config(path, env={"SIGNEDREC_SERVER__HOST": "127.0.0.1"})


@pytest.mark.parametrize(
    ("origin", "problem"),
    [
        ("https://a.b/app", r"\$\.access\.allowed_origins\[0\]"),
        ("https://a.b:84430", "Port out of range"),
    ],
)
def test_an_allowed_origin_must_be_an_origin(origin: str, problem: str) -> None:
    """A path or an impossible port would never match a browser's Origin: refused at start."""
    with pytest.raises(ConfigError, match="allowed_origins") as refused:
        load_config(env={"SIGNEDREC_ACCESS__ALLOWED_ORIGINS": f'["{origin}"]'})
    assert re.search(problem, refused.value.message)


def test_a_cross_field_error_from_a_variable_names_it(tmp_path: Path) -> None:
    """default_k above max_k set by a variable was blamed on a file that holds neither."""
    path = tmp_path / "ok.toml"
    path.write_text("[server]\nport = 8080\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"SIGNEDREC_RANKING__DEFAULT_K": "300"})
    assert caught.value.message.startswith(
        f"config file {path} with environment variables SIGNEDREC_RANKING__DEFAULT_K: "
    )
    assert "must not exceed ranking.max_k" in caught.value.message
    # Only the variables the check names: an unrelated one in the section is not blamed.
    path.write_text("[ranking]\ndefault_k = 300\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"SIGNEDREC_RANKING__SUPPRESSION_GAMMA": "0.5"})
    assert caught.value.message.startswith(f"config file {path}: ")


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"SIGNEDREC_SERVER__STATE_DIR": "  "}, "server.state_dir must not be blank"),
        ({"SIGNEDREC_ACCESS__KEYS": '{" k1": "admin"}'}, "surrounding whitespace"),
        ({"SIGNEDREC_ACCESS__KEYS": '{"": "admin"}'}, "is empty"),
        ({"SIGNEDREC_LOG__SNAPSHOT_RETRY_SECONDS": "1000"},
         r"log.snapshot_retry_seconds \(1000\) must not exceed"),
    ],
)  # fmt: skip
def test_values_that_could_never_act_as_meant_are_refused(env: dict[str, str], problem: str
                                                          ) -> None:  # fmt: skip
    """A blank state dir (taken as a folder named by spaces), a key no header can carry (every
    request 401), a retry wait above its own maximum (the maximum silently won) (review L)."""
    with pytest.raises(ConfigError, match=problem):
        load_config(env=env)


def test_a_variable_one_underscore_short_of_a_setting_is_warned(caplog: pytest.LogCaptureFixture
                                                                ) -> None:  # fmt: skip
    """SIGNEDREC_RANKING_MAX_K was ignored unseen; refusing it would stop pods whose Service
    links collide (SIGNEDREC_SERVER_PORT), so it is warned, naming the setting meant."""
    caplog.set_level(logging.WARNING, logger="signedrec.config")
    assert load_config(env={"SIGNEDREC_RANKING_MAX_K": "5"}).ranking.max_k == 200
    assert "SIGNEDREC_RANKING_MAX_K is ignored" in caplog.text
    assert "e.g. SIGNEDREC_RANKING__MAX_K" in caplog.text
    caplog.clear()
    load_config(env={"SIGNEDREC_LOG_LEVEL": "x", "SIGNEDREC_LT_RATE": "5"})
    assert caplog.text == ""
