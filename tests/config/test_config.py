"""gateway.config: defaults, interpolation, located problems, secrets, Braze instances, paths."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import msgspec
import pytest

from gateway.config.located import LineIndex
from gateway.config.settings import (
    AuthConfig,
    BrazeConfig,
    BrazeWebhooksConfig,
    Config,
    DeliveryConfig,
    DidomiApiConfig,
    DidomiConfig,
    MappingsConfig,
    ServerConfig,
    braze_base_url,
    load_config,
    secrets_of,
)
from gateway.errors import ConfigError, GatewayError, Problem

MINIMAL = """\
[auth]
client_secret = "didomi-secret"

[braze]
server = "US-01"
api_key = "braze-key"
"""


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    """Write a config file (dedented) into tmp_path and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(path: Path, needle: str) -> int:
    """The 1-based line of the first line of `path` that contains `needle`."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def problems_of(path: Path, env: dict[str, str] | None = None, **kwargs: bool) -> ConfigError:
    """Load `path`, expecting a ConfigError, and return it."""
    with pytest.raises(ConfigError) as info:
        load_config(path, env if env is not None else {}, **kwargs)
    return info.value


def lines(error: ConfigError) -> list[str]:
    """Every problem of a ConfigError as its `file:line: message` text."""
    return [str(p) for p in error.problems]


# ---------------------------------------------------------------------------
# Defaults (DESIGN section 4 and the defaults named in section 8).


def test_defaults_are_the_example_values_of_section_4(tmp_path: Path) -> None:
    """A config naming only the required values gets every other value from DESIGN section 4."""
    config = load_config(write(tmp_path, MINIMAL), {})
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.server.max_body_bytes == 1_048_576
    assert config.auth.mode == "oauth2"
    assert config.auth.client_id == "didomi"
    assert config.auth.token_ttl_s == 3600
    assert config.braze.update_existing_only is True
    assert config.braze.batch_size == 75
    assert config.braze.flush_interval_ms == 100
    assert config.braze.max_in_flight == 8
    assert config.braze.timeout_s == 10
    assert config.braze.requests_per_second == 1000
    assert config.delivery.retry_initial_ms == 250
    assert config.delivery.retry_max_ms == 60_000
    assert config.delivery.give_up_after_s == 86_400
    assert config.didomi.regulations == ["gdpr"]
    assert config.mappings.watch is True
    # Paths keep their default names, resolved against the config folder.
    assert Path(config.delivery.spool) == tmp_path / "var" / "gateway.db"
    assert Path(config.mappings.dir) == tmp_path / "mappings"


def test_defaults_named_in_section_8(tmp_path: Path) -> None:
    """The defaults section 8 and section 7 add: dedupe window, max pending, user deletion, API."""
    config = load_config(write(tmp_path, MINIMAL), {})
    assert config.delivery.dedupe_window_s == 7 * 86_400
    assert config.delivery.max_pending == 1_000_000
    assert config.didomi.on_user_deleted == "ignore"
    assert config.didomi_api.enabled is False
    assert config.didomi_api.base_url == "https://api.didomi.io/v1"
    assert config.didomi_api.regulation == "gdpr"


def test_struct_defaults_match_the_loaded_defaults() -> None:
    """The Struct defaults themselves hold the section 4 values, so code building them agrees."""
    assert ServerConfig() == ServerConfig(host="127.0.0.1", port=8080, max_body_bytes=1_048_576)
    assert AuthConfig().mode == "oauth2"
    assert BrazeConfig().batch_size == 75
    assert DeliveryConfig().spool == "var/gateway.db"
    assert DidomiConfig().regulations == ["gdpr"]
    assert MappingsConfig() == MappingsConfig(dir="mappings", watch=True)
    assert DidomiApiConfig().enabled is False


def test_the_repository_example_config_loads(tmp_path: Path) -> None:
    """The shipped gateway.toml loads once its secrets are in the environment."""
    example = Path(__file__).resolve().parents[2] / "gateway.toml"
    env = {"DIDOMI_CLIENT_SECRET": "s", "BRAZE_API_KEY": "k"}
    config = load_config(example, env)
    assert config.braze.server == "US-01"
    assert config.auth.client_secret == "s"
    assert config.braze.api_key == "k"


# ---------------------------------------------------------------------------
# ${VAR} interpolation.


def test_variables_are_replaced_from_the_environment(tmp_path: Path) -> None:
    """`${VAR}` takes the variable's value, even in the middle of a longer string."""
    path = write(
        tmp_path,
        """\
        [auth]
        client_secret = "${SECRET}"

        [braze]
        server = "https://${BRAZE_HOST}/"
        api_key = "prefix-${KEY}-suffix"
        """,
    )
    env = {"SECRET": "s3", "BRAZE_HOST": "braze.example.com", "KEY": "k"}
    config = load_config(path, env)
    assert config.auth.client_secret == "s3"
    assert config.braze.server == "https://braze.example.com/"
    assert config.braze.api_key == "prefix-k-suffix"


