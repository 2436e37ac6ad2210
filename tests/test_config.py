"""Configuration: the YAML file, flags, validation messages that name the key and the file."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from daemonproc import run_cached

from cached import cli
from cached import config as configuration
from cached.config import Config, MountSpec, parse_listen, parse_size
from cached.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "conf" / "cached.yaml"
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cached.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    c = configuration.load(None)
    assert c == Config()
    assert c.listen_address == ("127.0.0.1", 9292)
    assert c.upstream_kind == "file" and c.upstream_dir == Path("var/images")
    assert c.image_cache_dir == Path("var/cache")
    assert c.image_cache_max_size == 10 * GiB
    assert (c.image_cache_stall_time, c.cache_prefetcher_interval) == (86400, 300)
    assert c.cache_prune_interval == 600
    assert c.auth_cache_ttl == 0.0 and c.access_tokens == ()
    assert (c.upstream_connect_timeout, c.upstream_read_timeout) == (10.0, 60.0)
    assert (c.fsync_interval_bytes, c.fsync_interval_seconds) == (64 * MiB, 1.0)
    assert c.max_header_size == 16384 and c.log_level == "INFO"


def test_shipped_file_lists_every_option_with_its_default() -> None:
    listed = yaml.safe_load(SHIPPED.read_text())
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(Config))
    assert configuration.load(SHIPPED) == Config()


def test_check_config_accepts_the_shipped_file(tmp_path: Path) -> None:
    # check-config checks the directories as serve does: the shipped file's store
    # (file://./var/images) must exist where it is started; its cache would be created.
    (tmp_path / "var" / "images").mkdir(parents=True)
    res = run_cached("check-config", "-c", str(SHIPPED), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert sorted(shown) == sorted(f.name for f in dataclasses.fields(Config))
    assert shown["image_cache_max_size"] == 10 * GiB
    assert shown["listen"] == "127.0.0.1:9292"
    # What it prints is a configuration file: read back, the same values (issue 19 item 16).
    again = tmp_path / "again.yaml"
    again.write_text(res.stdout)
    assert configuration.load(again) == configuration.load(SHIPPED)


def test_every_option_loads_from_a_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
listen: "[::1]:9393"
upstream: https://glance.example:9292/
image_cache_dir: /var/lib/cached
image_cache_max_size: 1.5T
image_cache_stall_time: 3600
cache_prefetcher_interval: 60
cache_prune_interval: 120
auth_cache_ttl: 0
access_tokens: [a, b]
upstream_connect_timeout: 2.5
upstream_read_timeout: 0
fsync_interval_bytes: 500M
fsync_interval_seconds: 0.25
max_header_size: 8K
log_level: debug
""",
    )
    assert configuration.load(path) == Config(
        listen="[::1]:9393",
        upstream="https://glance.example:9292",  # trailing slash dropped
        image_cache_dir=Path("/var/lib/cached"),
        image_cache_max_size=int(1.5 * TiB),
        image_cache_stall_time=3600,
        cache_prefetcher_interval=60,
        cache_prune_interval=120,
        auth_cache_ttl=0.0,
        access_tokens=("a", "b"),
        upstream_connect_timeout=2.5,
        upstream_read_timeout=0.0,
        fsync_interval_bytes=500 * MiB,
        fsync_interval_seconds=0.25,
        max_header_size=8192,
        log_level="DEBUG",
    )


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert configuration.load(write(tmp_path, "# nothing\n")) == Config()


def test_image_safety_mode_off_needs_no_quotes(tmp_path: Path) -> None:
    """YAML 1.1 reads an unquoted ``off`` as false: ``image_safety_mode: off``, as the README
    writes it, is off (it was refused: "got False")."""
    assert configuration.load(write(tmp_path, "image_safety_mode: off\n")).image_safety_mode == (
        "off"
    )


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:1\nimage_cache_size: 10G\n")
    with pytest.raises(ConfigError) as err:
        configuration.load(path)
    assert str(err.value) == f"{path}: unknown option 'image_cache_size'"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping of option: value"),
        ("just a string\n", "must be a mapping of option: value"),
    ],
)
def test_malformed_file_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        configuration.load(path)
    assert str(err.value).startswith(f"{path}: ")


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        configuration.load(path)
    assert str(err.value) == f"{path}: cannot read: No such file or directory"


