"""Settings: sources in order, validation naming the setting, .env.example complete."""

from __future__ import annotations

import re

import pytest

from api.config import PROJECT_ROOT, ConfigError, Settings, load_settings


def test_defaults_then_env_file_then_environment_then_overrides(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("D3_SHUFFLE_SEED=3\nMAX_BATCH_FILES=10\nLOG_LEVEL=debug\n")
    settings = load_settings({"MAX_BATCH_FILES": "12"}, environ={"D3_SHUFFLE_SEED": "4"}, env_file=env_file)
    assert settings.d3_shuffle_seed == 4  # environment beats .env
    assert settings.max_batch_files == 12  # overrides beat both
    assert settings.log_level == "DEBUG"
    assert settings.default_threshold == 0.5  # untouched default
    assert load_settings(environ={"D3_SHUFFLE_SEED": ""}, env_file=env_file).d3_shuffle_seed == 3


@pytest.mark.parametrize("name,value,message", [
    ("MAX_BATCH_FILES", "many", "MAX_BATCH_FILES must be an integer"),
    ("MAX_BATCH_FILES", "0", "MAX_BATCH_FILES must be at least 1"),
    ("DEFAULT_THRESHOLD", "1.5", "DEFAULT_THRESHOLD must be at most 1.0"),
    ("KEEP_VIDEOS", "perhaps", "KEEP_VIDEOS must be true or false"),
    ("D3_PRECISION", "fp8", "D3_PRECISION must be one of"),
    ("D3_DEVICE", "tpu", "D3_DEVICE must be auto, cpu, cuda or cuda:N"),
    ("BIND", "nowhere", "BIND must be host:port"),
    ("METRICS_ALLOW", "10.0.0.0/33", "METRICS_ALLOW has an invalid network"),
])
def test_bad_values_are_refused_naming_the_setting(tmp_path, name, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings({name: value}, environ={}, env_file=tmp_path / "none")


def test_minio_needs_credentials(tmp_path):
    with pytest.raises(ConfigError, match="MINIO_ACCESS_KEY and MINIO_SECRET_KEY"):
        load_settings({"MINIO_ENDPOINT": "127.0.0.1:9000"}, environ={}, env_file=tmp_path / "none")


def test_auth_off_and_example_secrets_only_on_loopback(tmp_path):
    base = {"SECRET_KEY": "a-real-secret-value"}
    assert load_settings({**base, "AUTH_REQUIRED": "false"}, environ={}, env_file=tmp_path / "none").binds_loopback
    with pytest.raises(ConfigError, match="AUTH_REQUIRED=false is only allowed"):
        load_settings({**base, "AUTH_REQUIRED": "false", "BIND": "0.0.0.0:6000"}, environ={},
                      env_file=tmp_path / "none")
    with pytest.raises(ConfigError, match="SECRET_KEY must be set to a real secret"):
        load_settings({"SECRET_KEY": "change-me", "BIND": "0.0.0.0:6000"}, environ={}, env_file=tmp_path / "none")
    assert not load_settings({**base, "BIND": "0.0.0.0:6000"}, environ={}, env_file=tmp_path / "none").binds_loopback


def test_env_example_documents_every_setting():
    example = (PROJECT_ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z0-9_]+)=", example, re.MULTILINE))
    expected = {name.upper() for name in Settings.model_fields}
    assert expected - documented == set(), "settings missing from .env.example"
    assert documented - expected == set(), ".env.example names settings that do not exist"


def test_public_view_masks_secrets(tmp_path):
    view = load_settings({"SECRET_KEY": "s3cr3t-value"}, environ={}, env_file=tmp_path / "none").public_view()
    assert view["SECRET_KEY"] == "***"
    assert "s3cr3t-value" not in repr(view)


def test_lists_of_networks_and_origins_have_one_parser(tmp_path):
    settings = load_settings({"METRICS_ALLOW": " 10.1.2.3/8 ,, ::1/128", "CORS_ORIGINS": "https://a.example, https://b.example,"},
                             environ={}, env_file=tmp_path / "none")
    assert [str(n) for n in settings.metrics_allow] == ["10.0.0.0/8", "::1/128"]  # host bits dropped, blanks skipped
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert load_settings(environ={}, env_file=tmp_path / "none").cors_origins == ()
    assert load_settings(environ={}, env_file=tmp_path / "none").public_view()["METRICS_ALLOW"] == "127.0.0.0/8,::1/128"


def test_one_secret_policy_for_the_app_and_the_log_redaction(tmp_path):
    from api.config import SECRET_MIN_LENGTH, secret_problem
    from api.request_log import Redactor

    short = "x7" * ((SECRET_MIN_LENGTH - 1) // 2)
    assert secret_problem(short) and secret_problem("change-me") and secret_problem("")
    assert secret_problem("k" * SECRET_MIN_LENGTH) is None
    with pytest.raises(ConfigError, match=f"shorter than {SECRET_MIN_LENGTH}"):
        load_settings({"SECRET_KEY": short, "BIND": "0.0.0.0:6000"}, environ={}, env_file=tmp_path / "none")
    settings = load_settings({"SECRET_KEY": short}, environ={}, env_file=tmp_path / "none")  # loopback: allowed
    assert repr(settings.secret_key) != repr(short) and short not in repr(settings)  # SecretStr
    long_secret = "L" * SECRET_MIN_LENGTH
    redactor = Redactor()
    redactor.add_settings(load_settings({"SECRET_KEY": long_secret, "MINIO_SECRET_KEY": short},
                                        environ={}, env_file=tmp_path / "none"))
    assert redactor(f"a {long_secret} b") == "a *** b"
    assert redactor(f"a {short} b") == f"a {short} b"  # below the policy's length: too short to scrub safely