def test_default_is_used_when_the_variable_is_missing(tmp_path: Path) -> None:
    """`${VAR:-default}` falls back to its default, and an empty default is allowed."""
    path = write(
        tmp_path,
        """\
        [server]
        host = "${HOST:-10.0.0.1}"

        [auth]
        client_secret = "s"
        client_id = "${CLIENT:-}x"

        [braze]
        server = "${BRAZE_SERVER:-EU-01}"
        api_key = "k"
        """,
    )
    config = load_config(path, {})
    assert config.server.host == "10.0.0.1"
    assert config.braze.server == "EU-01"
    assert config.auth.client_id == "x"


def test_a_set_variable_beats_its_default(tmp_path: Path) -> None:
    """When the variable is set, `${VAR:-default}` takes the variable, not the default."""
    path = write(tmp_path, MINIMAL + '[server]\nhost = "${HOST:-10.0.0.1}"\n')
    assert load_config(path, {"HOST": "10.1.2.3"}).server.host == "10.1.2.3"


def test_an_empty_variable_takes_the_default(tmp_path: Path) -> None:
    """`${VAR:-default}` uses the default when VAR is set but empty, as in the shell."""
    path = write(tmp_path, MINIMAL.replace('"US-01"', '"${BRAZE_SERVER:-US-01}"'))
    assert load_config(path, {"BRAZE_SERVER": ""}).braze.server == "US-01"


def test_variables_inside_lists_of_strings_are_replaced(tmp_path: Path) -> None:
    """Interpolation reaches strings inside arrays too (bearer tokens, regulations)."""
    path = write(
        tmp_path,
        """\
        [auth]
        mode = "bearer"
        tokens = ["${TOKEN_A}", "${TOKEN_B:-b}"]

        [braze]
        server = "US-01"
        api_key = "k"

        [didomi]
        regulations = ["${REG}"]
        """,
    )
    config = load_config(path, {"TOKEN_A": "a", "REG": "cpra"})
    assert config.auth.tokens == ["a", "b"]
    assert config.didomi.regulations == ["cpra"]


def test_interpolation_happens_only_inside_strings(tmp_path: Path) -> None:
    """`${...}` in comments is ignored, and a number written as "${PORT}" stays a string (error)."""
    path = write(
        tmp_path,
        MINIMAL
        + textwrap.dedent(
            """\
            # port = "${NOT_SET_IN_A_COMMENT}"
            [server]
            port = 9090 # ${ALSO_NOT_SET}
            """
        ),
    )
    assert load_config(path, {}).server.port == 9090

    typed = write(tmp_path, MINIMAL + '[server]\nport = "${PORT}"\n', name="typed.toml")
    error = problems_of(typed, {"PORT": "9090"})
    line = line_of(typed, "port =")
    assert lines(error) == [f"{typed}:{line}: server.port: expected `int`, got `str`"]


def test_a_missing_variable_is_an_error_naming_it_on_its_line(tmp_path: Path) -> None:
    """A missing `${VAR}` without default is reported as `file:line:` naming the variable."""
    path = write(
        tmp_path,
        """\
        [auth]
        client_secret = "s"

        [braze]
        server = "US-01"
        api_key = "${BRAZE_API_KEY}"
        """,
    )
    error = problems_of(path, {})
    line = line_of(path, "api_key")
    assert len(error.problems) == 1  # not also "api_key is required" for the same key
    problem = error.problems[0]
    assert problem.line == line
    assert str(problem).startswith(f"{path}:{line}: environment variable BRAZE_API_KEY is not set")
    assert "BRAZE_API_KEY" in str(error)
    # A secret is set, never given a default in the file: the hint does not suggest one.
    assert ":-default" not in problem.message
    assert "export BRAZE_API_KEY" in problem.message


def test_a_missing_variable_outside_a_secret_may_be_given_a_default(tmp_path: Path) -> None:
    """For a setting that is not a secret, writing `${VAR:-default}` is the other way out."""
    path = write(
        tmp_path,
        """\
        [braze]
        server = "${BRAZE_SERVER}"
        api_key = "k"
        """,
    )
    (problem,) = [p for p in problems_of(path, {}).problems if "BRAZE_SERVER" in p.message]
    assert "environment variable BRAZE_SERVER is not set" in problem.message
    assert "${BRAZE_SERVER:-default}" in problem.message


def test_every_missing_variable_is_reported(tmp_path: Path) -> None:
    """Two missing variables on two lines give two problems, each on its own line."""
    path = write(
        tmp_path,
        """\
        [auth]
        client_secret = "${DIDOMI_CLIENT_SECRET}"

        [braze]
        server = "US-01"
        api_key = "${BRAZE_API_KEY}"
        """,
    )
    error = problems_of(path, {})
    assert [(p.line, p.message.split(" is not set")[0]) for p in error.problems] == [
        (line_of(path, "client_secret"), "environment variable DIDOMI_CLIENT_SECRET"),
        (line_of(path, "api_key"), "environment variable BRAZE_API_KEY"),
    ]