BAD_VALUES: dict[str, list[object]] = {
    "listen": ["nope", "host:", "host:99999", "host:-1", None, 9292, [], ["[::1]:1", "x"], "a:1,"],
    "upstream": ["ftp://glance", "glance:9292", "http://", ""],
    "image_cache_dir": ["", 5, None, ["a"]],
    "image_cache_max_size": ["lots", "-1G", "10X", True, -5, None, "1.5.5G"],
    "image_cache_stall_time": [0, -1, "1 hour", 1.5, True, None, "1.5s"],
    "cache_prefetcher_interval": [0, "5 mins", False],
    "cache_prune_interval": [-600, 60.5, "10 parsecs"],
    "auth_cache_ttl": [-1, "30sec", True, None],
    "auth_stale_if_error": [-1, "1hr", False],
    "access_tokens": ["token", [""], [1], {"a": 1}],
    "upstream_connect_timeout": [-0.1, "fast", None],
    "upstream_read_timeout": [True, "x"],
    "fsync_interval_bytes": ["1 Z", "lots", -1],
    "fsync_interval_seconds": [-0.5, "1w"],
    "access_record_interval": [-1, "10 s s", True],
    "max_header_size": ["big", -1],
    "client_header_timeout": [-1, "30y", True, None],
    "client_keepalive_timeout": [0, -1, "0s", None],
    "client_body_timeout": [-0.5, "m1"],
    "max_connections_per_address": [-1, 1.5, "128", True],
    # shielding the upstream from clients (issue 13)
    "client_body_buffer_size": [-1, "lots", True],
    "client_body_min_rate": [-1, "fast", False],
    "max_upstream_requests_per_client": [-1, 1.5, "16", True],
    "upstream_relay_connections": [-1, 2.5, "32", True],
    "upstream_fetch_connections": [-1, 2.5, "64", True],
    "upstream_probe_connections": [-1, 2.5, "32", True],
    "auth_stale_after_failures": [0, 1, 2.5, "3", True],
    "max_connections": [-1, 1.5, "4096", True],
    "client_ipv6_prefix": [0, 129, "64", True],
    "trusted_proxies": ["10.0.0.1", ["nope"], [1], True],
    "log_level": ["LOUD", 3, "trace"],
    "cache_clean_interval": [0, "0h"],
    "scrub_interval": [0, -1, "1 day", 1.5, True],
    "image_safety_audit_interval": [0, -1, "1 day", 1.5, True],
    "scrub_rate": [0, -5, "16M", True, None, float("nan"), float("inf")],
    "prefetch_concurrency": [0, -1, 1.5, True],
    "prefetch_retry_initial": [-1, "-5m"],
    "prefetch_retry_max": [-1, "x"],
    "legacy_queue_immediate": ["yes", 1, None],
    "prune_on_fill": ["no", 0],
    "max_image_fraction": [0, 1.5, -0.1, "half", True],
    "min_free_space": ["100%", "-1%", "lots", True, 1.5, "5 %x", "1G max 2G", "5% max lots"],
    "admin_tokens": ["sha256:" + "0" * 64, ["plain-token"], ["sha256:abc"]],
    "admin_cache_ttl": [-1, "1 m!"],
    "keystone_authtoken": [
        "http://keystone:5000",
        {"nope": 1},
        {"auth_type": "kerberos"},
        {"auth_url": "keystone:5000", "token": "t"},
        {"username": ["a"]},
        {"interface": "private"},
        {"auth_url": "http://keystone:5000"},
        {"auth_url": "http://keystone:5000", "auth_type": "password", "username": "u"},
        {"auth_url": "http://k:5000", "username": "u", "password": "p"},
        {"auth_type": "v3applicationcredential", "application_credential_id": "i"},
        {"application_credential_id": "i", "application_credential_secret": "s"},
        {"auth_type": "admin_token"},
    ],
    "keystone_url": ["keystone:5000", "ftp://keystone", 5],
    "keystone_username": [5],
    "keystone_password": [["x"]],
    "keystone_project_name": [1.5],
    "keystone_user_domain_id": [True],
    "keystone_project_domain_id": [None],
    "service_token": [123],
    "worker_self_reference_url": ["node1:9292"],
    "peers": ["http://node2:9292", ["node2:9292"]],
    "metrics_auth": ["yes", 1, None],
    "shutdown_grace": [-1, "30 seconds", True, None],
    "tls_cert_file": [5, ["a"]],
    "tls_key_file": [None],
    "upstream_ca_file": [1],
    "upstream_insecure": ["yes", 1],
    "keystone_ca_file": [True],
    "admin_listen": ["unix:", "nope", "[::1", 9393, 9293, "host:99999", "::1:9293"],
    "admin_socket_group": [5, "two words", "a:b"],
    "admin_tls_client_ca": [3],
    "allow_unauthenticated_management": ["true", 1],
    "policy": [["a"]],
    "image_safety_mode": ["enforcing", "on", True, 1],
    "image_safety_on_violation": ["block", "", True],
    "image_safety_allowed_formats": ["qcow2", ["qcow3"], [1]],
    "image_safety_nonfatal_checks": ["mbr", ["MBR"], [""], [2]],
    "image_signature_verify": ["yes", 1],
    "image_signature_required": ["yes", 1],
    "image_signature_certificate_dir": [3],
    "image_signature_ca_file": [3],
    "fleet_self": ["Ctl-1", "a b", "x" * 64, 5, ["a"]],
    "fleet_members": [
        "ctl-1",
        [{"id": "ctl-1"}],
        [{"id": "ctl_1", "url": "http://a:1"}],
        [{"id": "ctl-1", "url": "ftp://a"}],
        [{"id": "ctl-1", "url": "http://a:1", "port": 1}],
        [{"id": "a", "url": "http://a:1"}, {"id": "a", "url": "http://b:1"}],
        [{"id": "a", "url": "http://a:1"}, {"id": "b", "url": "http://a:1"}],
    ],
    "fleet_secret_file": [5, ["a"]],
    "fleet_previous_secret_file": [5, None],
    "fleet_lookup_timeout": [0, -1, "200ms", True],
    "fleet_max_peer_streams": [0, 1.5, "16", True],
    "fleet_connect_timeout": [0, "1s"],
    "fleet_headers_timeout": [-5, None],
    "fleet_stall_timeout": [0, False],
    "fleet_min_copy_rate": [-1, "50M", True],
    "fleet_listen": ["nowhere", 9293, "[::1:9293"],
    "image_cache_mount": [
        True,
        {"require_mount": "yes"},
        {"mounted": True},
        {"fstype": "nfs 4"},
        {"writable": False},
        {"probe_interval": 0},
        {"probe_timeout": "10 secs"},
        {"sendfile": "threads"},
        {"sendfile": True},
    ],
    "upstream_mount": [[], {"probe_timeout": -1}, {"writable": 1}, {"sendfile": "thread"}],
}