def test_load_config_reads_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an explicit env mapping, the process environment is used."""
    monkeypatch.setenv("GATEWAY_TEST_KEY", "from-os")
    path = write(
        tmp_path,
        '[auth]\nclient_secret = "s"\n[braze]\nserver = "US-01"\napi_key = "${GATEWAY_TEST_KEY}"\n',
    )
    assert load_config(path).braze.api_key == "from-os"
    assert os.environ["GATEWAY_TEST_KEY"] == "from-os"


# ---------------------------------------------------------------------------
# Unknown keys and sections, wrong types: each on its line.


def test_unknown_key_is_an_error_on_its_line_with_a_hint(tmp_path: Path) -> None:
    """A typo in a key is reported on its line, with a did-you-mean hint and the allowed keys."""
    path = write(tmp_path, MINIMAL + "\n[server]\nprot = 8080\n")
    error = problems_of(path)
    line = line_of(path, "prot")
    assert lines(error) == [
        f"{path}:{line}: unknown key 'prot' (did you mean 'port'?); allowed: allow_from, host, "
        "intake_processes, max_body_bytes, port, shutdown_timeout_s"
    ]


def test_unknown_key_without_a_close_match_has_no_hint(tmp_path: Path) -> None:
    """A key resembling nothing is still an error, just without a did-you-mean."""
    path = write(tmp_path, MINIMAL + "zzzzzz = 1\n")  # lands in [braze], the last table
    error = problems_of(path)
    (text,) = lines(error)
    assert text.startswith(f"{path}:{line_of(path, 'zzzzzz')}: unknown key 'zzzzzz'; allowed: ")
    assert "did you mean" not in text


def test_unknown_section_is_an_error_on_its_line(tmp_path: Path) -> None:
    """An unknown [section] is reported on its header line, with the closest known section."""
    path = write(tmp_path, MINIMAL + "\n[sever]\nport = 1\n")
    error = problems_of(path)
    line = line_of(path, "[sever]")
    assert lines(error) == [
        f"{path}:{line}: unknown section [sever] (did you mean [server]?); allowed: auth, backfill,"
        " braze, braze_webhooks, check, delivery, didomi, didomi_api, mappings, retention, server"
    ]


def test_wrong_types_are_reported_on_their_lines(tmp_path: Path) -> None:
    """A value of the wrong type is reported as `file:line: section.key: expected ...`."""
    path = write(
        tmp_path,
        MINIMAL
        + textwrap.dedent(
            """\
            update_existing_only = "yes"

            [server]
            port = "8080"

            [didomi]
            regulations = ["gdpr", 5]

            [mappings]
            watch = 1
            """
        ),
    )
    error = problems_of(path)
    assert lines(error) == [
        f"{path}:{line_of(path, 'update_existing_only')}: braze.update_existing_only: "
        "expected `bool`, got `str`",
        f"{path}:{line_of(path, 'port =')}: server.port: expected `int`, got `str`",
        f"{path}:{line_of(path, 'regulations')}: didomi.regulations[1]: expected `str`, got `int`",
        f"{path}:{line_of(path, 'watch')}: mappings.watch: expected `bool`, got `int`",
    ]


def test_an_invalid_choice_is_reported_on_its_line_with_the_values_allowed(tmp_path: Path) -> None:
    """A value outside a fixed set (auth.mode, on_user_deleted) is an error on its line that
    lists the values to write instead."""
    path = write(
        tmp_path,
        MINIMAL.replace("[auth]\n", '[auth]\nmode = "oauth"\n')
        + '[didomi]\non_user_deleted = "purge"\n',
    )
    error = problems_of(path)
    assert lines(error) == [
        f"{path}:{line_of(path, 'mode')}: auth.mode: invalid value 'oauth';"
        " use 'oauth2', 'bearer' or 'none'",
        f"{path}:{line_of(path, 'on_user_deleted')}: didomi.on_user_deleted: invalid value"
        " 'purge'; use 'ignore', 'unsubscribe' or 'delete'",
    ]


def test_a_section_that_is_not_a_table_is_an_error(tmp_path: Path) -> None:
    """`server = 5` instead of a [server] table is reported on its line."""
    path = write(tmp_path, "server = 5\n" + MINIMAL)
    error = problems_of(path)
    (problem,) = error.problems
    assert problem.line == 1
    assert "expected a table" in problem.message


def test_several_problems_are_reported_in_one_run(tmp_path: Path) -> None:
    """One load reports every problem of the file, sorted by line, not just the first."""
    path = write(
        tmp_path,
        """\
        [server]
        prot = 8080
        host = 5

        [auth]
        mode = "basic"

        [braze]
        server = "US-01"
        api_key = "${BRAZE_KEY}"
        batch_size = 100

        [sever]
        x = 1
        """,
    )
    error = problems_of(path, {})
    assert [p.line for p in error.problems] == [2, 3, 6, 10, 11, 13]
    text = str(error)
    assert f"{path}:2: unknown key 'prot'" in text
    assert f"{path}:3: server.host: expected `str`, got `int`" in text
    assert f"{path}:6: auth.mode: invalid value 'basic'" in text
    assert f"{path}:10: environment variable BRAZE_KEY is not set" in text
    assert f"{path}:11: braze.batch_size must be between 1 and 75" in text
    assert f"{path}:13: unknown section [sever] (did you mean [server]?)" in text
    assert isinstance(error, GatewayError)


def test_two_wrong_values_in_one_section_are_both_reported(tmp_path: Path) -> None:
    """Two wrongly typed keys of one section give two problems, each on its line."""
    path = write(tmp_path, MINIMAL + '[server]\nport = "x"\nhost = 5\n')
    error = problems_of(path)
    assert [p.line for p in error.problems] == [line_of(path, "port ="), line_of(path, "host =")]


def test_problem_formats() -> None:
    """Problem renders `file:line: message`, else `file: path: message`, else `file: message`."""
    assert str(Problem("g.toml", "bad", line=3)) == "g.toml:3: bad"
    assert str(Problem("g.toml", "bad", path="braze.server")) == "g.toml: braze.server: bad"
    assert str(Problem("g.toml", "bad")) == "g.toml: bad"
    error = ConfigError([Problem("a", "x", line=1), Problem("b", "y")])
    assert str(error) == "a:1: x\nb: y"


def test_line_index_finds_keys_tables_and_array_entries() -> None:
    """LineIndex places keys, tables and the Nth [[array]] entry, falling back to the parent."""
    index = LineIndex(
        textwrap.dedent(
            """\
            top = 1
            [server]
            port = 1
            [[map]]
            to = "a"
            [[map]]
            "to" = "b"
            """
        )
    )
    assert index.line(("top",)) == 1
    assert index.line(("server",)) == 2
    assert index.line(("server", "port")) == 3
    assert index.line(("server", "host")) == 2  # unknown key: its table's line
    assert index.line(("map", 0)) == 4
    assert index.line(("map", 1, "to")) == 7
    assert index.line(("nothing",)) is None


# ---------------------------------------------------------------------------
# Unreadable and malformed files.


def test_a_missing_file_is_a_problem_that_says_how_to_name_it(tmp_path: Path) -> None:
    """A config path that does not exist is a ConfigError naming the file, the reason, and
    how to give the right one (a command run outside the config's folder meets it first)."""
    path = tmp_path / "absent.toml"
    error = problems_of(path)
    assert lines(error) == [
        f"{path}: cannot read the file: No such file or directory; give the config's path with"
        " --config PATH (`gateway render` and `gateway test` need only --mappings DIR)"
    ]


def test_a_directory_is_an_unreadable_file(tmp_path: Path) -> None:
    """A folder given as the config file is reported, not a crash."""
    path = tmp_path / "dir.toml"
    path.mkdir()
    error = problems_of(path)
    assert lines(error) == [f"{path}: cannot read the file: Is a directory"]


def test_invalid_utf8_is_an_unreadable_file(tmp_path: Path) -> None:
    """A file that is not UTF-8 is reported as unreadable with the decoding reason."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    error = problems_of(path)
    (text,) = lines(error)
    assert text.startswith(f"{path}: cannot read the file: 'utf-8' codec can't decode")


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read a chmod 000 file"
)
def test_a_file_without_read_permission_is_a_problem(tmp_path: Path) -> None:
    """A file the process may not read is reported as unreadable."""
    path = write(tmp_path, MINIMAL)
    path.chmod(0)
    try:
        error = problems_of(path)
    finally:
        path.chmod(0o600)
    assert lines(error) == [f"{path}: cannot read the file: Permission denied"]


def test_invalid_toml_is_reported_with_its_line(tmp_path: Path) -> None:
    """A TOML syntax error is one problem, on the line tomllib names, without the position text."""
    path = write(tmp_path, '[server]\nhost = "a"\nport = = 1\n')
    error = problems_of(path)
    (problem,) = error.problems
    assert problem.line == 3
    assert str(problem).startswith(f"{path}:3: invalid TOML: ")
    assert "(at line" not in problem.message


# ---------------------------------------------------------------------------
# Required values and secrets.


def test_braze_server_is_required(tmp_path: Path) -> None:
    """Without braze.server the load fails with a message saying what to write."""
    path = write(tmp_path, '[auth]\nclient_secret = "s"\n[braze]\napi_key = "k"\n')
    error = problems_of(path)
    (problem,) = error.problems
    assert problem.line == 3  # the [braze] table
    assert "braze.server is required" in problem.message


def test_braze_server_is_required_even_without_a_braze_section(tmp_path: Path) -> None:
    """A file with no [braze] at all still reports server and api_key as missing."""
    path = write(tmp_path, '[auth]\nclient_secret = "s"\n')
    text = str(problems_of(path))
    assert "braze.server is required" in text
    assert "braze.api_key is required" in text


def test_braze_api_key_is_required(tmp_path: Path) -> None:
    """Without braze.api_key the load fails naming the key."""
    path = write(tmp_path, '[auth]\nclient_secret = "s"\n[braze]\nserver = "US-01"\n')
    error = problems_of(path)
    assert lines(error) == [f"{path}:3: braze.api_key is required (use ${{BRAZE_API_KEY}})"]


def test_oauth2_requires_a_client_secret(tmp_path: Path) -> None:
    """mode = "oauth2" (the default) needs auth.client_secret."""
    path = write(tmp_path, '[braze]\nserver = "US-01"\napi_key = "k"\n')
    error = problems_of(path)
    (problem,) = error.problems
    assert problem.message == 'auth.client_secret is required for mode "oauth2"'


def test_oauth2_client_secret_must_not_be_empty(tmp_path: Path) -> None:
    """An empty client_secret (e.g. a variable set to "") counts as missing."""
    path = write(tmp_path, MINIMAL.replace('"didomi-secret"', '"${SECRET}"'))
    error = problems_of(path, {"SECRET": ""})
    assert [p.line for p in error.problems] == [line_of(path, "client_secret")]
    assert "client_secret is required" in str(error)


def test_bearer_requires_tokens(tmp_path: Path) -> None:
    """mode = "bearer" needs at least one non-empty token, and not a client_secret."""
    path = write(tmp_path, '[auth]\nmode = "bearer"\n[braze]\nserver = "US-01"\napi_key = "k"\n')
    error = problems_of(path)
    (problem,) = error.problems
    assert problem.message == 'auth.tokens must list a token for mode "bearer"'

    empty = write(
        tmp_path,
        '[auth]\nmode = "bearer"\ntokens = [""]\n[braze]\nserver = "US-01"\napi_key = "k"\n',
        name="empty.toml",
    )
    error = problems_of(empty)
    assert lines(error) == [f'{empty}:3: auth.tokens must list a token for mode "bearer"']

    good = write(
        tmp_path,
        '[auth]\nmode = "bearer"\ntokens = ["t"]\n[braze]\nserver = "US-01"\napi_key = "k"\n',
        name="good.toml",
    )
    assert load_config(good, {}).auth.tokens == ["t"]


def test_mode_none_requires_no_auth_secret(tmp_path: Path) -> None:
    """mode = "none" loads without a client secret or tokens."""
    path = write(tmp_path, '[auth]\nmode = "none"\n[braze]\nserver = "US-01"\napi_key = "k"\n')
    assert load_config(path, {}).auth.mode == "none"


def test_didomi_api_requires_its_secrets_when_enabled(tmp_path: Path) -> None:
    """[didomi_api] enabled needs organization_id, key and secret."""
    path = write(tmp_path, MINIMAL + "[didomi_api]\nenabled = true\n")
    text = str(problems_of(path))
    for name in ("organization_id", "key", "secret"):
        assert f"didomi_api.{name} is required when enabled" in text


def test_require_secrets_false_relaxes_secrets_and_missing_variables(tmp_path: Path) -> None:
    """With require_secrets=False, missing variables and secrets are not errors (render, test)."""
    path = write(
        tmp_path,
        """\
        [auth]
        client_secret = "${DIDOMI_CLIENT_SECRET}"

        [braze]
        server = "US-01"
        api_key = "${BRAZE_API_KEY}"
        """,
    )
    config = load_config(path, {}, require_secrets=False)
    assert config.braze.api_key == ""
    assert config.auth.client_secret == ""

    bearer = write(
        tmp_path, '[auth]\nmode = "bearer"\n[braze]\nserver = "US-01"\n', name="bearer.toml"
    )
    assert load_config(bearer, {}, require_secrets=False).auth.tokens == []


def test_require_secrets_false_still_checks_everything_else(tmp_path: Path) -> None:
    """Relaxing secrets does not relax unknown keys, types or braze.server."""
    path = write(tmp_path, "[braze]\nbatch_size = 76\ncolour = 1\n")
    error = problems_of(path, require_secrets=False)
    text = str(error)
    assert "braze.server is required" in text
    assert f"{path}:2: braze.batch_size must be between 1 and 75" in text
    assert f"{path}:3: unknown key 'colour'" in text
    assert "api_key is required" not in text


def test_batch_size_above_75_is_refused(tmp_path: Path) -> None:
    """braze.batch_size 76 is an error on its line; 75 and 1 are accepted."""
    path = write(tmp_path, MINIMAL + "batch_size = 76\n")
    error = problems_of(path)
    assert lines(error) == [
        f"{path}:{line_of(path, 'batch_size')}: braze.batch_size must be between 1 and 75 "
        "(Braze's limit per request)"
    ]
    for size in (1, 75):
        ok = write(tmp_path, MINIMAL + f"batch_size = {size}\n", name=f"ok{size}.toml")
        assert load_config(ok, {}).braze.batch_size == size


def test_delete_prioritization_takes_only_the_orders_braze_allows(tmp_path: Path) -> None:
    """braze.delete_prioritization defaults to Braze's documented example order; an empty list,
    an unknown value, a repeat, or identified with unidentified is an error on its line."""
    assert BrazeConfig().delete_prioritization == ["identified", "most_recently_updated"]
    for bad in (
        "[]",
        '["newest"]',
        '["identified", "identified"]',
        '["identified", "unidentified"]',
    ):
        path = write(tmp_path, MINIMAL + f"delete_prioritization = {bad}\n", name="bad.toml")
        [problem] = lines(problems_of(path))
        assert problem.startswith(f"{path}:{line_of(path, 'delete_prioritization')}: ")
        assert "braze.delete_prioritization" in problem
    ok = write(tmp_path, MINIMAL + 'delete_prioritization = ["unidentified"]\n', name="ok.toml")
    assert load_config(ok, {}).braze.delete_prioritization == ["unidentified"]


def test_non_positive_numbers_are_refused(tmp_path: Path) -> None:
    """Counts and durations that must be positive are errors at zero, each on its line."""
    path = write(
        tmp_path,
        MINIMAL
        + textwrap.dedent(
            """\
            max_in_flight = 0
            timeout_s = 0

            [delivery]
            max_pending = 0
            retry_initial_ms = 500
            retry_max_ms = 100

            [server]
            port = 70000
            """
        ),
    )
    text = str(problems_of(path))
    assert f"{path}:{line_of(path, 'max_in_flight')}: braze.max_in_flight must be positive" in text
    assert f"{path}:{line_of(path, 'timeout_s')}: braze.timeout_s must be positive" in text
    assert f"{path}:{line_of(path, 'max_pending')}: delivery.max_pending must be positive" in text
    assert f"{path}:{line_of(path, 'retry_max_ms')}: delivery.retry_max_ms must not be" in text
    assert f"{path}:{line_of(path, 'port =')}: server.port must be between 1 and 65535" in text


def test_backfill_limits_are_refused_each_at_its_key(tmp_path: Path) -> None:
    """A backfill share outside (0, 1] and a zero max_pending are each an error on their own
    line, naming the key once (not `backfill: backfill.share` at the table's header)."""
    path = write(
        tmp_path,
        MINIMAL + "[backfill]\nshare = 2.0\nmax_pending = 0\nusers_per_transaction = 0\n",
    )
    assert lines(problems_of(path)) == [
        f"{path}:{line_of(path, 'share')}: backfill.share must be above 0 and at most 1"
        " (of Braze's rate)",
        f"{path}:{line_of(path, 'max_pending')}: backfill.max_pending must be at least 1",
        f"{path}:{line_of(path, 'users_per_transaction')}: backfill.users_per_transaction must"
        " be at least 1",
    ]


def test_the_disk_reserve_defaults_to_64_mib_and_refuses_less_than_1_mib(tmp_path: Path) -> None:
    """delivery.min_free_bytes is 64 MiB unless set, and below 1 MiB it is an error on its line."""
    assert load_config(write(tmp_path, MINIMAL), {}).delivery.min_free_bytes == 64 * 1024 * 1024
    path = write(tmp_path, MINIMAL + "\n[delivery]\nmin_free_bytes = 4096\n")
    text = str(problems_of(path))
    line = line_of(path, "min_free_bytes")
    assert f"{path}:{line}: delivery.min_free_bytes must be at least 1048576 (1 MiB)" in text


def test_an_unknown_instance_name_in_the_config_is_an_error(tmp_path: Path) -> None:
    """braze.server = "US-09" is reported on its line, listing the known instances."""
    path = write(tmp_path, MINIMAL.replace('"US-01"', '"US-09"'))
    error = problems_of(path)
    (problem,) = error.problems
    assert problem.line == line_of(path, "server =")
    assert "unknown Braze instance 'US-09'" in problem.message
    assert "US-01" in problem.message


# ---------------------------------------------------------------------------
# braze_base_url.


@pytest.mark.parametrize("n", range(1, 9))
def test_us_instances_map_to_iad_hosts(n: int) -> None:
    """US-01..US-08 are https://rest.iad-0N.braze.com."""
    assert braze_base_url(f"US-0{n}") == f"https://rest.iad-0{n}.braze.com"


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("US-10", "https://rest.us-10.braze.com"),
        ("EU-01", "https://rest.fra-01.braze.eu"),
        ("EU-02", "https://rest.fra-02.braze.eu"),
        ("AU-01", "https://rest.au-01.braze.com"),
        ("ID-01", "https://rest.id-01.braze.com"),
        ("JP-01", "https://rest.jp-01.braze.com"),
        ("KR-01", "https://rest.kr-01.braze.com"),
    ],
)
def test_other_instances(name: str, url: str) -> None:
    """US-10, EU-01/02, AU-01, ID-01, JP-01 and KR-01 map to their documented hosts."""
    assert braze_base_url(name) == url


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("us-01", "https://rest.iad-01.braze.com"),
        ("eu-02", "https://rest.fra-02.braze.eu"),
        ("jp-01", "https://rest.jp-01.braze.com"),
        (" US-10 ", "https://rest.us-10.braze.com"),
    ],
)
def test_instance_names_are_case_insensitive(name: str, url: str) -> None:
    """Lowercase instance names (and surrounding spaces) are accepted."""
    assert braze_base_url(name) == url


def test_a_host_becomes_an_https_url() -> None:
    """A bare host (with or without port) is reached over https."""
    assert braze_base_url("rest.iad-01.braze.com") == "https://rest.iad-01.braze.com"
    assert braze_base_url("braze.example.com:8443") == "https://braze.example.com:8443"


def test_a_url_is_kept_with_its_trailing_slash_stripped() -> None:
    """A full URL is used as is, minus trailing slashes, http allowed (tests)."""
    assert braze_base_url("http://127.0.0.1:9000") == "http://127.0.0.1:9000"
    assert braze_base_url("http://127.0.0.1:9000/") == "http://127.0.0.1:9000"
    assert braze_base_url("https://rest.fra-01.braze.eu/") == "https://rest.fra-01.braze.eu"


def test_an_ip_address_host_is_a_host() -> None:
    """An IP address with a port is a host too, and becomes an https URL."""
    assert braze_base_url("127.0.0.1:9000") == "https://127.0.0.1:9000"


@pytest.mark.parametrize("name", ["US-09", "XX-01", "eu-03"])
def test_an_unknown_instance_name_is_an_error(name: str) -> None:
    """A name shaped like an instance but not one is a ValueError listing the known ones."""
    with pytest.raises(ValueError, match="unknown Braze instance") as info:
        braze_base_url(name)
    assert "KR-01" in str(info.value)