def test_declared_directories_load_from_a_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
image_cache_mount: {require_mount: true, fstype: nfs4, probe_interval: 2, probe_timeout: 1.5,
                    sendfile: loop}
upstream_mount: {require_mount: true}
""",
    )
    config = configuration.load(path)
    assert config.image_cache_mount == MountSpec(
        require_mount=True,
        fstype="nfs4",
        writable=True,
        probe_interval=2.0,
        probe_timeout=1.5,
        sendfile="loop",
    )
    assert config.upstream_mount == MountSpec(require_mount=True, writable=False)


def test_bad_values_cover_every_option() -> None:
    assert sorted(BAD_VALUES) == sorted(f.name for f in dataclasses.fields(Config))


@pytest.mark.parametrize(
    ("key", "value"), [(k, v) for k, values in BAD_VALUES.items() for v in values]
)
def test_bad_value_names_the_key_and_the_file(tmp_path: Path, key: str, value: object) -> None:
    path = write(tmp_path, yaml.safe_dump({key: value}))
    with pytest.raises(ConfigError) as err:
        configuration.load(path)
    assert str(err.value).startswith(f"{path}: option {key!r}: ")
    with pytest.raises(ConfigError) as err:  # the same value as a flag
        configuration.load(None, {key: value})
    assert str(err.value).startswith(f"command line: option {key!r}: ")


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "listen: 127.0.0.1:1111\nimage_cache_max_size: 1G\nlog_level: ERROR\nauth_cache_ttl: 5\n",
    )
    c = configuration.load(path, {"listen": "127.0.0.1:2222", "image_cache_max_size": "2G"})
    assert c.listen == "127.0.0.1:2222"
    assert c.image_cache_max_size == 2 * GiB
    assert c.log_level == "ERROR" and c.auth_cache_ttl == 5.0  # untouched by flags


def test_cli_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:1111\nimage_cache_dir: /from/file\n")
    res = run_cached(
        "check-config",
        "-c",
        str(path),
        "--listen",
        "127.0.0.1:2222",
        "--cache-dir",
        str(tmp_path / "c"),
        "--max-size",
        "500M",
        "--log-level",
        "warning",
        "--upstream",
        "http://glance:9292",
    )
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert shown["listen"] == "127.0.0.1:2222"
    assert shown["image_cache_dir"] == str(tmp_path / "c")
    assert shown["image_cache_max_size"] == 500 * MiB
    assert shown["log_level"] == "WARNING"
    assert shown["upstream"] == "http://glance:9292"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10G", 10 * GiB),
        ("500M", 500 * MiB),
        ("1.5T", int(1.5 * TiB)),
        ("16K", 16384),
        ("2P", 2 << 50),
        ("10g", 10 * GiB),
        ("10GB", 10 * GiB),
        ("10GiB", 10 * GiB),
        (" 3 M ", 3 * MiB),
        ("1024", 1024),
        (1024, 1024),
        (0, 0),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9292", ("127.0.0.1", 9292)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        (":9292", ("0.0.0.0", 9292)),
        ("localhost:80", ("localhost", 80)),
        ("[::1]:9292", ("::1", 9292)),
        ("[::]:9292", ("::", 9292)),
        ("[fe80::1]:65535", ("fe80::1", 65535)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "9292",
        "[::1]",
        "host:port",
        "host:65536",
        "",
        "[::1]:",
        "::1",  # an IPv6 address without brackets or port (was read as host ':' port 1)
        "[::1]x:80",  # garbage after the bracket (was read as host '::1]x')
    ],
)
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="listen must be HOST:PORT"):
        parse_listen(value)


def _load_cli(*argv: str) -> Config:
    return cli.load_config(cli._parser().parse_args(["check-config", *argv]))  # noqa: SLF001


@pytest.mark.parametrize("listen", ["127.0.0.1:9292", "127.9.9.9:1", "[::1]:9292", "localhost:1"])
def test_file_upstream_on_loopback_needs_no_tokens(tmp_path: Path, listen: str) -> None:
    c = _load_cli("--upstream", f"file://{tmp_path}", "--listen", listen)
    assert c.upstream_kind == "file" and c.upstream_dir == tmp_path


@pytest.mark.parametrize("listen", ["0.0.0.0:9292", "192.0.2.7:9292", "[::]:9292", ":9292"])
def test_file_upstream_off_loopback_needs_tokens(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load_cli("--upstream", f"file://{tmp_path}", "--listen", listen)
    assert str(err.value).startswith("command line: option 'listen': a file upstream")
    assert "access_tokens" in str(err.value)

    path = write(tmp_path, f"upstream: file://{tmp_path}\nlisten: '{listen}'\n")
    with pytest.raises(ConfigError) as err:
        _load_cli("-c", str(path))
    assert str(err.value).startswith(f"{path}: option 'listen': ")

    path.write_text(
        f"upstream: file://{tmp_path}\nlisten: '{listen}'\naccess_tokens: [s3cret]\n"
        f"admin_listen: unix:{tmp_path}/admin.sock\n"
    )
    assert _load_cli("-c", str(path)).access_tokens == ("s3cret",)


def test_glance_upstream_may_listen_anywhere(tmp_path: Path) -> None:
    path = write(tmp_path, f"admin_listen: unix:{tmp_path}/admin.sock\n")
    c = _load_cli("-c", str(path), "--upstream", "http://glance:9292", "--listen", "0.0.0.0:9292")
    assert c.upstream_kind == "glance" and c.listen_address == ("0.0.0.0", 9292)


def test_several_listen_addresses_and_a_management_listener(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "listen: ['0.0.0.0:9292', '[::]:9292', '[::1]:9393']\nadmin_listen: unix:/run/c.sock\n",
    )
    c = configuration.load(path)
    assert c.listen == "0.0.0.0:9292,[::]:9292,[::1]:9393"
    assert c.listen_addresses == (("0.0.0.0", 9292), ("::", 9292), ("::1", 9393))
    assert c.admin_address == Path("/run/c.sock")
    c = configuration.load(None, {"listen": "127.0.0.1:1, [::1]:2", "admin_listen": "[::1]:3"})
    assert c.listen_addresses == (("127.0.0.1", 1), ("::1", 2)) and c.admin_address == ("::1", 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tls_cert_file: a.pem\n", "option 'tls_key_file': tls_cert_file and tls_key_file go"),
        ("tls_key_file: a.key\n", "option 'tls_cert_file': "),
        ("admin_tls_client_ca: ca.pem\n", "option 'admin_tls_client_ca': needs a HOST:PORT"),
        (
            "admin_tls_client_ca: ca.pem\nadmin_listen: unix:/x\n"
            "tls_cert_file: a\ntls_key_file: b\n",
            "option 'admin_tls_client_ca': needs a HOST:PORT",
        ),
        ("upstream_insecure: true\nupstream_ca_file: ca.pem\n", "option 'upstream_insecure'"),
    ],
)
def test_tls_options_that_go_together(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        configuration.load(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_check_config_rejects_file_upstream_off_loopback(tmp_path: Path) -> None:
    res = run_cached("check-config", "--upstream", f"file://{tmp_path}", "--listen", "0.0.0.0:9292")
    assert res.returncode == 2
    assert res.stderr.startswith("cached: configuration error: command line: option 'listen'")
    assert res.stdout == ""


def test_relative_file_upstream_is_relative_to_the_cwd() -> None:
    c = configuration.load(None, {"upstream": "file://./images"})
    assert c.upstream_dir == Path("images")
    c = configuration.load(None, {"upstream": "file:///srv/glance%20images"})
    assert c.upstream_dir == Path("/srv/glance images")


def test_check_config_never_prints_secrets(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "keystone_url: http://keystone:5000/v3\n"
        "keystone_username: cached\n"
        "keystone_password: hunter2-password\n"
        "keystone_project_name: service\n"
        "service_token: tok-3f9a\n",
    )
    (tmp_path / "var" / "images").mkdir(parents=True)  # the default store, as serve needs it
    res = run_cached("check-config", "-c", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "hunter2-password" not in res.stdout + res.stderr
    assert "tok-3f9a" not in res.stdout + res.stderr
    shown = yaml.safe_load(res.stdout)
    assert "keystone_password" not in shown and "service_token" not in shown
    assert "# keystone_password: (set) (not shown)\n" in res.stdout
    assert "# service_token: (set) (not shown)\n" in res.stdout
    assert shown["keystone_username"] == "cached"


# ---- issue 19 item 16: duplicates, durations, check-config's YAML --------------------------


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 0.0.0.0:9292\nlog_level: INFO\nlisten: 127.0.0.1:9292\n")
    with pytest.raises(
        ConfigError, match=r"line 3: option 'listen' given twice \(first on line 1\)"
    ):
        configuration.load(path)
    nested = write(tmp_path, "image_cache_mount:\n  fstype: nfs4\n  fstype: xfs\n")
    with pytest.raises(ConfigError, match="option 'fstype' given twice"):
        configuration.load(nested)


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("cache_prune_interval", "5m", 300),
        ("image_cache_stall_time", "1d", 86400),
        ("scrub_interval", "12h", 43200),
        ("image_safety_audit_interval", "30m", 1800),
        ("shutdown_grace", "45s", 45.0),
        ("upstream_read_timeout", "1.5m", 90.0),
        ("client_header_timeout", "500ms", 0.5),
        ("auth_stale_if_error", 30, 30.0),
    ],
)
def test_durations_take_units(option: str, value: object, expected: float) -> None:
    assert getattr(configuration.build({option: value}), option) == expected


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("cache_prune_interval", "1500ms", "positive whole number of seconds"),
        ("cache_prune_interval", "5 minutes", "not a duration: '5 minutes'"),
        ("shutdown_grace", "soon", "not a duration: 'soon'"),
        ("shutdown_grace", "-5s", "not a duration"),
    ],
)
def test_bad_durations_are_refused(option: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        configuration.build({option: value})


def test_durations_in_mount_specs(tmp_path: Path) -> None:
    path = write(tmp_path, "image_cache_mount: {probe_interval: 2s, probe_timeout: 1m}\n")
    spec = configuration.load(path).image_cache_mount
    assert (spec.probe_interval, spec.probe_timeout) == (2.0, 60.0)


def test_a_keystone_authtoken_section_copies_over_unchanged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The [keystone_authtoken] lines of a glance-api.conf, written as YAML: the options of
    the daemon's credentials are read, keystonemiddleware's own ones ignored with a warning."""
    path = write(
        tmp_path,
        """
keystone_authtoken:
  www_authenticate_uri: https://keystone.example:5000
  auth_url: https://keystone.example:5000
  memcached_servers: controller:11211
  auth_type: password
  project_domain_name: Default
  user_domain_name: Default
  project_name: service
  username: glance
  password: glance-secret
  service_token_roles_required: true
  cafile: /etc/pki/tls/certs/ca.pem
  region_name: RegionOne
  interface: internal
""",
    )
    c = configuration.load(path)
    auth = c.keystone_authtoken
    assert (auth.auth_url, auth.auth_type, auth.username) == (
        "https://keystone.example:5000",
        "password",
        "glance",
    )
    assert (auth.user_domain_name, auth.project_domain_name) == ("Default", "Default")
    assert (auth.user_domain_id, auth.project_domain_id) == ("", "")
    assert (auth.cafile, auth.region_name, auth.interface) == (
        "/etc/pki/tls/certs/ca.pem",
        "RegionOne",
        "internal",
    )
    assert "'memcached_servers' ignored" in caplog.text
    assert "'service_token_roles_required' ignored" in caplog.text
    # the deprecated mirrors follow
    assert (c.keystone_url, c.keystone_ca_file) == (auth.auth_url, auth.cafile)
    assert auth.secrets() == ["glance-secret"]


def test_application_credential_is_inferred_and_deprecated_names_conflict(
    tmp_path: Path,
) -> None:
    c = configuration.build(
        {
            "keystone_authtoken": {
                "auth_url": "http://keystone:5000",
                "application_credential_id": "abc",
                "application_credential_secret": "s3cret",
            }
        }
    )
    assert c.keystone_authtoken.auth_type == "v3applicationcredential"
    with pytest.raises(ConfigError, match="also given as keystone_authtoken.auth_url"):
        configuration.build(
            {
                "keystone_url": "http://a:5000",
                "keystone_authtoken": {"auth_url": "http://b:5000", "token": "t"},
            }
        )