@pytest.mark.parametrize("server", ["nonsense", "", "US01"])
def test_something_that_is_no_name_host_or_url_is_an_error(server: str) -> None:
    """A value that is neither an instance name, a host nor a URL is a ValueError."""
    with pytest.raises(ValueError, match="is not a Braze instance name"):
        braze_base_url(server)


# ---------------------------------------------------------------------------
# Paths and immutability.


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative spool and mappings paths are relative to the config file, not the cwd."""
    folder = tmp_path / "etc" / "gateway"
    folder.mkdir(parents=True)
    path = write(
        folder, MINIMAL + '[delivery]\nspool = "data/spool.db"\n[mappings]\ndir = "rules"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path, {})
    assert Path(config.delivery.spool) == folder / "data" / "spool.db"
    assert Path(config.mappings.dir) == folder / "rules"


def test_relative_paths_leading_out_of_the_config_folder_are_written_plainly(
    tmp_path: Path,
) -> None:
    """`../mappings` from examples/demo.toml is `<root>/mappings`, so the rule paths that check,
    trace and the audit trail print never read `examples/../mappings/email.toml:7`."""
    folder = tmp_path / "examples"
    folder.mkdir()
    path = write(
        folder, MINIMAL + '[delivery]\nspool = "../var/demo.db"\n[mappings]\ndir = "../mappings"\n'
    )
    config = load_config(path, {})
    assert config.delivery.spool == str(tmp_path.resolve() / "var" / "demo.db")
    assert config.mappings.dir == str(tmp_path.resolve() / "mappings")


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    """Absolute spool and mappings paths are used as written."""
    spool, rules = tmp_path / "abs" / "s.db", tmp_path / "abs" / "rules"
    path = write(
        tmp_path, MINIMAL + f'[delivery]\nspool = "{spool}"\n[mappings]\ndir = "{rules}"\n'
    )
    config = load_config(path, {})
    assert config.delivery.spool == str(spool)
    assert config.mappings.dir == str(rules)


def test_config_structs_are_frozen(tmp_path: Path) -> None:
    """Assigning to a loaded config or any of its sections raises."""
    config = load_config(write(tmp_path, MINIMAL), {})
    with pytest.raises(AttributeError):
        config.braze = BrazeConfig()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.braze.api_key = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Config().auth.mode = "none"  # type: ignore[misc]


def test_config_structs_forbid_unknown_fields() -> None:
    """The Structs themselves refuse unknown keys, so no path around the loader accepts typos."""
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"prot": 1}, ServerConfig)


def test_clock_skew_defaults_to_five_minutes_and_may_not_be_negative(tmp_path: Path) -> None:
    """didomi.max_clock_skew_s is 300 by default; a negative tolerance is refused on its line."""
    assert load_config(write(tmp_path, MINIMAL), {}).didomi.max_clock_skew_s == 300
    path = write(tmp_path, MINIMAL + "[didomi]\nmax_clock_skew_s = -1\n")
    assert lines(problems_of(path)) == [
        f"{path}:{line_of(path, 'max_clock_skew_s')}: didomi.max_clock_skew_s must not be negative"
    ]


# ---------------------------------------------------------------------------
# The reverse path (DESIGN sections 7 and 9): [didomi_api] and [braze_webhooks].


def test_reverse_path_defaults(tmp_path: Path) -> None:
    """Without the tables the Braze routes are off and the Didomi client has its defaults."""
    config = load_config(write(tmp_path, MINIMAL), {})
    assert config.braze_webhooks is None
    api = config.didomi_api
    assert (api.disable_integrations, api.timeout_s, api.requests_per_second) == (
        False,
        10.0,
        100.0,
    )
    assert BrazeWebhooksConfig() == BrazeWebhooksConfig(tokens=[], echo_window_s=3600.0)


def test_the_reverse_path_tables_of_section_9_load(tmp_path: Path) -> None:
    """The [braze_webhooks] and [didomi_api] tables of DESIGN section 9 load as written."""
    path = write(
        tmp_path,
        MINIMAL
        + textwrap.dedent(
            """            [braze_webhooks]
            tokens = ["${BRAZE_WEBHOOK_TOKEN}"]

            [didomi_api]
            enabled = true
            base_url = "https://api.didomi.io/v1"
            organization_id = "acme"
            key = "${DIDOMI_API_KEY}"
            secret = "${DIDOMI_API_SECRET}"
            regulation = "gdpr"
            disable_integrations = true
            """
        ),
    )
    env = {"BRAZE_WEBHOOK_TOKEN": "hook-token", "DIDOMI_API_KEY": "k", "DIDOMI_API_SECRET": "s"}
    config = load_config(path, env)
    assert config.braze_webhooks == BrazeWebhooksConfig(tokens=["hook-token"])
    assert config.didomi_api.disable_integrations is True
    assert (config.didomi_api.key, config.didomi_api.secret) == ("k", "s")


def test_reverse_path_problems_each_on_its_line(tmp_path: Path) -> None:
    """A bad base_url, non-positive pace and timeout, an empty token and a negative window."""
    path = write(
        tmp_path,
        MINIMAL
        + textwrap.dedent(
            """            [didomi_api]
            enabled = true
            organization_id = "acme"
            key = "k"
            secret = "s"
            base_url = "api.didomi.io/v1"
            timeout_s = 0
            requests_per_second = -1

            [braze_webhooks]
            tokens = [""]
            echo_window_s = -1
            """
        ),
    )
    at = {needle: line_of(path, needle) for needle in ("base_url", "timeout_s", "requests_")}
    assert lines(problems_of(path)) == [
        f"{path}:{at['base_url']}: didomi_api.base_url must be an http(s) URL, e.g. "
        "https://api.didomi.io/v1, not 'api.didomi.io/v1'",
        f"{path}:{at['timeout_s']}: didomi_api.timeout_s must be positive",
        f"{path}:{at['requests_']}: didomi_api.requests_per_second must be positive",
        f"{path}:{line_of(path, 'tokens')}: braze_webhooks.tokens must list a token (use "
        "${BRAZE_WEBHOOK_TOKEN}), or leave the table out to turn the Braze routes off",
        f"{path}:{line_of(path, 'echo_window_s')}: braze_webhooks.echo_window_s must not be "
        "negative",
    ]


def test_an_empty_braze_webhooks_table_needs_a_token_unless_secrets_are_relaxed(
    tmp_path: Path,
) -> None:
    """An empty [braze_webhooks] lacks its tokens; render and test (no secrets) still load it."""
    api = '[didomi_api]\nenabled = true\norganization_id = "acme"\nkey = "k"\nsecret = "s"\n'
    path = write(tmp_path, MINIMAL + api + "[braze_webhooks]\n")
    assert lines(problems_of(path)) == [
        f"{path}:{line_of(path, 'braze_webhooks')}: braze_webhooks.tokens must list a token "
        "(use ${BRAZE_WEBHOOK_TOKEN}), or leave the table out to turn the Braze routes off"
    ]
    relaxed = load_config(path, {}, require_secrets=False)
    assert relaxed.braze_webhooks == BrazeWebhooksConfig()


def test_braze_webhooks_unknown_keys_and_wrong_types_are_located(tmp_path: Path) -> None:
    """A typo and a wrong type inside [braze_webhooks] are each reported on their line."""
    path = write(tmp_path, MINIMAL + '[braze_webhooks]\ntoken = ["t"]\necho_window_s = "1h"\n')
    text = lines(problems_of(path))
    assert text[0].startswith(f"{path}:{line_of(path, 'token =')}: unknown key 'token'")
    assert "(did you mean 'tokens'?)" in text[0]
    assert text[1].startswith(f"{path}:{line_of(path, 'echo_window_s')}: braze_webhooks.")


def test_secrets_of_lists_every_secret_a_config_holds(tmp_path: Path) -> None:
    """secrets_of names the Braze key, the client secret, both token lists and the Didomi login."""
    config = Config(
        auth=AuthConfig(client_secret="cs", tokens=["t1", ""]),
        braze=BrazeConfig(server="US-01", api_key="bk"),
        didomi_api=DidomiApiConfig(key="dk", secret="ds"),
        braze_webhooks=BrazeWebhooksConfig(tokens=["w1"]),
    )
    assert secrets_of(config) == ["bk", "cs", "t1", "dk", "ds", "w1"]
    assert secrets_of(Config()) == []


def test_a_config_repr_masks_its_secrets() -> None:
    """A printed config (a traceback, a debugger) shows which secrets are set, never their value."""
    config = Config(
        auth=AuthConfig(client_secret="client-secret-1", tokens=["bearer-token-1"]),
        braze=BrazeConfig(server="US-01", api_key="braze-key-1"),
        didomi_api=DidomiApiConfig(key="didomi-key-1", secret="didomi-secret-1"),
        braze_webhooks=BrazeWebhooksConfig(tokens=["hook-token-1"]),
    )
    text = repr(config)
    for secret in secrets_of(config):
        assert secret not in text
    assert "api_key=[redacted]" in text
    assert "server='US-01'" in text
    assert repr(DidomiApiConfig()).startswith("DidomiApiConfig(enabled=False, base_url=")
    assert "key=''" in repr(DidomiApiConfig())


def test_braze_webhooks_need_the_didomi_api_enabled(tmp_path: Path) -> None:
    """Braze's routes without [didomi_api] enabled would store changes nothing ever sends."""
    path = write(tmp_path, MINIMAL + '[braze_webhooks]\ntokens = ["t"]\n')
    assert lines(problems_of(path)) == [
        f"{path}:{line_of(path, '[braze_webhooks]')}: [braze_webhooks] takes Braze's changes for"
        " Didomi: set [didomi_api] enabled = true, or they would wait in the spool for ever"
    ]
